"""Resuming from Lightning checkpoints."""

from __future__ import annotations

from typing import Any


def start_next_epoch_fresh(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written after an epoch ended resume at batch 0 of the next epoch.

    When a run stops on an epoch's last batch (max_steps reached there), Lightning saves that epoch as
    complete but leaves its batch counter at the epoch's length; resuming from it (`ckpt_path=last` to
    train longer), Lightning counts those batches against the next epoch, which then ends early and
    desynchronises the data order from an uninterrupted run. Called from `on_load_checkpoint`, which
    runs before Lightning restores its loops from the same dict.
    """
    loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if not loop or "epoch_loop.batch_progress" not in loop:
        return
    epochs = loop["epoch_progress"]["current"]
    batches = loop["epoch_loop.batch_progress"]
    epoch_closed = len(set(epochs.values())) == 1  # every epoch started was also completed
    batches_closed = len(set(batches["current"].values())) == 1 and batches["current"]["completed"] > 0
    if epoch_closed and batches_closed and batches.get("is_last_batch"):
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False
