"""Save on interrupt: Ctrl-C (SIGINT), a preemption (SIGTERM), a time-limit warning (SIGUSR1; SIGUSR2
under submitit) or a closed terminal (SIGHUP; not under nohup, which ignores it) finishes the optimizer step in
flight, writes `last.ckpt`, and stops the run cleanly. A signal after the run's last step (during its final
checkpoint) stops it the same way, at that step; one after the final checkpoint is written stops it at once
(`ldm.cli.train.SignalExit`), with nothing left to save.

The signal handler only takes note. In multi-process runs the ranks tell each other at the end of each
optimizer step, without waiting: an all-reduce of one number over a CPU (gloo) group, started at the end
of step N and read at the end of step N+1, when it has long arrived; so all ranks stop together at the
step after the signal and write the checkpoint together (under FSDP each rank holds a shard of it). The
device is never involved, so the step does not wait for it. A single process stops at the signal's step. The checkpoint is written the way the
run's ModelCheckpoint writes its step files (`step-NNNNNNN.ckpt`, complete on disk before `last.ckpt`
points at it), so retention and `ckpt_path=last` treat it as any other. A second Ctrl-C exits at once,
removing the checkpoint file it was writing, if any.

Every checkpoint file is written by `AtomicCheckpointIO`: to a hidden `.NAME.partial-PID` beside it, flushed to
disk and renamed, so a file under a checkpoint's name is always whole, even after a SIGKILL (Lightning's own
writes go through a temporary file in the system's temp folder: a kill there leaves a checkpoint-sized file
in /tmp, and where /tmp is another filesystem the final copy is not atomic).

After a SIGUSR1 in a SLURM job (`#SBATCH --signal=USR1@90`) rank 0 requeues the job
(`scontrol requeue`), as Lightning's own SLURM handling does; the requeued job resumes from that
checkpoint in the same run folder (see ldm.cli.train). A handler that was there before (submitit's
SIGUSR2 time-limit handler, which requeues the job) runs after the checkpoint is written.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")

# Checkpoint files being written now (AtomicCheckpointIO): a second Ctrl-C removes them before it exits.
_IN_FLIGHT: set[Path] = set()


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `.NAME.partial-PID` beside the checkpoint, fsync, rename: never half a file under the
    checkpoint's name, and nothing left in the system's temp folder. Loading a file that is not a whole
    checkpoint says so in one line (ldm.checkpoint.CheckpointError), naming the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        _IN_FLIGHT.add(partial)
        try:
            with open(partial, "wb") as f:  # a new file's usual permissions (0644 under umask 022)
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
            _fsync_dir(target.parent)
        finally:
            _IN_FLIGHT.discard(partial)
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" not in str(path):
            from ldm.checkpoint import CheckpointError
            from ldm.cli.train import checkpoint_problem

            problem = checkpoint_problem(path)
            if problem is not None:
                raise CheckpointError(f"{path} is not a whole checkpoint ({problem})")
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=weights_only, **kwargs)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_checkpoints(folder: Path) -> list[Path]:
    """The `.NAME.partial-PID` files an interrupted write left in `folder` (a SIGKILL mid-write), removed."""
    removed = []
    for partial in folder.glob(".*.partial-*"):
        try:
            partial.unlink()
            removed.append(partial)
        except OSError as err:
            log.warning("could not remove %s: %s", partial, err)
    return removed


def _quiet_closed_terminal() -> None:
    """After SIGHUP (the terminal closed), writes to it fail (EIO) wherever they happen, the training loop's
    progress output included: point stdout and stderr at /dev/null instead. The run's train.log still logs."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for fd in (1, 2):
            try:
                if os.isatty(fd):
                    os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)


def _say(text: str) -> None:
    """One line to stderr from a signal handler: print, not log (logging's lock may be held), and a stderr
    that is gone (a closed terminal) must not raise into whatever code the signal interrupted."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def interrupted_by(trainer: Any) -> str | None:
    """The signal that stopped this run early (`"SIGTERM"`, ...), or None."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, SaveOnInterrupt) and callback.stopped_by:
            return callback.stopped_by
    return None


class SaveOnInterrupt(L.Callback):
    """Stop at the end of the current optimizer step when the process gets one of `signals`, with a
    checkpoint of that step; `stopped_by`, `stopped_at` and `checkpoint` say what happened. With
    `save_at_end`, a run that ends between two periodic checkpoints also saves its final step."""

    def __init__(
        self,
        signals: list[str] | tuple[str, ...] = SIGNALS,
        requeue_on: list[str] | tuple[str, ...] = ("SIGUSR1",),
        save_at_end: bool = True,
    ):
        unknown = [s for s in signals if not hasattr(signal, str(s))]
        if unknown:
            raise ValueError(f"SaveOnInterrupt: unknown signal(s) {unknown}; known: {list(SIGNALS)}")
        self.signals = [str(s) for s in signals]
        self.requeue_on = {str(s) for s in requeue_on}
        self.save_at_end = save_at_end
        self.requested: str | None = None  # a signal came; acted on at the next step boundary
        self.stopped_by: str | None = None
        self.stopped_at: int | None = None
        self.checkpoint: str | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = -1
        self._pid = os.getpid()  # data loader workers inherit the handler and must leave it to this process
        self._rank = 0
        self._group: Any = None  # the ranks' CPU group for the stop decision (multi-process runs)
        self._in_flight: tuple[Any, torch.Tensor] | None = None  # (work, flags) of the exchange under way
        self._finished = False  # on_train_end wrote the final checkpoint: a signal now stops the process

    # -- handlers ------------------------------------------------------------------------------------

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._pid = os.getpid()
        for name in self.signals:
            signum = getattr(signal, name)
            current = signal.getsignal(signum)
            if name == "SIGHUP" and current is signal.SIG_IGN:
                continue  # nohup: the user asked for the run to outlive the terminal
            if current != self._handle and signum not in self._previous:  # a bound method: a new object each time
                self._previous[signum] = current
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a data loader worker: the training process decides (and stops the workers)
        name = signal.Signals(signum).name
        if name == "SIGHUP":
            _quiet_closed_terminal()
        if self._finished:  # Lightning's teardown put this handler back after the final checkpoint
            from ldm.cli.train import SignalExit, _stop_phase

            raise SignalExit(name, _stop_phase[0])
        if self.requested is not None:
            if name == "SIGINT":  # a second Ctrl-C: the user does not want to wait
                for partial in list(_IN_FLIGHT):  # the checkpoint being written would never be whole
                    try:
                        partial.unlink(missing_ok=True)
                    except OSError:
                        pass
                if self._rank == 0:
                    _say("\ntrain.py: second interrupt: exiting now, without a checkpoint of this step")
                os._exit(128 + signum)
            return
        self.requested = name
        if self._rank != 0:
            return
        how = " (Ctrl-C again to exit at once)" if name == "SIGINT" else ""
        _say(f"\ntrain.py: {name}: finishing this step, then saving a checkpoint{how}")

    # -- Lightning hooks -----------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        # Before the data loader workers start: forked with this handler, a worker ignores the terminal's
        # Ctrl-C (which reaches the whole process group) instead of dying mid-epoch.
        if stage == "fit":
            self._finished = False
            self._rank = trainer.global_rank
            self._install()
            if trainer.world_size > 1 and dist.is_available() and dist.is_initialized() and self._group is None:
                # every rank runs setup: the group is made by all of them, as new_group needs
                self._group = dist.new_group(backend="gloo")

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._install()  # again: Lightning set its own SIGTERM/SIGUSR1 handlers after `setup`

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient accumulation window (or a skipped step): not a step boundary
        requested = self.requested is not None
        if trainer.world_size > 1:  # the same decision on every rank, or some would wait in a collective
            requested = self._exchange(requested)
        if requested:
            self._stop(trainer)

    def _exchange(self, requested: bool) -> bool:
        """Whether any rank had a signal at the previous step's end (read now, when it has arrived),
        sending this rank's news for the next step's end. The same answer on every rank at every step."""
        if self._group is None:  # no process group of our own (setup did not see one): ask now, and wait
            flags = torch.tensor([float(requested)])
            dist.all_reduce(flags)
            return bool(flags.numpy()[0] > 0)
        previous = self._finish_exchange()
        flags = torch.tensor([float(requested)])
        self._in_flight = (dist.all_reduce(flags, group=self._group, async_op=True), flags)
        return previous

    def _finish_exchange(self) -> bool:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return False
        work, flags = in_flight
        work.wait()
        return bool(flags.numpy()[0] > 0)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        # The last step's exchange: every rank ends at the same step, so all of them read it here, with a
        # signal that came after it (during the last step's checkpoint, or now). A signal in the run's last
        # step stops it as one in any other step would (the final checkpoint, "stopped by"), and so does one
        # that came after it: the final checkpoint is written (not cut off), then the run stops, unsampled.
        if self.stopped_by is None and self._signal_at_the_end(trainer):
            self._stop(trainer)
        if self.stopped_by is None and self.save_at_end and not getattr(pl_module, "stop_reason", None):
            ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
            if ckpt is not None and trainer.global_step > 0 and getattr(ckpt, "_last_global_step_saved", None) != trainer.global_step:
                # max_steps not a multiple of every_n_train_steps: Lightning would point last.ckpt (a link) at
                # the previous step file, and the run's last steps would be lost
                save_now(trainer)
            if trainer.world_size == 1 and self.requested is not None:  # it came during that write
                self.stopped_by, self.stopped_at = self.requested, trainer.global_step
                self.checkpoint = save_now(trainer)  # the path: this step is saved already
        self._restore()
        self._finished = True
        if self._pid == os.getpid():
            # The checkpoint of the last step is on disk: a signal from now on (during the final sampling)
            # stops the run where it is, saying so, instead of Lightning's "Detected KeyboardInterrupt" and exit 1
            from ldm.cli.train import install_stop_now, set_stop_phase

            set_stop_phase(f"after the final checkpoint (step {trainer.global_step})")
            self._previous.update(install_stop_now(self.signals))

    def _signal_at_the_end(self, trainer: L.Trainer) -> bool:
        """Whether a signal stops the run at its last step: the last step's exchange, and (every rank
        asked, as every rank is here) whether any rank had one since."""
        if trainer.world_size == 1:
            return self.requested is not None
        if not (dist.is_available() and dist.is_initialized()):
            return self._finish_exchange()
        previous = self._finish_exchange()
        flags = torch.tensor([float(self.requested is not None)])
        if self._group is None:
            dist.all_reduce(flags)
        else:
            dist.all_reduce(flags, group=self._group)
        return previous or bool(flags.numpy()[0] > 0)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._in_flight = None  # other ranks may not be there to finish it
        # Lightning's teardown, after this hook, puts back the handlers it found when training started (ours),
        # and no teardown hook of ours follows an exception: it is told the ones to put back instead.
        originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(originals, dict):
            for signum, handler in list(originals.items()):
                if handler == self._handle:
                    originals[signum] = self._previous.get(signum, signal.SIG_DFL)
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._restore()
        group, self._group = self._group, None
        if group is not None and self._in_flight is None and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError) as err:  # gone with the default group already
                log.debug("SaveOnInterrupt: %s", err)

    # -- the stop ------------------------------------------------------------------------------------

    def _stop(self, trainer: L.Trainer) -> None:
        self.stopped_by = self.requested or "a signal on another rank"
        self.stopped_at = trainer.global_step
        self.checkpoint = save_now(trainer)
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning("%s at step %d: saved %s", self.stopped_by, trainer.global_step, self.checkpoint)
        name = self.requested
        if name in self.requeue_on:
            requeue_slurm_job(trainer)
        previous = self._previous.get(getattr(signal, name)) if name else None
        if name not in ("SIGINT", "SIGTERM") and callable(previous) and not getattr(previous, "stops_now", False):
            # e.g. submitit's time-limit handler: it resubmits the job (and exits); the checkpoint is on disk
            self._restore()
            previous(getattr(signal, name), None)


def save_now(trainer: L.Trainer) -> str:
    """A checkpoint of this step, written as the run's ModelCheckpoint writes its step files, `last.ckpt`
    pointing at it once complete. Called on every rank (the save is collective). Returns last.ckpt's path."""
    ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    if ckpt is not None and hasattr(ckpt, "_save_topk_checkpoint") and hasattr(ckpt, "_save_last_checkpoint"):
        if getattr(ckpt, "_last_global_step_saved", None) != trainer.global_step:
            candidates = ckpt._monitor_candidates(trainer)
            ckpt._save_topk_checkpoint(trainer, candidates)
            if ckpt.save_last:
                ckpt._save_last_checkpoint(trainer, candidates)
        if ckpt.save_last and ckpt.dirpath:
            return str(Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}")
        return str(ckpt._last_checkpoint_saved or ckpt.dirpath)
    # No ModelCheckpoint in this run (callbacks.checkpoint=null): last.ckpt in the run folder's checkpoints/.
    target = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    partial = target.with_name(f".{target.name}.partial")
    if trainer.is_global_zero:
        target.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(partial)
    if trainer.is_global_zero:
        os.replace(partial, target)
    trainer.strategy.barrier("save_now")
    return str(target)


def requeue_slurm_job(trainer: L.Trainer | None) -> None:
    """`scontrol requeue` this SLURM job (rank 0 only), as Lightning's SLURM auto-requeue does. Without a
    trainer (train.py still starting), rank 0 is the process whose RANK (or SLURM_PROCID) is 0."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array_job else os.environ.get("SLURM_JOB_ID")
    rank_zero = trainer.is_global_zero if trainer is not None else \
        int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) == 0
    if not job or not rank_zero:
        return
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("not a SLURM job id: %r; not requeued", job)
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s: %s", job, err)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s: it resumes from the checkpoint just saved", job)
    else:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
