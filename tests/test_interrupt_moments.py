"""Interrupts at the moments users and schedulers send them, through the real command line: while train.py
starts (before the first step), as the data loader's workers start, while a checkpoint is written (a second
Ctrl-C, a SIGKILL), after the last step and during the final sampling; a closed terminal (SIGHUP) and nohup;
a checkpoint cut off or gone when the run resumes; sample.py stopped between two images.

Slow checkpoint writes and signals at exact moments come from a `sitecustomize` on the started process's path
(`hooks`, below), switched on by environment variables; everything else is what a user's process does."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_interrupt import Run, run_folders, step_of, stopped_at
from test_midepoch_resume import assert_same_training_state

REPO = Path(__file__).resolve().parent.parent

HOOKS = '''
import os, sys, time
if os.environ.get("TEST_SLOW_CHECKPOINT_WRITES"):  # each checkpoint file written in 20 pieces, 0.1 s apart
    import io
    import torch
    _save = torch.save
    def _slow_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "global_step" in obj and hasattr(f, "write") and not isinstance(f, io.BytesIO):
            buffer = io.BytesIO()
            _save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            piece = len(data) // 20 + 1
            for start in range(0, len(data), piece):
                f.write(data[start:start + piece])
                f.flush()
                time.sleep(0.1)
            return None
        return _save(obj, f, *args, **kwargs)
    torch.save = _slow_save
if os.environ.get("TEST_SIGINT_GROUP_AT_WORKER_START"):  # a terminal's Ctrl-C as the loader's workers start
    import signal
    import torch.utils.data.dataloader as dataloader
    _init = dataloader._MultiProcessingDataLoaderIter.__init__
    _main, _fired = os.getpid(), []
    def _init_then_ctrl_c(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if os.getpid() == _main and not _fired:
            _fired.append(1)
            os.killpg(os.getpgid(0), signal.SIGINT)
    dataloader._MultiProcessingDataLoaderIter.__init__ = _init_then_ctrl_c
if os.environ.get("TEST_SIGNAL_AFTER_IMAGES"):  # sample.py: a signal once that many images are written
    import signal
    import ldm.cli.sample as sample
    _png, _count = sample.save_png, [0]
    def _png_then_signal(*args, **kwargs):
        _png(*args, **kwargs)
        _count[0] += 1
        if _count[0] == int(os.environ["TEST_SIGNAL_AFTER_IMAGES"]):
            os.kill(os.getpid(), getattr(signal, os.environ["TEST_SIGNAL"]))
    sample.save_png = _png_then_signal
'''


@pytest.fixture
def hooks(tmp_path: Path) -> dict[str, str]:
    """The environment that puts HOOKS on a started process's path."""
    folder = tmp_path / "hooks"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(HOOKS)
    return {"PYTHONPATH": f"{folder}{os.pathsep}{REPO}"}


def partials(tmp: Path) -> list[Path]:
    return list(tmp.glob("runs/default/*/checkpoints/.*.partial-*"))


def wait_until(condition, run: Run, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if run.proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {run.proc.returncode}) before {what}:\n{run.text()[-3000:]}")
        time.sleep(0.05)
    run.proc.kill()
    raise AssertionError(f"no {what} within {timeout} s:\n{run.text()[-3000:]}")


def assert_one_line_stop(text: str, name: str, when: str) -> None:
    assert re.search(rf"(?m)^train\.py: {name} {re.escape(when)}: stopped \(", text), text[-3000:]
    assert "Traceback" not in text and "Detected KeyboardInterrupt" not in text, text[-3000:]


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGUSR1"])
def test_a_signal_while_starting_stops_at_once_with_one_line(tmp_path: Path, name: str) -> None:
    """Before the first step there is nothing to save: Ctrl-C, a preemption or SLURM's time-limit warning
    (which requeues the job, to start again) stop train.py where it is, with one line and 128 + the signal's
    number, not a KeyboardInterrupt traceback, Lightning's "Detected KeyboardInterrupt" and status 1, or a
    silent death."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"} if name == "SIGUSR1" else {}
    run = Run(tmp_path, "run", "trainer.max_steps=100000", env=env)
    wait_until(lambda: any(tmp_path.glob("runs/default/*/train.log")), run, "a run folder")
    run.proc.send_signal(getattr(signal, name))  # Hydra's job has started: Lightning and the model are loading
    assert run.finish(timeout=60) == 128 + getattr(signal, name)
    assert_one_line_stop(run.text(), name, "while starting (before the first step)")
    assert "nothing to save yet" in run.text()
    assert not list(tmp_path.glob("runs/default/*/checkpoints/*"))
    assert (calls.read_text().split() == ["requeue", "4242"]) if name == "SIGUSR1" else not calls.exists()


def test_ctrl_c_to_the_process_group_as_the_loader_workers_start(tmp_path: Path, hooks: dict[str, str]) -> None:
    """A terminal's Ctrl-C reaches the workers too, just forked: they leave it to the training process, which
    finishes its first step and saves it; no worker dies with a traceback."""
    run = Run(tmp_path, "run", "trainer.max_steps=100000", "data.num_workers=2",
              env={**hooks, "TEST_SIGINT_GROUP_AT_WORKER_START": "1"}, new_session=True)
    assert run.finish() == 128 + signal.SIGINT, run.text()[-3000:]
    text = run.text()
    step = stopped_at(text, "SIGINT")
    assert step == 1 and "Traceback" not in text and "DataLoader worker" not in text, text[-3000:]
    (folder,) = run_folders(tmp_path)
    assert step_of(folder / "checkpoints" / "last.ckpt") == 1


def test_a_second_ctrl_c_during_a_checkpoint_write_leaves_no_part_of_it(tmp_path: Path, hooks: dict[str, str]) -> None:
    """The write is cut short on purpose: no file under a checkpoint's name, no hidden partial file in the
    run folder, nothing in the temp folder (Lightning's own write leaves a checkpoint-sized tmpXXXXXXXX
    there); last.ckpt is the step before, whole."""
    temp = tmp_path / "temp"
    temp.mkdir()
    run = Run(tmp_path, "run", "trainer.max_steps=100000", "callbacks.checkpoint.every_n_train_steps=4",
              env={**hooks, "TEST_SLOW_CHECKPOINT_WRITES": "1", "TMPDIR": str(temp)})
    wait_until(lambda: any(p.name.startswith(".step-0000008") and p.stat().st_size for p in partials(tmp_path)),
               run, "step 8's checkpoint half written")
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=30) == 128 + signal.SIGINT
    assert "second interrupt: exiting now" in run.text()
    (folder,) = run_folders(tmp_path)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.ckpt", "step-0000004.ckpt"]
    assert step_of(folder / "checkpoints" / "last.ckpt") == 4
    assert not list(temp.iterdir())


def test_sigkill_mid_write_keeps_last_ckpt_whole_and_the_resume_is_exact(tmp_path: Path, hooks: dict[str, str]) -> None:
    """A kill gives the process no chance: last.ckpt still points at the previous whole step file (the one
    being written only ever had a hidden partial name), the resume removes the partial file, says so, and
    ends with the uninterrupted run's weights, EMA, optimizer and noise state, bit for bit."""
    common = ("callbacks.checkpoint.every_n_train_steps=4", "module.ema_decay=0.9")
    (tmp_path / "straight").mkdir()
    straight = Run(tmp_path / "straight", "straight", "trainer.max_steps=10", *common)  # alongside, for the reference
    run = Run(tmp_path, "run", "trainer.max_steps=10", *common, env={**hooks, "TEST_SLOW_CHECKPOINT_WRITES": "1"})
    wait_until(lambda: any(p.name.startswith(".step-0000008") and p.stat().st_size for p in partials(tmp_path)),
               run, "step 8's checkpoint half written")
    run.proc.kill()
    run.proc.wait()
    (folder,) = run_folders(tmp_path)
    last = folder / "checkpoints" / "last.ckpt"
    assert os.readlink(last) == "step-0000004.ckpt" and step_of(last) == 4
    assert not (folder / "checkpoints" / "step-0000008.ckpt").exists() and partials(tmp_path)

    again = Run(tmp_path, "again", "trainer.max_steps=10", *common, "ckpt_path=last")
    assert again.finish() == 0, again.text()[-3000:]
    assert "a checkpoint write cut off by a kill" in again.text() and not partials(tmp_path)
    assert straight.finish() == 0, straight.text()[-3000:]
    (reference,) = (tmp_path / "straight" / "runs" / "default").iterdir()
    assert_same_training_state(torch.load(last, map_location="cpu", weights_only=False),
                               torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False))


def test_a_checkpoint_cut_off_or_gone_is_said_in_one_line_with_the_fix(tmp_path: Path) -> None:
    """A last.ckpt that is not a whole checkpoint (cut off by a copy, a full disk, a kill under another
    tool) or a link to a step file that is gone: one line naming the file and the step file to resume
    from, exit status 2, before Hydra makes a run folder; not a zip reader's traceback, nor a fresh start
    that silently leaves the run behind."""
    from ldm.cli.train import ConfigError, checkpoint_problem, resolve_ckpt_path

    first = Run(tmp_path, "first", "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=3")
    assert first.finish() == 0, first.text()[-3000:]
    (folder,) = run_folders(tmp_path)
    checkpoints = folder / "checkpoints"
    whole = (checkpoints / "step-0000006.ckpt").read_bytes()
    assert checkpoint_problem(checkpoints / "last.ckpt") is None
    (checkpoints / "step-0000006.ckpt").write_bytes(whole[: len(whole) // 2])
    fix = f"resume from the newest whole one beside it with ckpt_path={checkpoints / 'step-0000003.ckpt'}"

    again = Run(tmp_path, "again", "trainer.max_steps=9", "ckpt_path=last")
    assert again.finish() == 2
    err = again.err.read_text()
    assert err.count("\n") == 1 and err.startswith(f"train.py: error: ckpt_path=last: {checkpoints / 'last.ckpt'} "
                                                   "(-> step-0000006.ckpt) is not a whole checkpoint ("), err
    assert "cut off or damaged" in err and err.rstrip().endswith(fix), err
    assert run_folders(tmp_path) == [folder]

    # the same words in the run itself (ranks Lightning starts, a requeued job), and for an explicit path
    for content, why in ((b"", "an empty file"), (whole[:100], "cut off or damaged")):
        (checkpoints / "step-0000006.ckpt").write_bytes(content)
        for asked in ("last", str(checkpoints / "step-0000006.ckpt")):
            with pytest.raises(ConfigError, match=re.escape(why)) as err_info:
                resolve_ckpt_path(asked, folder)
            assert str(err_info.value).endswith(fix)
    (checkpoints / "step-0000006.ckpt").unlink()  # the link's step file gone: not a fresh start
    with pytest.raises(ConfigError, match=r"a link to a file that no longer exists\): resume from .*step-0000003"):
        resolve_ckpt_path("last", tmp_path / "runs" / "default" / "new")
    (checkpoints / "step-0000003.ckpt").write_bytes(b"PK")  # nothing whole beside it
    with pytest.raises(ConfigError, match="no whole checkpoint beside it; move the run folder aside"):
        resolve_ckpt_path("last", tmp_path / "runs" / "default" / "new")


def test_a_closed_terminal_saves_and_stops_and_nohup_keeps_the_run_going(tmp_path: Path) -> None:
    """Closing the terminal train.py runs in (a pty here, with its step bar) sends SIGHUP: the step is saved
    and the run stops with 129, though nothing can be printed any more (the bar's and the handler's writes
    would fail with EIO). Under nohup (SIGHUP ignored) the same signal changes nothing."""
    command = [sys.executable, str(REPO / "train.py"), f"paths.root={tmp_path}/runs", f"data.root={tmp_path}/data",
               "data.num_samples=64", "data.samples_per_shard=16", "data.batch_size=4", "data.shuffle_buffer=16",
               "callbacks.checkpoint.every_n_train_steps=10000", "callbacks.sample_images.every_n_steps=0",
               "trainer.log_every_n_steps=1", "+trainer.enable_model_summary=false", "trainer.max_steps=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    pid, terminal = pty.fork()
    if pid == 0:  # the child: train.py on the terminal, as typed there
        os.chdir(tmp_path)
        os.execve(command[0], command, env)
    shown = b""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not re.search(r"step [3-9]\d*/100000",
                                                           "".join(p.read_text() for p in tmp_path.glob("runs/default/*/train.log"))):
            if select.select([terminal], [], [], 0.1)[0]:
                shown += os.read(terminal, 65536)
    finally:
        os.close(terminal)  # the terminal closes
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP, shown[-2000:]
    (folder,) = run_folders(tmp_path)
    log = (folder / "train.log").read_text()
    match = re.search(r"SIGHUP at step (\d+): saved", log)
    assert match and step_of(folder / "checkpoints" / "last.ckpt") == int(match.group(1)) >= 3, log[-2000:]

    (tmp_path / "nohup").mkdir()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does before it runs the command
    try:
        nohup = Run(tmp_path / "nohup", "run", "trainer.max_steps=100000")  # inherits the ignored SIGHUP
    finally:
        signal.signal(signal.SIGHUP, previous)
    nohup.wait_for_step(2)
    nohup.proc.send_signal(signal.SIGHUP)
    at = max(int(s) for s in re.findall(r"step (\d+)/100000", nohup.out.read_text()))
    nohup.wait_for_step(at + 5)  # still training
    nohup.proc.send_signal(signal.SIGTERM)
    assert nohup.finish() == 128 + signal.SIGTERM
    assert "SIGHUP" not in nohup.text() and stopped_at(nohup.text(), "SIGTERM") >= at + 5


def test_a_signal_after_the_last_step_saves_it_then_one_during_the_final_sampling_stops_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """In-process (train() as the tests call it). A Ctrl-C while the final step's checkpoint is written does
    not cut it off (Lightning's KeyboardInterrupt would): the file is written, the run stops as on any step
    (Interrupted, no final sampling). One during the final sampling, the checkpoint on disk, stops at once
    (SignalExit, not Lightning's exit status 1); the handlers are the test process's own again afterwards."""
    from omegaconf import open_dict
    from test_train import QUIET, compose_train

    from ldm.cli.train import Interrupted, SignalExit, train
    from ldm.lightning import callbacks, interrupt

    steps = 6
    overrides = ["trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=4", "data.num_samples=16",
                 "data.samples_per_shard=8", "data.batch_size=4", "data.shuffle_buffer=8",
                 "callbacks.sample_images.steps=2", "callbacks.sample_images.every_n_steps=0",
                 "callbacks.throughput=null", "callbacks.lr_monitor=null", *QUIET]
    # the caller's own handler, known: an earlier in-process test of this worker may have left another in place
    before = signal.default_int_handler
    left = signal.signal(signal.SIGINT, before)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, left))

    save = interrupt.AtomicCheckpointIO.save_checkpoint

    def ctrl_c_while_writing(self, checkpoint, path, storage_options=None):  # noqa: ANN001
        if checkpoint.get("global_step") == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return save(self, checkpoint, path, storage_options)

    with monkeypatch.context() as patch:
        patch.setattr(interrupt.AtomicCheckpointIO, "save_checkpoint", ctrl_c_while_writing)
        with pytest.raises(Interrupted, match=f"stopped by SIGINT at step {steps} of {steps}"):
            train(compose_train(tmp_path, overrides, output_dir="${paths.root}/first"))
    first = tmp_path / "runs" / "first"
    assert step_of(first / "checkpoints" / "last.ckpt") == steps
    assert not list(first.rglob("*.png")) and not list(first.rglob(".*.partial-*"))
    assert signal.getsignal(signal.SIGINT) is before

    def ctrl_c_while_sampling(self, *args, **kwargs):  # noqa: ANN001
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        raise AssertionError("sampling went on after the Ctrl-C")

    monkeypatch.setattr(callbacks.SampleImages, "sample", ctrl_c_while_sampling)
    cfg = compose_train(tmp_path, overrides, output_dir="${paths.root}/second")
    with open_dict(cfg):
        cfg.callbacks.sample_images.on_train_end = True
    with pytest.raises(SignalExit, match=f"SIGINT after the final checkpoint \\(step {steps}\\): stopped"):
        train(cfg)
    assert step_of(tmp_path / "runs" / "second" / "checkpoints" / "last.ckpt") == steps
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_sample_py_stopped_between_images_keeps_whole_pngs_only(tmp_path: Path, hooks: dict[str, str], name: str) -> None:
    """Each PNG is written under a temporary name and renamed: stopped after the second of four images,
    the folder holds two whole PNGs, no partial one (named or hidden), and one line instead of a traceback."""
    from helpers import tiny_sd_file
    from PIL import Image

    ckpt = tiny_sd_file(tmp_path / "tiny.safetensors")
    out = tmp_path / "samples"
    proc = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), f"ckpt={ckpt}", "prompt=a red circle", "num_images=4", "batch_size=1",
         "steps=2", "grid=false", f"out_dir={out}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **hooks, "TEST_SIGNAL_AFTER_IMAGES": "2",
                           "TEST_SIGNAL": name}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + getattr(signal, name), proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.name != "sample.log") == ["00000.png", "00001.png"]
    for png in out.glob("*.png"):
        Image.open(png).load()
    assert re.search(rf"(?m)^sample\.py: {name}: stopped; 2 images written to {re.escape(str(out))}", proc.stderr)
    assert "Traceback" not in proc.stderr
