"""last.ckpt is relinked in one rename (ldm.lightning.callbacks.Checkpoint, the default checkpoint callback):
a kill at any moment of the relink leaves it naming a whole step file. Lightning's own removes it first."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from ldm.lightning.callbacks import Checkpoint

TRAINER = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda *a: None))


def steps(folder: Path) -> tuple[Path, Path, Path]:
    folder.mkdir()
    one, two = folder / "step-0000001.ckpt", folder / "step-0000002.ckpt"
    one.write_bytes(b"one")
    two.write_bytes(b"two")
    return one, two, folder / "last.ckpt"


class Killed(BaseException):
    """A signal's exception at that moment (KeyboardInterrupt, SystemExit)."""


def kill_at_symlink(monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(*_: object) -> None:
        raise Killed

    monkeypatch.setattr(os, "symlink", killed)


@pytest.mark.parametrize("callback, survives", [(Checkpoint, True), (ModelCheckpoint, False)])
def test_a_kill_while_relinking_leaves_last_ckpt_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       callback: type, survives: bool) -> None:
    one, two, last = steps(tmp_path / "checkpoints")
    callback._link_checkpoint(TRAINER, str(one), str(last))
    assert os.readlink(last) == "step-0000001.ckpt" and last.read_bytes() == b"one"
    with monkeypatch.context() as patch:
        kill_at_symlink(patch)
        with pytest.raises(Killed):
            callback._link_checkpoint(TRAINER, str(two), str(last))
    # ours: last.ckpt still the previous whole step; Lightning's: gone (ckpt_path=last would miss this run)
    assert last.exists() is survives
    if survives:
        assert last.read_bytes() == b"one"
    callback._link_checkpoint(TRAINER, str(two), str(last))  # the next save relinks as usual
    assert os.readlink(last) == "step-0000002.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step-0000001.ckpt", "step-0000002.ckpt"]


def test_where_symlinks_fail_last_ckpt_is_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, two, last = steps(tmp_path / "checkpoints")

    def refused(*_: object) -> None:
        raise OSError("symbolic links need a privilege here")

    monkeypatch.setattr(os, "symlink", refused)
    Checkpoint._link_checkpoint(TRAINER, str(two), str(last))
    assert not last.is_symlink() and last.read_bytes() == b"two"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step-0000001.ckpt", "step-0000002.ckpt"]
