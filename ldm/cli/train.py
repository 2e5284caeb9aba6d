"""`python train.py [overrides]`: train or fine-tune a latent diffusion model.

    python train.py                                         # the demo: tiny model on synthetic shapes
    python train.py experiment=sd15_finetune init_from=sd15.safetensors data.train_shards='s3/{000..099}.tar'
    python train.py trainer=ddp trainer.devices=8           # one node, 8 GPUs
    python train.py trainer=ddp trainer.devices=8 trainer.num_nodes=4 hydra/launcher=slurm --multirun
    python train.py ckpt_path=last                          # resume the newest run of this run_name

`train(cfg)` is a plain function (tests call it with a composed config); `main` is the Hydra wrapper.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:  # imported where used: --help, --cfg job and config errors answer without them
    import lightning as L

log = logging.getLogger(__name__)

# Lightning warnings that are expected here: the frozen first stage and text encoder are in eval mode
# on purpose, and FLOPs per batch are not computed for the throughput monitor (samples/s still are). A run
# resumed in its own folder finds its checkpoints directory full, as it should.
for message in (r".*module\(s\) in eval mode.*", r".*`flops_per_batch`.*", r".*LeafSpec.*",
                r"Checkpoint directory .* exists and is not empty.*"):
    warnings.filterwarnings("ignore", message=message)

# Lightning decides when imported how its loggers print: with no handler on the root logger yet (as at
# this module's import, before Hydra sets up logging), `lightning.pytorch` and `lightning.fabric` print
# plain lines themselves and do not propagate. Lightning is imported once the job runs (`import_lightning`),
# after Hydra's logging; that decision is taken here, as when this module imported Lightning itself.
_LIGHTNING_OWN_CONSOLE = "lightning" not in sys.modules and not logging.getLogger().hasHandlers()


def import_lightning() -> Any:
    """`lightning`, imported when a job runs (not for --help, --cfg job or a config error), its loggers
    printing as if imported with this module: each message once on the console, not via Hydra's handlers."""
    first = "lightning" not in sys.modules
    import lightning

    if first and _LIGHTNING_OWN_CONSOLE:
        for name in ("lightning.fabric", "lightning.pytorch"):
            logger = logging.getLogger(name)
            if not logger.handlers:  # Lightning found Hydra's handlers on the root logger
                logger.addHandler(logging.StreamHandler())
                logger.propagate = False
    return lightning


class ConfigError(ValueError):
    """A training config that cannot run; raised before any training starts."""


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a whole checkpoint file (cut off mid-write, empty, not a checkpoint), or None. Cheap:
    torch.save writes a zip archive, whose directory is at its end, so a cut-off file has none; nothing
    but that directory is read. A file in torch's old (pre-zip) format is not checked."""
    import zipfile

    file = Path(path)
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(4)
    except OSError as err:
        return err.strerror or str(err)
    if size == 0:
        return "an empty file"
    if head[:1] == b"\x80" and head[:2] != b"PK":
        return None  # torch's legacy format: a pickle stream, no directory to check
    try:
        with zipfile.ZipFile(file) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a zip archive, but not one torch.save wrote"
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"{size} bytes, cut off or damaged: no archive directory at its end"
    return None


def step_files(folder: Path) -> list[Path]:
    """The step files of a run's checkpoints folder, newest step first."""
    return sorted(folder.glob("step-*.ckpt"), key=lambda p: p.name, reverse=True)


def check_resumable(ckpt: str | Path, what: str = "ckpt_path") -> None:
    """A checkpoint to resume from is a whole file, or ConfigError: one line naming the file, why, and what
    to pass instead (the newest whole step file beside it, if there is one)."""
    path = Path(ckpt)
    if path.suffix == ".safetensors" and path.is_file():  # a model's weights, as kohya's and diffusers' scripts take
        raise ConfigError(f"{what}={path} is a weights file, not a training checkpoint to resume (a run's "
                          f"checkpoints/last.ckpt): to start from its weights, pass init_from={path}")
    shown = f"{path} (-> {os.readlink(path)})" if path.is_symlink() else str(path)
    if path.is_symlink() and not path.exists():
        problem = "a link to a file that no longer exists"
    else:
        problem = checkpoint_problem(path)
    if problem is None:
        return
    real = path.resolve()
    whole = [p for p in step_files(path.parent) if p.resolve() != real and checkpoint_problem(p) is None]
    if whole:
        fix = f"resume from the newest whole one beside it with ckpt_path={whole[0]}"
    else:
        fix = "there is no whole checkpoint beside it; move the run folder aside to start over"
    raise ConfigError(f"{what}: {shown} is not a whole checkpoint ({problem}): {fix}")


class SignalExit(BaseException):
    """A signal that stops train.py where it is, when there is nothing to save: while it starts (before the
    first step) or after the final checkpoint is written. Not a KeyboardInterrupt, which Lightning would
    turn into its own message and exit status 1: the exit status is 128 + the signal's number."""

    def __init__(self, signal_name: str, when: str):
        self.signal_name, self.when = signal_name, when
        super().__init__(f"{signal_name} {when}: stopped")

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.signal_name))


STOP_NOW_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")
STARTING = "while starting (before the first step)"
_stop_phase = [STARTING]  # what SignalExit says; SaveOnInterrupt moves it on once the final checkpoint is written


def set_stop_phase(when: str) -> None:
    _stop_phase[0] = when


def install_stop_now(names: Any = STOP_NOW_SIGNALS) -> dict[int, Any]:
    """Handlers that raise SignalExit(name, <the run's phase>) in this process, for each signal whose handler
    is still the default (not one a launcher set, such as submitit's; not an ignored SIGHUP, as under nohup).
    Returns the handlers they replaced. Forked children (data loader workers) leave the signal to this process."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    pid = os.getpid()

    def stop_now(signum: int, frame: Any) -> None:
        if os.getpid() != pid:
            return
        name = signal.Signals(signum).name
        if name == "SIGHUP":
            from ldm.lightning.interrupt import _quiet_closed_terminal

            _quiet_closed_terminal()
        raise SignalExit(name, _stop_phase[0])

    stop_now.stops_now = True  # type: ignore[attr-defined]  # SaveOnInterrupt does not chain to it
    replaced = {}
    for name in names:
        signum = getattr(signal, str(name), None)
        if signum is None:
            continue
        current = signal.getsignal(signum)
        if current is signal.default_int_handler or current is signal.SIG_DFL or getattr(current, "stops_now", False):
            replaced[signum] = current
            signal.signal(signum, stop_now)
    return replaced


def newest_last_checkpoint(run_root: Path) -> Path | None:
    """The newest `last.ckpt` among the runs of one run_name: single runs (`<time>/`) and the jobs of
    multiruns, such as SLURM launches (`multirun-<time>/<job>/`)."""
    found = [*run_root.glob("*/checkpoints/last.ckpt"), *run_root.glob("multirun-*/*/checkpoints/last.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def latest_checkpoint(run_name: str, root: str = "outputs") -> str:
    """`${latest_ckpt:RUN}` in a config: the newest `last.ckpt` of an earlier run, e.g. a trained autoencoder."""
    newest = newest_last_checkpoint(Path(root) / run_name)
    if newest is None:
        raise ConfigError(
            f"no checkpoint of run {run_name!r} under {root}/{run_name}/*/checkpoints/last.ckpt; "
            f"train it first (python train.py experiment={run_name}) or give the path explicitly"
        )
    return str(newest)


def gpus_per_node(accelerator: str, devices: Any) -> Any:
    """`${gpus_per_node:ACCELERATOR,DEVICES}` for the SLURM launcher: a CPU job asks SLURM for no GPUs."""
    return None if str(accelerator) == "cpu" else devices


def demo_variant(concat: str | None) -> str:
    """`${demo_variant:CONCAT}`: the synthetic shapes data that trains a model of each concat kind."""
    variants = {None: "caption", "image": "edit", "semantic_map": "semantic", "inpainting": "caption"}
    if concat not in variants:
        raise ConfigError(f"model.concat={concat!r} is not one of {list(variants)}")
    return variants[concat]


def on_gpu(accelerator: str) -> bool:
    """`${on_gpu:${trainer.accelerator}}`: GPU-only speed options (compile, channels-last) follow the trainer."""
    return str(accelerator) not in ("cpu", "mps")


OmegaConf.register_new_resolver("latest_ckpt", latest_checkpoint, replace=True)
OmegaConf.register_new_resolver("on_gpu", on_gpu, replace=True)
OmegaConf.register_new_resolver("demo_variant", demo_variant, replace=True)
OmegaConf.register_new_resolver("gpus_per_node", gpus_per_node, replace=True)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` means the newest `checkpoints/last.ckpt` among this run_name's runs (the folders beside
    this run's `output_dir`, or beside its multirun's)."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        runs_root = output_dir.parent
        if runs_root.name.startswith("multirun-"):
            runs_root = runs_root.parent
        newest = newest_last_checkpoint(runs_root)
        broken = broken_last_links(runs_root, newer_than=newest)
        if broken:  # the newest run's last.ckpt lost its step file: starting over would lose the run
            check_resumable(broken[0], "ckpt_path=last")
        if newest is None:
            # As Lightning's own ckpt_path="last": job scripts on preemptible machines pass it every time.
            log.warning("ckpt_path=last: no checkpoints/last.ckpt under %s/* yet; starting fresh", runs_root)
            return None
        check_resumable(newest, "ckpt_path=last")
        return str(newest)
    if Path(ckpt_path).is_dir():
        folder = Path(ckpt_path)  # a run's folder, its checkpoints folder, or a run_name's folder of runs
        found = [*folder.glob("last.ckpt"), *folder.glob("checkpoints/last.ckpt"), *folder.glob("*/checkpoints/last.ckpt")]
        last = max(found, key=os.path.getmtime, default=None)
        hint = f"ckpt_path={last}" if last else "its checkpoints/last.ckpt"
        raise ConfigError(f"ckpt_path={ckpt_path} is a folder: give a checkpoint file ({hint}), or ckpt_path=last "
                          "for the newest run of the run_name")
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist")
    check_resumable(ckpt_path)
    return ckpt_path


def broken_last_links(run_root: Path, newer_than: Path | None = None) -> list[Path]:
    """`last.ckpt` links among the runs of one run_name whose step file is gone, newest first (only those
    newer than `newer_than`, the newest whole one)."""
    found = [*run_root.glob("*/checkpoints"), *run_root.glob("multirun-*/*/checkpoints")]
    links = [d / "last.ckpt" for d in found if (d / "last.ckpt").is_symlink() and not (d / "last.ckpt").exists()]
    floor = newer_than.lstat().st_mtime if newer_than is not None else float("-inf")
    return sorted((p for p in links if p.lstat().st_mtime > floor), key=lambda p: p.lstat().st_mtime, reverse=True)


def requeued_resume_path(output_dir: Path) -> str | None:
    """A job SLURM requeued (after a time limit or a preemption) runs again in its own run folder: it
    picks up from the last.ckpt it wrote there instead of starting over."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    last = output_dir / "checkpoints" / "last.ckpt"
    if restarts >= 1 and last.is_symlink() and not last.exists():
        # last.ckpt links to the newest step file (save_last: link); starting over would lose the run
        raise ConfigError(
            f"SLURM restart {restarts}: {last} links to {os.readlink(last)}, which no longer exists; "
            "restore it, or pass ckpt_path= an existing checkpoint of this run"
        )
    if restarts < 1 or not last.is_file():
        return None
    check_resumable(last, f"SLURM restart {restarts}: its last.ckpt")
    log.warning("SLURM restart %d of this job: resuming from %s", restarts, last)
    return str(last)


def run_folder(ckpt: str | Path) -> Path | None:
    """The run folder a checkpoint of ours lives in (`<run>/checkpoints/<file>`), or None."""
    path = Path(ckpt).absolute()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def resumes_in_place(ckpt: str | Path) -> Path | None:
    """The run folder a resumed run continues in: the checkpoint's own, when it is that run's newest (its
    `last.ckpt`, or the step file last.ckpt points at). Resuming an older step file of a run starts a new
    folder, so the newer checkpoints and logs of that run are not overwritten."""
    run = run_folder(ckpt)
    if run is None:
        return None
    last = run / "checkpoints" / "last.ckpt"
    try:
        return run if last.exists() and Path(ckpt).resolve() == last.resolve() else None
    except OSError:
        return None


def checkpoint_step(path: str | Path) -> int | None:
    """The global step a checkpoint of ours was saved at: from its step file's name (last.ckpt links to
    one), else from the file itself (memory-mapped: the weights are not read)."""
    real = Path(path).resolve()
    match = re.fullmatch(r"step-(\d+)\.ckpt", real.name)
    if match:
        return int(match.group(1))
    try:
        import torch

        # weights_only: naming a step must not run a pickle's code (Lightning unpickles the checkpoint itself
        # when it resumes); a file that needs more just has no step to name
        step = torch.load(real, map_location="cpu", mmap=True, weights_only=True).get("global_step")
        return None if step is None else int(step)
    except Exception:
        return None


def age(path: str | Path) -> str:
    seconds = max(time.time() - Path(path).stat().st_mtime, 0)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return f"{int(seconds)} s ago"


def slurm_run_folder(run_root: Path) -> Path | None:
    """A requeued SLURM job's own run folder (it wrote SLURM_JOB_ID into `slurm_job_id` there)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    for marker in [*run_root.glob("*/slurm_job_id"), *run_root.glob("multirun-*/*/slurm_job_id")]:
        try:
            if marker.read_text().strip() == job:
                return marker.parent
        except OSError:
            continue
    return None


def resume_overrides(args: list[str]) -> list[str]:
    """`hydra.run.dir=` the folder of the run being resumed, so a resumed run continues in its own folder:
    Hydra's train.log and this start's config (in `.hydra/resumed-<time>/`) land beside the earlier ones.
    For `ckpt_path=last` (or a run's newest checkpoint), and for a requeued SLURM job."""
    from ldm.cli.checks import NO_PRECHECK_FLAGS
    from ldm.cli.overrides import hydra_quote

    if any(a in NO_PRECHECK_FLAGS or a.startswith("--cfg") or a in ("-c", "--info") for a in args):
        return []
    keys = {a.partition("=")[0].lstrip("+~"): a.partition("=")[2] for a in args if "=" in a}
    if "hydra.run.dir" in keys:  # chosen by the user, or by Lightning for a DDP rank it starts
        return []
    ckpt = keys.get("ckpt_path")
    if not ckpt and not os.environ.get("SLURM_JOB_ID") or keys.get("resume_in_place") == "false":
        return []
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ldm.cli.checks import CONF

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[a for a in args if "=" in a and not a.startswith("-")])
        run_root = Path(OmegaConf.select(cfg, "paths.root")) / str(cfg.run_name)
        ckpt = cfg.get("ckpt_path")
        if not cfg.get("resume_in_place", True):
            return []
    except Exception:
        return []  # Hydra says what is wrong when it composes the same command line
    run = None
    from ldm.cli.checks import ConfigProblem

    try:  # a checkpoint that cannot be resumed is said now, before Hydra makes a run folder for the attempt
        if ckpt == "last":
            newest = newest_last_checkpoint(run_root)
            broken = broken_last_links(run_root, newer_than=newest)
            if broken:
                check_resumable(broken[0], "ckpt_path=last")
            if newest is not None:
                check_resumable(newest, "ckpt_path=last")
        elif ckpt and Path(ckpt).is_file():
            check_resumable(ckpt)
    except ConfigError as err:
        raise ConfigProblem(str(err)) from None
    if ckpt == "last":
        newest = newest_last_checkpoint(run_root)
        run = resumes_in_place(newest) if newest else None
    elif ckpt:
        run = resumes_in_place(ckpt) if Path(ckpt).is_file() else None
    else:
        folder = slurm_run_folder(run_root)
        run = folder if folder is not None and (folder / "checkpoints" / "last.ckpt").is_file() else None
    if run is None:
        return []
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [f"hydra.run.dir={hydra_quote(str(run))}", f"hydra.output_subdir=.hydra/resumed-{stamp}"]


def describe_resume(ckpt_path: str, in_place: Path | None) -> str:
    step = checkpoint_step(ckpt_path)
    at = f"step {step}" if step is not None else "its step"
    where = f"in its run folder {in_place}" if in_place else "in a new run folder"
    return f"resuming from {ckpt_path} ({at}, saved {age(ckpt_path)}), {where}"


class Interrupted(Exception):
    """The run stopped early on a signal, with a checkpoint of the step it reached."""

    def __init__(self, signal_name: str, step: int, max_steps: int | None, checkpoint: str | None):
        self.signal_name, self.step, self.max_steps, self.checkpoint = signal_name, step, max_steps, checkpoint
        of = f" of {max_steps}" if max_steps else ""
        super().__init__(f"stopped by {signal_name} at step {step}{of}; saved {checkpoint}")

    @property
    def exit_code(self) -> int:
        import signal

        signum = getattr(signal, self.signal_name, None)
        return 128 + int(signum) if signum is not None else 1


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[L.Callback]:
    callbacks = []
    for c in (cfg.get("callbacks") or {}).values():
        if c is None:
            continue
        target = str(c.get("_target_", ""))
        if not has_logger and target.endswith("LearningRateMonitor"):
            continue  # it has nowhere to write with logger=none, and Lightning would refuse to start
        if target.endswith("ProgressBar") and not cfg.trainer.get("enable_progress_bar", True):
            continue  # Lightning refuses a progress bar callback with enable_progress_bar=false
        callbacks.append(instantiate(c))
    return callbacks


def wandb_has_credentials() -> bool:
    """Whether wandb could log in without asking: an API key in the environment or from `wandb login`."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_run_id(output_dir: Path) -> str:
    """One wandb run id per run folder (kept in `<run>/wandb/run-id`): a resumed run logs to the same run."""
    path = output_dir / "wandb" / "run-id"
    try:
        return path.read_text().strip()
    except OSError:
        import secrets

        run_id = secrets.token_hex(4)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
        return run_id


def build_loggers(cfg: DictConfig, resume_step: int | None = None) -> list[Any]:
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if c is None:
            continue
        target = str(c.get("_target_", ""))
        if target.endswith("WandbLogger") and not c.get("id") and not c.get("version"):
            with open_dict(c):
                c.id = wandb_run_id(Path(cfg.paths.output_dir))
                c.setdefault("resume", "allow")
        if target.endswith("TensorBoardLogger") and resume_step is not None and "purge_step" not in c:
            with open_dict(c):  # TensorBoard hides what the first start logged after the checkpoint
                c.purge_step = resume_step + 1
        if str(c.get("_target_", "")).endswith("WandbLogger") and not c.get("offline"):
            online_mode = os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun")
            if online_mode and not wandb_has_credentials():
                # A small machine, a first try: no account yet. Log offline instead of stopping at a prompt.
                with open_dict(c):
                    c.offline = True
                log.warning(
                    "wandb: no API key (neither WANDB_API_KEY nor `wandb login`): logging offline to %s/wandb; "
                    "upload it later with `wandb sync %s/wandb/offline-run-*`",
                    c.get("save_dir"),
                    c.get("save_dir"),
                )
        loggers.append(instantiate(c))
    return loggers


def missing_values(cfg: DictConfig) -> list[str]:
    """Dotted keys still `???`, found without resolving (OmegaConf.missing_keys stops at the first
    interpolation that points at one, e.g. `module.init_from: ${init_from}`), and the keys a recipe lists in
    `required` that are still null or empty. A recipe cannot say `init_from: ???`: train.yaml's `init_from:
    null` comes first, and OmegaConf keeps a value that a later `???` is merged onto."""

    def walk(node: Any, key: str) -> list[str]:
        if isinstance(node, dict | list):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            return [m for k, v in items for m in walk(v, f"{key}.{k}" if key else str(k))]
        return [key] if node == "???" else []

    raw = OmegaConf.to_container(cfg, resolve=False)
    missing = walk(raw, "")
    for key in map(str, raw.get("required") or []):
        # init_from=X or module.init_from=X (what the top-level key feeds): either gives it
        given = [OmegaConf.select(cfg, k, default=None, throw_on_missing=False) for k in (key, f"module.{key}")]
        if all(value is None or value == "" for value in given) and key not in missing:
            missing.append(key)
    return missing


NO_GPU = ("{cause} torch sees no GPU here: train on the CPU with trainer=cpu (recipes that pick trainer=gpu take "
          "trainer=cpu too), or run on a machine with a CUDA GPU")


def check_config(cfg: DictConfig) -> None:
    missing = missing_values(cfg)
    if missing:
        raise ConfigError(
            f"missing mandatory value(s): {', '.join(missing)}; set them on the command line, "
            f"e.g. python train.py {missing[0]}=..."
        )
    accelerator = str((cfg.get("trainer") or {}).get("accelerator", ""))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():  # said before a model, a logger or a wandb run is made
            raise ConfigError(NO_GPU.format(cause=f"trainer.accelerator={accelerator}, but"))
    lora = cfg.module.get("lora")
    if isinstance(lora, DictConfig) and lora.get("text_encoder") not in (None, False) and cfg.module.get("train_text_encoder"):
        raise ConfigError(
            "module.lora.text_encoder and module.train_text_encoder=true both train the text encoder: set one "
            "(LoRA adapters of the frozen encoder, or the whole encoder)"
        )
    text_encoder = cfg.module.get("text_encoder")
    if text_encoder is not None:
        from ldm.lightning.module import text_encoder_settings

        try:  # said before a model is built (the module says it too)
            text_encoder_settings(OmegaConf.to_container(text_encoder, resolve=True), bool(cfg.module.get("train_text_encoder")))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    data = cfg.get("data") or {}
    if str(data.get("_target_", "")).endswith("DreamBoothDataModule") and data.get("class_prompt") \
            and not cfg.module.get("init_from"):
        # said here, before a model is built (the data module says it too, at setup)
        from ldm.data.dreambooth import NO_BASE

        raise ConfigError(NO_BASE)
    if not cfg.module.get("init_from"):  # else the architecture is the checkpoint's: checked once built
        check_resolution(cfg.model, cfg.data.get("resolution"), bucket_step=bucket_step(cfg))


def bucket_step(cfg: DictConfig) -> int | None:
    """data.bucket_step when aspect-ratio buckets are on (every bucket's sides are multiples of it)."""
    return cfg.data.get("bucket_step") if cfg.data.get("buckets") and not cfg.data.get("latents") else None


def latent_multiple(model: Any) -> tuple[int, int, int]:
    """The pixel multiple every image side must be for `model` (its config), with the autoencoder's
    downsampling factor and the UNet's number of levels that make it."""
    from ldm.models.stable_diffusion import downsampling_factor

    factor = downsampling_factor(model["first_stage"])
    levels = len(model["unet"]["channel_mult"])
    # The latent must halve cleanly at every UNet level, or skip connections do not line up.
    return factor * 2 ** (levels - 1), factor, levels


def check_resolution(
    model: Any, resolution: int | None, source: str = "this model", bucket_step: int | None = None
) -> None:
    multiple, factor, levels = latent_multiple(model)
    if resolution is not None and resolution % multiple:
        raise ConfigError(
            f"data.resolution={resolution} cannot go through {source}: it must be a multiple of "
            f"{multiple} (autoencoder downsampling {factor} x UNet levels {levels})"
        )
    if bucket_step is not None and bucket_step % multiple:
        raise ConfigError(
            f"data.bucket_step={bucket_step} cannot go through {source}: bucket sides must be multiples of "
            f"{multiple} (autoencoder downsampling {factor} x UNet levels {levels}); set data.bucket_step to a "
            f"multiple of {multiple}"
        )


def check_cached_latents(datamodule: Any, module: Any) -> None:
    """Latent shards must come from this model's autoencoder, at the configured resolution; flipped only if
    cached with --flip; cached text contexts only from this model's text encoder, which must not train."""
    if not getattr(datamodule, "latents", False) or not hasattr(module, "first_stage_model"):
        return
    from ldm.data.cache_latents import fingerprint
    from ldm.data.webdataset import expand_shard_specs, read_cache_info, uses_cached_text

    if getattr(datamodule, "random_crop", False):
        raise ConfigError(
            "data.random_crop=true but data.train_shards hold cached latents, whose crops were fixed when they were "
            "encoded (one crop a picture): set data.random_crop=false, or train on the image shards (data=webdataset)"
        )
    try:
        info = read_cache_info(expand_shard_specs(datamodule.train_shards))
    except ValueError as err:  # e.g. a cache an interrupt cut off
        raise ConfigError(str(err)) from None
    if info is None:
        if getattr(datamodule, "cached_text", None):
            raise ConfigError(
                "data.cached_text=true but data.train_shards have no cache.json beside them (it names the empty "
                "prompt's context): cache them with ldm-cache-latents --text, or set data.cached_text=null"
            )
        log.warning("data.train_shards have no cache.json beside them: cannot check which autoencoder made them")
        return
    how = "re-run ldm-cache-latents with the checkpoint you train from (init_from or module.first_stage_ckpt)"
    if info["first_stage_fingerprint"] != fingerprint(module.first_stage_model):
        raise ConfigError(f"data.train_shards were cached with another autoencoder ({info['checkpoint']}); {how}")
    if getattr(datamodule, "random_flip", False) and not info.get("flip"):
        raise ConfigError(
            "data.random_flip=true but data.train_shards were cached without --flip (only each picture's plain "
            "crop was encoded): re-run ldm-cache-latents with --flip, or set data.random_flip=false"
        )
    try:
        text = uses_cached_text(getattr(datamodule, "cached_text", None), info)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if text:
        check_cached_text(info, module)
    for key in ("cond_image_key", "seg_key"):
        if getattr(datamodule, key, None) and not info.get(key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"data.{key} is set but data.train_shards were cached without it: re-run ldm-cache-latents "
                f"with {flag} {getattr(datamodule, key)}"
            )
    if info.get("buckets") and not getattr(datamodule, "buckets", False):
        raise ConfigError(
            "data.train_shards were cached with --buckets (latents of several shapes): train on them with "
            "data.buckets=true, or cache again without --buckets"
        )
    step = (info.get("buckets") or {}).get("step")
    multiple, factor, levels = latent_multiple(module.config)
    if step is not None and step % multiple:
        raise ConfigError(
            f"data.train_shards were cached with --bucket-step {step}, but this model's bucket sides must be "
            f"multiples of {multiple} (autoencoder downsampling {factor} x UNet levels {levels}): cache again with "
            f"--bucket-step {multiple} (or a multiple of it)"
        )
    if info["resolution"] != datamodule.resolution:
        raise ConfigError(
            f"data.train_shards were cached at resolution {info['resolution']}, data.resolution is "
            f"{datamodule.resolution}: set data.resolution={info['resolution']} or cache again"
        )


def check_cached_text(info: dict[str, Any], module: Any) -> None:
    """Text contexts cached with --text stand in for this model's text encoder: the same weights and token
    length, and an encoder that does not train."""
    from ldm.data.cache_latents import fingerprint
    from ldm.lightning.module import cached_text_conflict

    conflict = cached_text_conflict(module)
    if conflict:
        raise ConfigError(conflict)
    text, encoder = info["text"], module.cond_stage_model
    if text["text_encoder_fingerprint"] != fingerprint(encoder):
        raise ConfigError(
            f"data.train_shards hold text contexts cached with another text encoder ({info['checkpoint']}): re-run "
            "ldm-cache-latents --text with the checkpoint you train from (init_from), or set data.cached_text=false "
            "to encode the captions with this model's"
        )
    length = getattr(getattr(encoder, "tokenizer", None), "max_length", None)
    if length is not None and text.get("max_length") != length:
        raise ConfigError(
            f"data.train_shards hold text contexts of {text.get('max_length')} tokens, this model's tokenizer gives "
            f"{length}: re-run ldm-cache-latents --text with the checkpoint you train from, or set data.cached_text=false"
        )


# What each concat kind needs from the data (see ldm.models.stable_diffusion.CONCAT_KINDS).
_DATA_FOR_CONCAT = {
    "image": ("cond_image_key", "before/after pairs: set data.cond_image_key to the before picture's key (e.g. src.jpg)"),
    "semantic_map": ("seg_key", "class maps: set data.seg_key to the map's key (e.g. seg.png)"),
}


def check_conditioning_data(datamodule: Any, module: Any) -> None:
    """A conditioned model's data must carry its inputs: said before training, not at the first step."""
    kind = getattr(module, "concat", None)
    if kind not in _DATA_FOR_CONCAT or not hasattr(datamodule, "cond_image_key"):
        return
    key, how = _DATA_FOR_CONCAT[kind]
    if not getattr(datamodule, key):
        raise ConfigError(f"a {kind} model (model.concat={kind}) trains on {how}")
    if kind == "semantic_map" and datamodule.num_classes not in (None, module.config["semantic_classes"]):
        raise ConfigError(
            f"data.num_classes={datamodule.num_classes} but model.semantic_classes={module.config['semantic_classes']}"
        )


def checkpoint_io_plugin(cfg: DictConfig) -> dict[str, Any]:
    """`plugins=` for the Trainer: checkpoint files written whole or not at all (AtomicCheckpointIO), unless
    the trainer config brings a CheckpointIO of its own."""
    from lightning.fabric.plugins import CheckpointIO

    from ldm.lightning.interrupt import AtomicCheckpointIO

    given = cfg.trainer.get("plugins")
    if given is None:
        return {"plugins": [AtomicCheckpointIO()]}
    plugins = instantiate(given)
    plugins = list(plugins) if isinstance(plugins, list | tuple) or OmegaConf.is_list(plugins) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return {"plugins": plugins}


def enable_validation(cfg: DictConfig) -> None:
    """With `data.val_shards`, `val/loss` every `trainer.val_check_interval` steps (500 unless given) over
    all of them (`trainer.limit_val_batches=N` caps it); without, no validation loop at all."""
    if not cfg.data.get("val_shards"):
        return
    with open_dict(cfg):
        if not cfg.trainer.get("limit_val_batches"):
            cfg.trainer.limit_val_batches = 1.0
        cfg.trainer.val_check_interval = int(cfg.trainer.get("val_check_interval") or 500)
        cfg.trainer.check_val_every_n_epoch = None  # by steps: a stream's epochs have no known length
    log.info("validation: val/loss on data.val_shards every %d steps (trainer.val_check_interval)",
             cfg.trainer.val_check_interval)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured module; returns the final logged metrics."""
    L = import_lightning()
    from ldm.lightning.module import NonFiniteLossError

    set_stop_phase(STARTING)
    check_config(cfg)
    enable_validation(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir) or requeued_resume_path(output_dir)
    resume_step = None
    if ckpt_path:
        in_place = resumes_in_place(ckpt_path) if cfg.get("resume_in_place", True) else None
        if in_place is not None and in_place.resolve() != output_dir.resolve():
            with open_dict(cfg):  # one run, one folder: checkpoints, logs and samples continue there
                cfg.paths.output_dir = str(in_place)
            output_dir = in_place
        resume_step = checkpoint_step(ckpt_path)
        log.info(describe_resume(ckpt_path, in_place))
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) == 0:
        output_dir.mkdir(parents=True, exist_ok=True)  # a requeued job finds its own run folder by this
        (output_dir / "slurm_job_id").write_text(os.environ["SLURM_JOB_ID"] + "\n")
    datamodule = instantiate(cfg.data)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_", None)
    module = instantiate(cfg.module, model=model_cfg, _convert_="all")
    if cfg.module.get("init_from") and isinstance(getattr(module, "config", None), dict) and "unet" in module.config:
        check_resolution(module.config, cfg.data.get("resolution"), f"the model in init_from={cfg.module.init_from}",
                         bucket_step(cfg))
    loggers = build_loggers(cfg, resume_step)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    check_cached_latents(datamodule, module)
    check_conditioning_data(datamodule, module)
    if ckpt_path and int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) == 0:
        from ldm.lightning.interrupt import remove_partial_checkpoints

        for partial in remove_partial_checkpoints(Path(ckpt_path).parent):
            log.warning("removed %s: a checkpoint write cut off by a kill (the run resumes from the one before)", partial)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=build_callbacks(cfg, bool(loggers)), logger=loggers or False, default_root_dir=str(output_dir),
        **checkpoint_io_plugin(cfg),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    from ldm.lightning.interrupt import SaveOnInterrupt

    stopper = next((c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt) and c.stopped_by), None)
    if getattr(module, "stop_reason", None):
        path = output_dir / "checkpoints" / "last-good.ckpt"
        trainer.save_checkpoint(path)
        raise NonFiniteLossError(f"stopped: {module.stop_reason}. Last good state: {path}")
    if getattr(module, "lora", None) is not None and trainer.is_global_zero:
        from ldm.lora import save_kohya

        # One file: the UNet's adapters (lora_unet_*) and the text encoder's when they trained (lora_te_*)
        unet_part = module.lora if len(module.lora.adapters) else None
        text_part = getattr(module, "text_lora", None)
        if unet_part is not None or text_part is not None:
            save_kohya(unet_part, module.config["unet"], output_dir / "lora.safetensors", text_lora=text_part)
            log.info("LoRA weights: %s (sample.py ckpt=<base> lora=...)", output_dir / "lora.safetensors")
        if getattr(module, "train_text_encoder", False):
            log.warning("lora.safetensors holds the UNet's adapters only; the trained text encoder is in the checkpoint "
                        "(module.lora.text_encoder trains text-encoder adapters that go in the file)")
    if stopper is not None:
        raise Interrupted(stopper.stopped_by, trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else None,
                          stopper.checkpoint)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        log.info("finished at step %d: %s", trainer.global_step, metrics)
    return metrics


def user_error(err: BaseException) -> BaseException | None:
    """The error to show alone, without a traceback, when it is bad input the message explains: a config
    problem, a missing file, or an argument a constructor refused (Hydra wraps those)."""
    if isinstance(err, InstantiationException) and isinstance(err.__cause__, ValueError | FileNotFoundError):
        return err.__cause__
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ldm.checkpoint import CheckpointError
    from ldm.cli.sample import UsageError
    from ldm.metrics import MetricError

    # UsageError and MetricError: a training-time evaluation's settings (callbacks/evaluate), checked when the
    # callback sets up inside trainer.fit, use ldm-eval's own words
    resolving = re.match(r"(ConfigError|CheckpointError|UsageError) raised while resolving interpolation: ", str(err))
    if isinstance(err, OmegaConfBaseException) and resolving:  # our own resolver's words, without OmegaConf's
        return ConfigError(str(err)[resolving.end() :].split("\n")[0])
    if isinstance(err, ConfigError | CheckpointError | FileNotFoundError | OmegaConfBaseException | UsageError
                  | MetricError):
        return err
    if isinstance(err, ValueError) and raised_in_ldm(err):
        return err  # our own check inside trainer.fit (the data module's setup: too few shards for the ranks, ...)
    if isinstance(err, MisconfigurationException | InstantiationException) and isinstance(
        err.__cause__ or err, MisconfigurationException
    ):
        cause = err.__cause__ or err  # Lightning's word on a trainer setting
        if "gpu backend" in str(cause).lower() or "cuda" in str(cause).lower() and "not available" in str(cause).lower():
            return ConfigError(NO_GPU.format(cause=cause))
        return cause
    return None


def raised_in_ldm(err: BaseException) -> bool:
    """Whether `err` was raised by this package's own code (its traceback ends in a frame of ldm/): a check of
    ours with its message, not a failure deep inside torch or another library, whose traceback is shown."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).resolve().parents[1])


def explicit_prediction_type(cfg: DictConfig, overrides: list[str]) -> None:
    """`model.prediction_type=X` typed on the command line is the user's choice, as `prediction_type=X` is
    (a model group's value is only a default, which a checkpoint's own record overrides)."""
    if cfg.get("prediction_type") is not None:
        return
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "model.prediction_type" and value:
            with open_dict(cfg):
                cfg.prediction_type = value


def resume_command(overrides: list[str]) -> str:
    """The command that resumes this run in its folder: what was typed, with ckpt_path=last."""
    import shlex

    kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")
            and not o.startswith("hydra.output_subdir=")]
    return shlex.join(["python", "train.py", *kept, "ckpt_path=last"])


def say(text: str) -> None:
    """A line to stderr that a closed terminal (after SIGHUP) does not turn into a traceback."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def main() -> None:
    """The console entry point: the command line as typed (see ldm.cli.overrides), then Hydra. A signal before
    training starts stops train.py at once with one line (SaveOnInterrupt takes over from the first step)."""
    from ldm.cli.checks import run_cli

    install_stop_now()
    try:
        run_cli("train", hydra_main, resume_overrides)
    except SignalExit as stop:
        if int(os.environ.get("LOCAL_RANK") or 0) == 0 and int(os.environ.get("NODE_RANK") or 0) == 0:
            nothing = "nothing to save yet" if stop.when == STARTING else "its last.ckpt is complete"
            say(f"\ntrain.py: {stop} ({nothing})")
        if stop.signal_name == "SIGUSR1" and stop.when == STARTING:
            from ldm.lightning.interrupt import requeue_slurm_job

            requeue_slurm_job(None)  # SLURM's time-limit warning: the requeued job starts (or resumes) again
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C where no handler of ours was in place (Python's own startup)
        say(f"\ntrain.py: SIGINT {STARTING}: stopped (nothing to save yet)")
        raise SystemExit(130) from None


def release_process_group() -> None:
    """Destroy the default process group (and with it every other) once all ranks are done with it. Lightning
    does so at exit for NCCL only; a gloo group left to the interpreter's shutdown can abort a process whose run
    succeeded ("terminate called without an active exception", exit -6). Not after an error: a rank may still
    be waiting in a collective there, and the process should exit rather than wait on it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    import_lightning()  # the job runs: Lightning and the model code are imported now
    from ldm.lightning.module import NonFiniteLossError

    explicit_prediction_type(cfg, list(HydraConfig.get().overrides.task))
    try:
        train(cfg)
        release_process_group()
    except Interrupted as err:
        release_process_group()  # every rank stopped at the same step, by the same decision
        if int(os.environ.get("LOCAL_RANK") or 0) == 0 and int(os.environ.get("NODE_RANK") or 0) == 0:
            say(f"train.py: {err}\n  resume with: {resume_command(list(HydraConfig.get().overrides.task))}")
        raise SystemExit(err.exit_code) from None
    except NonFiniteLossError as err:
        release_process_group()  # the guard's decision is the same on every rank
        say(f"train.py: {err}")
        raise SystemExit(1) from None
    except Exception as err:
        shown = user_error(err)
        if shown is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        say(f"train.py: error: {shown}")
        raise SystemExit(2) from None
