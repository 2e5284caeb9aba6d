"""Runs that survive people and clusters, through the real command line with output to files: Ctrl-C
(SIGINT), SIGTERM and SIGUSR1 mid-run leave a last.ckpt at the step reached; `ckpt_path=last` continues
it in the same run folder with one unbroken CSV step column; the log file holds a loss line every
`log_every_n_steps`; a second Ctrl-C exits at once; a SLURM job requeues itself and resumes."""

from __future__ import annotations

import csv
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EVERY = 5  # trainer.log_every_n_steps
TINY = [
    "data.num_samples=64", "data.samples_per_shard=16", "data.batch_size=4", "data.shuffle_buffer=16",
    "data.num_workers=0", f"trainer.log_every_n_steps={EVERY}", "callbacks.checkpoint.every_n_train_steps=10000",
    "callbacks.sample_images.every_n_steps=0", "callbacks.sample_images.steps=2", "+trainer.enable_model_summary=false",
]


class Run:
    """`python train.py ...` started in the background, stdout and stderr to files, under umask 022."""

    def __init__(self, tmp: Path, name: str, *overrides: str, env: dict[str, str] | None = None, new_session: bool = False):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        command = [sys.executable, str(REPO / "train.py"), f"paths.root={tmp}/runs", f"data.root={tmp}/data",
                   *TINY, *overrides]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(command, cwd=tmp, env=full_env, stdout=out, stderr=err,
                                         preexec_fn=lambda: os.umask(0o022), start_new_session=new_session)

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        """Until the log shows a step line at or past `step` (the run is mid-training)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = [int(s) for s in re.findall(r"step (\d+)/\d+ \(", self.out.read_text())]
            if steps and max(steps) >= step:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {self.proc.returncode}) before step {step}:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError(f"no step {step} within {timeout} s:\n{self.text()[-3000:]}")

    def finish(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.text()[-3000:]}") from None


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def run_folders(tmp: Path) -> list[Path]:
    return sorted(p for p in (tmp / "runs" / "default").iterdir() if p.is_dir())


def stopped_at(text: str, name: str) -> int:
    match = re.search(rf"stopped by {name} at step (\d+) of \d+; saved (\S+)", text)
    assert match, text[-3000:]
    return int(match.group(1))


def logged_steps(folder: Path) -> list[int]:
    with (folder / "csv" / "version_0" / "metrics.csv").open() as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")]


def assert_world_readable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"


def test_interrupted_runs_save_their_step_and_resume_in_their_own_folder(tmp_path: Path) -> None:
    """Ctrl-C, then SIGTERM of the resumed run, then the end: one folder, one unbroken step column."""
    first = Run(tmp_path, "first", "trainer.max_steps=100000")
    first.wait_for_step(3 * EVERY)
    first.proc.send_signal(signal.SIGINT)
    assert first.finish() == 128 + signal.SIGINT
    text = first.text()
    step = stopped_at(text, "SIGINT")
    (folder,) = run_folders(tmp_path)
    last = folder / "checkpoints" / "last.ckpt"
    assert step_of(last) == step >= 3 * EVERY
    assert "resume with: python train.py " in text and text.rstrip().endswith("ckpt_path=last")
    # the log in a file: a loss line at every log_every_n_steps up to the stop, in stdout and in train.log
    for log in (first.out.read_text(), (folder / "train.log").read_text()):
        lines = {int(s): line for s, line in re.findall(r"(?m)step (\d+)/100000 \(\d+%\)(.*)$", log)}
        assert set(range(EVERY, step + 1, EVERY)) <= set(lines), sorted(lines)
        assert all(re.search(r"loss \d+\.\d+  lr \S+  [\d.]+ img/s  ETA \S+  skipped 0", line) for line in lines.values())

    second = Run(tmp_path, "second", "trainer.max_steps=100000", "ckpt_path=last")
    second.wait_for_step(step + 2 * EVERY)
    second.proc.send_signal(signal.SIGTERM)
    assert second.finish() == 128 + signal.SIGTERM
    text = second.text()
    assert re.search(rf"resuming from \S+last.ckpt \(step {step}, saved \d+ s ago\), in its run folder {re.escape(str(folder))}", text)
    step2 = stopped_at(text, "SIGTERM")
    assert step_of(last) == step2 > step
    assert run_folders(tmp_path) == [folder]

    end = step2 + 3
    third = Run(tmp_path, "third", f"trainer.max_steps={end}", "ckpt_path=last")
    assert third.finish() == 0, third.text()[-3000:]
    assert run_folders(tmp_path) == [folder]
    assert step_of(last) == end
    steps = logged_steps(folder)  # every log_every_n_steps, never twice, never a gap, to the end
    assert steps[0] < EVERY and steps[-1] >= end - EVERY
    assert all(0 < b - a <= EVERY for a, b in zip(steps, steps[1:], strict=False)), steps
    with (folder / "csv" / "version_0" / "metrics.csv").open() as f:  # images/s, measured without a device sync
        rates = [float(r["throughput/images_per_sec"]) for r in csv.DictReader(f) if r.get("throughput/images_per_sec")]
    assert len(rates) >= len(steps) - 3 and all(r > 0 for r in rates)
    assert (folder / ".hydra" / "config.yaml").is_file() and len(list((folder / ".hydra").glob("resumed-*"))) == 2
    assert_world_readable(folder)  # files we write have the permissions of the user's umask (022)


def test_a_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    # sampling after every step makes each step long enough to press Ctrl-C twice within it
    run = Run(tmp_path, "run", "trainer.max_steps=100000", "trainer.log_every_n_steps=1",
              "callbacks.sample_images.every_n_steps=1", "callbacks.sample_images.steps=200", new_session=True)
    run.wait_for_step(2)
    os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
    time.sleep(0.3)
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish(timeout=30) == 128 + signal.SIGINT
    assert "second interrupt: exiting now" in run.text()
    assert not list(tmp_path.glob("runs/default/*/checkpoints/*.ckpt"))


def test_a_slurm_job_saves_on_its_time_limit_signal_requeues_and_resumes_in_its_folder(tmp_path: Path) -> None:
    """`#SBATCH --signal=USR1@90`: save, `scontrol requeue JOB`; the requeued job (SLURM_RESTART_COUNT=1)
    runs the same command again and resumes in the first attempt's run folder. Workers on (2)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    overrides = ("trainer.max_steps=100000", "data.num_workers=2")
    first = Run(tmp_path, "first", *overrides, env=env)
    first.wait_for_step(2 * EVERY)
    first.proc.send_signal(signal.SIGUSR1)
    assert first.finish() == 128 + signal.SIGUSR1
    step = stopped_at(first.text(), "SIGUSR1")
    assert calls.read_text().split() == ["requeue", "4242"]
    (folder,) = run_folders(tmp_path)

    again = Run(tmp_path, "again", *overrides[1:], f"trainer.max_steps={step + 2}",
                env={**env, "SLURM_RESTART_COUNT": "1"})
    assert again.finish() == 0, again.text()[-3000:]
    assert f"(step {step}, saved" in again.text()
    assert run_folders(tmp_path) == [folder]
    assert step_of(folder / "checkpoints" / "last.ckpt") == step + 2


FSDP_ON_CPU = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2")


@pytest.mark.parametrize(
    "strategy", [("trainer=ddp_cpu",), pytest.param(FSDP_ON_CPU, marks=pytest.mark.slow)], ids=["ddp", "fsdp"]
)
def test_two_processes_stop_together_on_a_sigterm_to_rank_zero_and_resume(tmp_path: Path, strategy: tuple[str, ...]) -> None:
    """DDP and FSDP (each rank holds a shard of the state: the checkpoint is written by all ranks together)."""
    first = Run(tmp_path, "first", *strategy, "trainer.max_steps=100000")
    first.wait_for_step(2 * EVERY)
    first.proc.send_signal(signal.SIGTERM)  # rank 0 only: rank 1 learns it at the step's end
    assert first.finish() == 128 + signal.SIGTERM
    step = stopped_at(first.text(), "SIGTERM")
    (folder,) = run_folders(tmp_path)
    assert step_of(folder / "checkpoints" / "last.ckpt") == step
    again = Run(tmp_path, "again", *strategy, f"trainer.max_steps={step + 2}", "ckpt_path=last")
    assert again.finish() == 0, again.text()[-3000:]
    assert run_folders(tmp_path) == [folder]
    assert step_of(folder / "checkpoints" / "last.ckpt") == step + 2
    steps = logged_steps(folder)
    assert all(0 < b - a <= EVERY for a, b in zip(steps, steps[1:], strict=False)), steps


def test_resuming_an_older_checkpoint_of_a_run_starts_a_new_folder(tmp_path: Path) -> None:
    from ldm.cli.train import resumes_in_place

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (10, 20):
        (checkpoints / f"step-{step:07d}.ckpt").write_bytes(b"x")
    (checkpoints / "last.ckpt").symlink_to("step-0000020.ckpt")
    assert resumes_in_place(checkpoints / "last.ckpt") == tmp_path / "run"
    assert resumes_in_place(checkpoints / "step-0000020.ckpt") == tmp_path / "run"
    assert resumes_in_place(checkpoints / "step-0000010.ckpt") is None  # its newer files stay untouched
    assert resumes_in_place(tmp_path / "elsewhere.ckpt") is None


def test_a_resumed_run_logs_to_the_same_wandb_run_and_hides_redone_tensorboard_steps(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from ldm.cli.train import build_loggers, wandb_run_id

    assert wandb_run_id(tmp_path) == wandb_run_id(tmp_path) == (tmp_path / "wandb" / "run-id").read_text().strip()
    cfg = OmegaConf.create({
        "paths": {"output_dir": str(tmp_path)},
        "logger": {
            "wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "offline": True, "save_dir": str(tmp_path),
                      "project": "ldm"},
            "tensorboard": {"_target_": "lightning.pytorch.loggers.TensorBoardLogger", "save_dir": str(tmp_path),
                            "version": 0},
        },
    })
    wandb, tensorboard = build_loggers(cfg, resume_step=40)
    assert wandb._wandb_init["id"] == wandb_run_id(tmp_path) and wandb._wandb_init["resume"] == "allow"
    assert tensorboard._kwargs["purge_step"] == 41


def test_the_progress_bar_counts_steps_out_of_max_steps(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ldm.lightning.progress import StepProgressBar, format_duration

    bar = StepProgressBar(only_on_terminal=False)
    trainer = SimpleNamespace(max_steps=50, global_step=20, is_global_zero=True)
    bar._trainer = trainer
    bar.on_train_start(trainer, None)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.initial) == (50, 20)  # not epochs of unknown length
    bar.train_progress_bar.close()
    assert not StepProgressBar().is_enabled  # pytest's stderr is not a terminal: StepLog's lines say it instead
    assert [format_duration(s) for s in (5, 272, 7300)] == ["5s", "4m32s", "2h01m"]


class SignalAt(L.Callback):
    """A test callback: this process sends itself `signal_name` at the end of optimizer step `step`."""

    def __init__(self, step: int, signal_name: str):
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_submitits_time_limit_handler_runs_after_the_checkpoint_is_written(tmp_path: Path) -> None:
    """Under submitit (hydra/launcher=slurm) SIGUSR2 is its time-limit signal: its handler resubmits the job.
    It must run after the step's checkpoint is on disk, so the requeued job resumes from it."""
    from omegaconf import open_dict
    from test_train import BARE, QUIET, compose_train

    from ldm.cli.train import Interrupted, train

    seen: list[int | None] = []

    def submitit_handler(signum: int, frame: object) -> None:
        last = next(tmp_path.glob("runs/run/checkpoints/last.ckpt"), None)
        seen.append(step_of(last) if last else None)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        cfg = compose_train(tmp_path, ["trainer.max_steps=50", "callbacks.checkpoint.every_n_train_steps=1000",
                                       *[o for o in BARE if "checkpoint" not in o], *QUIET])
        with open_dict(cfg):
            cfg.callbacks.signal_at = {"_target_": "test_interrupt.SignalAt", "step": 3, "signal_name": "SIGUSR2"}
        try:
            train(cfg)
        except Interrupted as stopped:
            # the signal comes after this step's check (callbacks run in order): the run stops at the next step
            assert (stopped.signal_name, stopped.step, stopped.exit_code) == ("SIGUSR2", 4, 128 + signal.SIGUSR2)
        else:
            raise AssertionError("the run did not stop on SIGUSR2")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [4]
