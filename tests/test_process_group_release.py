"""train.py destroys the default process group when every rank is done with it (a finished run, a stop at the
same step on every rank, the non-finite guard's shared decision), and not after an error, where another rank
may still wait in a collective. Lightning destroys it at exit for NCCL only; a gloo group left to the
interpreter's shutdown can abort a process whose run succeeded (exit -6, "terminate called without an active
exception"), as the 2-process workers of test_grad_equivalence did once in a clean-clone CI run.

train.py's own entry point runs here (ldm.cli.train.main, the command line through Hydra) with `train` replaced
by one that starts a 1-rank gloo group, as Lightning's DDP strategy does, and ends as the case says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import ldm.cli.train as train_cli
from ldm.lightning.module import NonFiniteLossError


def start_group(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)


def run_main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ending: BaseException | None) -> int:
    def fake_train(cfg):
        start_group(tmp_path)
        dist.barrier()  # the group works
        if ending is not None:
            raise ending
        return {}

    monkeypatch.setattr(train_cli, "train", fake_train)
    monkeypatch.setattr(sys, "argv", ["train.py", f"paths.root={tmp_path}", "logger=none"])
    monkeypatch.chdir(tmp_path)
    try:
        train_cli.main()
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


@pytest.fixture(autouse=True)
def no_group_left():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("ending", "code"),
    [
        (None, 0),
        (train_cli.Interrupted("SIGTERM", 3, 10, "last.ckpt"), 143),
        (NonFiniteLossError("stopped: loss is nan at step 3"), 1),
    ],
    ids=["finished", "stopped-by-a-signal", "non-finite-loss"],
)
def test_a_run_every_rank_finished_releases_its_process_group(monkeypatch, tmp_path, ending, code) -> None:
    assert not dist.is_initialized()
    assert run_main(monkeypatch, tmp_path, ending) == code
    assert not dist.is_initialized(), "train.py left its process group to the interpreter's exit"


def test_after_an_error_the_group_is_left_alone(monkeypatch, tmp_path) -> None:
    """Another rank may be inside a collective: destroying the group here could wait on it."""
    assert run_main(monkeypatch, tmp_path, RuntimeError("boom")) == 1  # Hydra's report of the error, and exit 1
    assert dist.is_initialized()
