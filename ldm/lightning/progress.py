"""What a training run shows while it runs: on a terminal, a progress bar over optimizer steps out of
`max_steps`; in a file (stdout redirected, as on every cluster), a plain line every
`log_every_n_steps`; in `train.log`, the same lines in both cases:

    step 120/1000 (12%)  loss 0.1234  lr 1.00e-04  38.5 img/s  ETA 4m32s  skipped 0
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n

log = logging.getLogger("ldm.train")

# The metric each training module reports as its loss, in order of preference.
LOSS_KEYS = ("train/loss", "train/rec_loss")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def total_steps(trainer: L.Trainer) -> int | None:
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps out of `max_steps` across epochs (streamed data
    has no known epoch length: the stock bar showed `Epoch 55/-2`), its loss and lr refreshed every
    `log_every_n_steps`. Shown only on a terminal; in a file StepLog's lines say the same."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False, only_on_terminal: bool = True):
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        if only_on_terminal and not _isatty(sys.stderr):  # tqdm draws on stderr
            self.disable()

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.total = total_steps(trainer)
        self.train_progress_bar.initial = trainer.global_step  # a resumed run starts where it was
        self.train_progress_bar.set_description("step")
        self._shown = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        bar = self.train_progress_bar
        if bar is None or bar.disable or step == self._shown or step % max(self.refresh_rate, 1):
            return
        self._shown = step
        _update_n(bar, step)
        if step % max(int(trainer.log_every_n_steps), 1) == 0:
            # Reading the logged loss copies it from the device (a host sync): every log_every_n_steps, not every step
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class StepLog(L.Callback):
    """A plain line every `every_n_steps` optimizer steps (default: trainer.log_every_n_steps) on rank 0:
    step/max, loss, learning rate, images/s (all ranks; also logged as `throughput/images_per_sec`), ETA
    and skipped samples. The lines go to
    `train.log` in the run folder always, and to the console when stdout is not a terminal (`console:
    true|false` decides otherwise)."""

    def __init__(self, every_n_steps: int | None = None, console: bool | None = None, log_file: str | None = "train.log"):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"StepLog: every_n_steps must be >= 1 (or null for trainer.log_every_n_steps), got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.console = console
        self.log_file = log_file
        self._handlers: list[logging.Handler] = []
        self._own: list[logging.Handler] = []
        self._images = 0
        self._last: tuple[float, int] = (0.0, 0)
        self._rate: float | None = None  # seconds per step, recent
        self._step_at_batch_start = -1
        self.images_per_s: float | None = None  # all ranks together, over the last interval

    # -- where the lines go --------------------------------------------------------------------------

    def _targets(self, trainer: L.Trainer) -> list[logging.Handler]:
        root = logging.getLogger()
        targets: list[logging.Handler] = []
        if self.log_file:
            path = (Path(trainer.default_root_dir) / self.log_file).resolve()
            files = [h for h in root.handlers if isinstance(h, logging.FileHandler)
                     and Path(h.baseFilename).resolve() == path]
            if not files:  # no Hydra (the Python API) or Hydra logs elsewhere: a handler of our own
                path.parent.mkdir(parents=True, exist_ok=True)
                own = logging.FileHandler(path)
                own.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
                self._own.append(own)
                files = [own]
            targets += files
        console = self.console if self.console is not None else not _isatty(sys.stdout)
        if console:
            streams = [h for h in root.handlers if type(h) is logging.StreamHandler]
            if not streams:
                own_stream = logging.StreamHandler(sys.stdout)
                self._own.append(own_stream)
                streams = [own_stream]
            targets += streams
        return targets

    def emit(self, line: str) -> None:
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None)
        for handler in self._handlers:
            handler.handle(record)
            handler.flush()

    # -- hooks ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        self._handlers = self._targets(trainer)
        self._last = (time.monotonic(), trainer.global_step)
        self._images = 0
        total = total_steps(trainer)
        verb = "resuming at" if trainer.global_step else "starting at"
        self.emit(f"training: {verb} step {trainer.global_step}" + (f" of {total}" if total else ""))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        self._images += batch_size(batch) * trainer.world_size
        step = trainer.global_step
        every = self.every_n_steps or max(int(trainer.log_every_n_steps), 1)
        if step == self._step_at_batch_start or step % every:
            return
        self.emit(self.line(trainer, pl_module))
        if self.images_per_s is not None:  # measured without a device sync (Lightning's ThroughputMonitor syncs every batch)
            for logger in trainer.loggers:
                logger.log_metrics({"throughput/images_per_sec": self.images_per_s}, step=step)

    def line(self, trainer: L.Trainer, pl_module: Any) -> str:
        now, step = time.monotonic(), trainer.global_step
        then, before = self._last
        elapsed, steps = now - then, step - before
        images_per_s = self._images / elapsed if elapsed > 0 else float("nan")
        self.images_per_s = images_per_s if math.isfinite(images_per_s) else None
        if steps > 0 and elapsed > 0:
            per_step = elapsed / steps
            self._rate = per_step if self._rate is None else 0.5 * self._rate + 0.5 * per_step
        self._last, self._images = (now, step), 0
        total = total_steps(trainer)
        parts = [f"step {step}/{total} ({100 * step // total}%)" if total else f"step {step}"]
        loss = self._loss(trainer)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        lr = self._lr(trainer)
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if math.isfinite(images_per_s):
            parts.append(f"{images_per_s:.1f} img/s")
        if total and self._rate is not None:
            parts.append(f"ETA {format_duration((total - step) * self._rate)}")
        skipped = getattr(pl_module, "skipped_samples", None)
        if skipped is not None:
            parts.append(f"skipped {int(skipped)}")
        return "  ".join(parts)

    @staticmethod
    def _loss(trainer: L.Trainer) -> float | None:
        metrics = trainer.callback_metrics
        key = next((k for k in LOSS_KEYS if k in metrics), None)
        key = key or next((k for k in metrics if k.startswith("train/") and "loss" in k), None)
        return float(metrics[key]) if key else None

    @staticmethod
    def _lr(trainer: L.Trainer) -> float | None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                return float(group["lr"])
        return None

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero and self._handlers:
            total = total_steps(trainer)
            self.emit(f"training: stopped at step {trainer.global_step}" + (f" of {total}" if total else ""))
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        for handler in self._own:
            handler.close()
        self._own, self._handlers = [], []


def batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for key in ("image", "moments", "latent"):
            if key in batch and hasattr(batch[key], "shape"):
                return int(batch[key].shape[0])
        captions = batch.get("caption")
        if isinstance(captions, list):
            return len(captions)
    return 0
