"""Gradients are averaged across processes: 2 ranks at batch B train to the weights 1 process gets at 2B.

On the CPU with gloo, the same samples with the same noise, in two settings (SETTINGS): a frozen text encoder
(4 SGD steps, lr 0.1), and a trained one with gradient clipping (binding at every step) and 2 accumulated
micro-batches per step (3 SGD steps, lr 0.3). In each, DDP (trainer=ddp_cpu) and FSDP2 (trainer=fsdp) at
2 × batch 2 must end where 1 process at batch 4 ends, within float32 reduction-order rounding (TOL 2e-6;
measured 1.2e-7, one ulp). The weights move ~2.7e-2 at most (~1e4 × TOL), so a wrong average moves them by
orders of magnitude more than TOL: each break in BREAKS (a sum, each rank's own gradient, a parameter group
left out of the reduction, clipping by a shard's own norm) is run and asserted to land > 100 × TOL off
(measured 4e-3 to 3e-2, ≥ 2000 × TOL).

What is the real thing and what is the test's: the configs go through ldm.cli.train.train (train.py's body)
with the real strategies, Lightning's optimizer step, clipping and accumulation, and LatentDiffusion's
training_step and diffusion_loss. The test supplies the data (KeyedBatches: rank r of W reads its slice of
each global batch) and, in KeyedDiffusion, the randomness: diffusion noise and timesteps keyed by sample
(`keyed_draws`, fed to diffusion_loss's own randint/randn), latents as the posterior mode. The 2-process
runs all go through one launch of tests/grad_equivalence_worker.py (ranks started by hand, as torchrun would),
the 1-process references run in this process meanwhile: about a minute in all on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import pytest
import torch
from helpers import randomize_
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, IterableDataset

import ldm.lightning.module as module_py
from ldm.lightning.module import LatentDiffusion

REPO = Path(__file__).resolve().parent.parent
# What Hydra (here and in the workers) imports this file as: pytest names it `test_grad_equivalence` (tests/ has no
# __init__.py); not `tests.…`, as a package installed as `tests` (torch-fidelity ships one) would shadow it.
HERE = __name__
TRAINED = ("model.diffusion_model.", "cond_stage_model.")

COLORS = ("red", "green", "blue", "yellow", "white", "black", "purple")
SHAPES = ("circle", "square", "triangle", "star", "cross")


# -- the same samples and the same noise, however they are split over ranks --------------------------


def sample(key: int, resolution: int) -> tuple[torch.Tensor, str]:
    """Sample `key`: an image from its own seed, and a caption of its own."""
    g = torch.Generator().manual_seed(key)
    image = torch.rand((3, resolution, resolution), generator=g) * 2 - 1
    caption = f"a {COLORS[key % 7]} {SHAPES[key // 7 % 5]} on a {COLORS[(3 * key + 1) % 7]} background"
    return image, caption


class _Batches(IterableDataset):
    def __init__(self, batch_size: int, num_batches: int, rank: int, world_size: int, resolution: int) -> None:
        self.batch_size, self.num_batches = batch_size, num_batches
        self.rank, self.world_size, self.resolution = rank, world_size, resolution

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for i in range(self.num_batches):
            first = i * global_batch + self.rank * self.batch_size
            keys = list(range(first, first + self.batch_size))
            images, captions = zip(*(sample(k, self.resolution) for k in keys), strict=True)
            yield {"image": torch.stack(images), "caption": list(captions), "key": [f"{k:06d}" for k in keys]}


class KeyedBatches(L.LightningDataModule):
    """In-memory samples: micro-batch i of a run holds the global samples [i·G, (i+1)·G), G = batch_size ×
    world size, and rank r their r-th slice of batch_size. So 2 ranks at B see, step by step, the samples
    1 process at 2B sees."""

    def __init__(self, batch_size: int, num_batches: int, resolution: int = 32) -> None:
        super().__init__()
        self.batch_size, self.num_batches, self.resolution = batch_size, num_batches, resolution

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(_Batches(self.batch_size, self.num_batches, rank, world, self.resolution), batch_size=None)


def keyed_draws(keys: list[int], shape: torch.Size, num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestep and noise of each sample from its key: the same on whichever rank the sample lands."""
    ts, noises = [], []
    for key in keys:
        g = torch.Generator().manual_seed(1_000_003 + key)
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noises.append(torch.randn(tuple(shape), generator=g))
    return torch.cat(ts), torch.stack(noises)


class _KeyedTorch:
    """`torch` as ldm.lightning.module sees it during one `diffusion_loss`: its one `randint` (timesteps) and
    one `randn` (noise) return the batch's keyed draws; everything else is torch itself."""

    def __init__(self, t: torch.Tensor, noise: torch.Tensor) -> None:
        self._draws = {"randint": t, "randn": noise}

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def randint(self, low: int, high: int, size: tuple[int, ...], *, generator: Any = None, device: Any = None):
        t = self._draws.pop("randint")  # a second draw would fail here
        assert tuple(size) == tuple(t.shape), (size, t.shape)
        return t.to(device)

    def randn(self, size: Any, *, generator: Any = None, device: Any = None, dtype: Any = None):
        noise = self._draws.pop("randn")
        assert tuple(size) == tuple(noise.shape), (size, noise.shape)
        return noise.to(device=device, dtype=dtype)


# -- breaking gradient averaging on purpose --------------------------------------------------------------


# DDP comm hooks. No annotations: DDP refuses any but dist.GradBucket, which `from __future__ import annotations`
# would turn into a string.
def allreduce_sum_hook(state, bucket):
    """All-reduce without dividing by the world size (the gradients' sum)."""
    import torch.distributed as dist

    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def local_gradient_hook(state, bucket):
    """No all-reduce: every rank steps on its own gradient."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


# Each break: what it does, the setting it runs in (see SETTINGS) and the weights it throws off.
BREAKS = {
    "ddp_sum": ("DDP sums the ranks' gradients instead of averaging them", "frozen", "model.diffusion_model."),
    "ddp_local": ("DDP skips the all-reduce: each rank steps on its own gradient", "frozen", "model.diffusion_model."),
    "ddp_te_unsynced": ("DDP leaves the trained text encoder out of its all-reduce", "trained", "cond_stage_model."),
    "fsdp_sum": ("FSDP's reduce-scatter sums instead of averaging", "frozen", "model.diffusion_model."),
    "fsdp_no_reduce": ("FSDP never reduce-scatters (gradient sync left off)", "frozen", "model.diffusion_model."),
    "fsdp_te_unreduced": ("FSDP never reduce-scatters the trained text encoder", "trained", "cond_stage_model."),
    "fsdp_clip_local": ("FSDP clips each rank's shard by that shard's own norm", "trained", "model.diffusion_model."),
}


class KeyedDiffusion(LatentDiffusion):
    """LatentDiffusion whose diffusion noise and timesteps are keyed by sample (`keyed_draws`) and whose
    latents are the posterior mode, so a sample trains the same on any rank in any batch. The loss path
    (LatentDiffusion.diffusion_loss, training_step, the non-finite guard), the optimizer step, clipping and
    accumulation are the real ones. The UNet starts from random weights everywhere (see __init__). `break_` (one of BREAKS) breaks gradient averaging on purpose."""

    def __init__(self, *args: Any, break_: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if break_ is not None and break_ not in BREAKS:
            raise ValueError(f"break_={break_!r} is not one of {sorted(BREAKS)}")
        assert not self.offset_noise and not self.caption_dropout and self.concat is None
        self.break_ = break_
        self._keys: list[int] = []
        # No zero-initialised layers (the UNet's output and attention projections): with them the text
        # encoder would get no gradient at the first step and next to none after.
        randomize_(self.model, seed=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._keys = [int(k) for k in batch["key"]]
        return super().training_step(batch, batch_idx)

    @torch.no_grad()
    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.scale_factor * self.first_stage_model.encode(batch["image"].to(self.dtype)).mode()

    def diffusion_loss(self, z0: torch.Tensor, context: Any) -> torch.Tensor:
        t, noise = keyed_draws(self._keys, z0.shape[1:], self.schedule.num_timesteps)
        keyed = _KeyedTorch(t, noise.to(z0.dtype))
        with mock.patch.object(module_py, "torch", keyed):
            loss = super().diffusion_loss(z0, context)
        assert not keyed._draws, f"diffusion_loss did not draw {sorted(keyed._draws)}: the keyed noise went unused"
        return loss

    # the breaks

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.break_ == "ddp_te_unsynced":  # before DDP wraps the module
            from torch.nn.parallel import DistributedDataParallel

            names = [f"cond_stage_model.{n}" for n, _ in self.cond_stage_model.named_parameters()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def configure_model(self) -> None:
        super().configure_model()
        if self.break_ == "fsdp_te_unreduced":
            self.cond_stage_model.set_requires_gradient_sync(False)
        if self.break_ in ("fsdp_sum", "fsdp_no_reduce"):
            from torch.distributed.fsdp import FSDPModule

            for m in self.modules():
                if isinstance(m, FSDPModule):
                    if self.break_ == "fsdp_sum":  # plain SUM reduce-scatter (gloo has no PREMUL_SUM), / 1
                        m.set_force_sum_reduction_for_comms(True)
                        m.set_gradient_divide_factor(1.0)
                    else:
                        m.set_requires_gradient_sync(False, recurse=False)

    def on_train_start(self) -> None:
        super().on_train_start()
        hook = {"ddp_sum": allreduce_sum_hook, "ddp_local": local_gradient_hook}.get(self.break_ or "")
        if hook is not None:
            self.trainer.strategy.model.register_comm_hook(None, hook)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None):
        if self.break_ != "fsdp_clip_local" or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        local = [p.grad.to_local() for p in self.trainable_parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in local]))
        coef = (gradient_clip_val / (norm + 1e-6)).clamp(max=1.0)
        for g in local:
            g.mul_(coef)


# -- what each rank ends with ---------------------------------------------------------------------------


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's and text encoder's weights, whole (FSDP's shards gathered; every rank calls this)."""
    out = {}
    for name, p in module.named_parameters():
        if name.startswith(TRAINED):
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().cpu().clone()
    return out


class RecordWeights(L.Callback):
    """Writes `<out>/<tag>-rank<R>.pt`: the weights at the start and the end, and each optimizer step's
    gradient norm before clipping."""

    def __init__(self, out: str, tag: str) -> None:
        self.out, self.tag = Path(out), tag
        self.record: dict[str, Any] = {"grad_norms": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.record["initial"] = full_weights(pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.trainable_parameters() if p.grad is not None]
        full = [g.full_tensor() if isinstance(g, DTensor) else g for g in grads]
        self.record["grad_norms"].append(torch.linalg.vector_norm(torch.stack([g.norm() for g in full])).item() if full else 0.0)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.record.update(final=full_weights(pl_module), world_size=trainer.world_size, steps=trainer.global_step,
                           strategy=type(trainer.strategy).__name__)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out / f"{self.tag}-rank{trainer.global_rank}.pt")


# -- runs ------------------------------------------------------------------------------------------------

DDP = ("trainer=ddp_cpu", "trainer.devices=2")
FSDP = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2")


def run_overrides(root: str, tag: str, setting: dict[str, Any], trainer: tuple[str, ...] = (), break_: str | None = None,
                  world_size: int = 1) -> list[str]:
    batch = setting["batch"] * 2 // world_size  # the global batch is the same for every world size
    return [
        *trainer,
        f"paths.root={root}",
        f"paths.output_dir={root}/{tag}",
        "~data",
        f"+data._target_={HERE}.KeyedBatches",
        f"+data.batch_size={batch}",
        f"+data.num_batches={setting['steps'] * setting['accumulate']}",
        f"module._target_={HERE}.KeyedDiffusion",
        "module.caption_dropout=0",
        "module.ema_decay=null",
        "module.lr_scheduler=null",
        "~module.optimizer",
        f"+module.optimizer={{_target_: torch.optim.SGD, _partial_: true, lr: {setting['lr']}}}",
        f"module.train_text_encoder={str(setting['train_text_encoder']).lower()}",
        f"+module.break_={break_ or 'null'}",
        "callbacks=none",
        "logger=none",
        f"+callbacks.record._target_={HERE}.RecordWeights",
        f"+callbacks.record.out={root}/records",
        f"+callbacks.record.tag={tag}",
        f"trainer.max_steps={setting['steps']}",
        f"trainer.accumulate_grad_batches={setting['accumulate']}",
        f"trainer.gradient_clip_val={setting['clip'] if setting['clip'] else 'null'}",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "+trainer.enable_checkpointing=false",
    ]


def compose_run(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_module

    import ldm.cli.train  # noqa: F401  (its config resolvers)

    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def train_single(root: Path, tag: str, setting: dict[str, Any]) -> None:
    from ldm.cli.train import train

    train(compose_run(run_overrides(str(root), tag, setting)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(root: Path, runs: list[list[str]]) -> list[subprocess.Popen]:
    """Two worker processes (ranks 0 and 1 of one gloo group) that train `runs` one after the other."""
    spec = root / "runs.json"
    spec.write_text(json.dumps({"module": HERE, "runs": runs}))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0"}
        log = (root / f"worker-rank{rank}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "grad_equivalence_worker.py"), str(spec)],
                                      cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def stop_pair(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_pair(root: Path, procs: list[subprocess.Popen], timeout: float = 600) -> None:
    """Both ranks finished cleanly; a rank that failed takes the other down (it would wait in a collective)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = [rank for rank, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            stop_pair(procs)
            rank = failed[0] if failed else 0
            raise AssertionError(f"rank {rank} {f'failed (exit {procs[rank].returncode})' if failed else 'timed out'}:\n"
                                 + (root / f"worker-rank{rank}.log").read_text()[-6000:])
        time.sleep(0.2)
    for rank, p in enumerate(procs):
        assert p.returncode == 0, (root / f"worker-rank{rank}.log").read_text()[-6000:]


def load(root: Path, tag: str, rank: int = 0) -> dict[str, Any]:
    return torch.load(root / "records" / f"{tag}-rank{rank}.pt", weights_only=False)


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in keys)


# -- the comparisons ---------------------------------------------------------------------------------------

# SGD, not AdamW: Adam's update barely depends on the gradient's scale, so a sum instead of a mean would move
# its weights by almost the same amount. No warm-up (lr_scheduler=null), per-rank batch 2.
SETTINGS = {
    # frozen text encoder, no clipping, no accumulation: 4 steps
    "frozen": {"batch": 2, "steps": 4, "accumulate": 1, "clip": None, "lr": 0.1, "train_text_encoder": False},
    # trained text encoder, gradients clipped to norm 1 (their norm is 2-3: the clip binds at every step),
    # 2 micro-batches accumulated per step: 3 steps
    "trained": {"batch": 2, "steps": 3, "accumulate": 2, "clip": 1.0, "lr": 0.3, "train_text_encoder": True},
}
TOL = 2e-6  # float32 reduction-order rounding: 16 ulp at the weights' largest size (~1); measured 1.2e-7
FAR = 100 * TOL  # where every broken twin must land, at least; measured 9e-3 and more (see the docstring)

PAIR_RUNS = {  # tag: (setting, strategy, break)
    **{f"{strategy}-{name}": (name, overrides, None) for strategy, overrides in (("ddp", DDP), ("fsdp", FSDP))
       for name in SETTINGS},
    **{b: (setting, DDP if b.startswith("ddp") else FSDP, b) for b, (_, setting, _) in BREAKS.items()},
}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every run of PAIR_RUNS in one 2-process launch, and the 1-process runs here meanwhile."""
    root = tmp_path_factory.mktemp("grad-equivalence")
    procs = launch_pair(root, [run_overrides(str(root), tag, SETTINGS[setting], strategy, break_, world_size=2)
                               for tag, (setting, strategy, break_) in PAIR_RUNS.items()])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for name, setting in SETTINGS.items():
            train_single(root, f"single-{name}", setting)
    except BaseException:
        stop_pair(procs)
        raise
    finally:
        torch.set_num_threads(threads)
    wait_pair(root, procs)
    return lambda tag, rank=0: load(root, tag, rank)


def check_equal(run: dict[str, Any], reference: dict[str, Any], setting: dict[str, Any], what: str) -> None:
    assert run["steps"] == reference["steps"] == setting["steps"]
    assert run["initial"].keys() == reference["initial"].keys()
    for prefix in TRAINED:
        assert worst(run["initial"], reference["initial"], prefix) == 0, f"{what}: different starting weights"
        diff = worst(run["final"], reference["final"], prefix)
        assert diff < TOL, f"{what}: {prefix} weights differ by {diff:.3g} (tolerance {TOL})"
    assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-5), what


@pytest.mark.parametrize("name", SETTINGS)
def test_single_process_reference_trains_far_beyond_the_tolerance(records: Any, name: str) -> None:
    """The 1-process runs that the others are held to: the weights move ~1e4 × the tolerance (UNet max
    |update| 2.7e-2 in both settings, trained text encoder 7.4e-3), a frozen text encoder not at all, and in
    the clipped setting the clip binds at every step (gradient norms 2.7, 2.5, 2.1 against 1.0)."""
    single, setting = records(f"single-{name}"), SETTINGS[name]
    assert single["world_size"] == 1 and single["steps"] == setting["steps"]
    assert worst(single["final"], single["initial"], "model.diffusion_model.") > 1e3 * TOL
    moved = worst(single["final"], single["initial"], "cond_stage_model.")
    assert moved > 1e3 * TOL if setting["train_text_encoder"] else moved == 0
    if setting["clip"]:
        assert min(single["grad_norms"]) > 1.5 * setting["clip"], single["grad_norms"]


@pytest.mark.parametrize("name", SETTINGS)
def test_ddp_two_ranks_at_batch_b_equal_one_process_at_2b(records: Any, name: str) -> None:
    """trainer=ddp_cpu, 2 ranks × batch 2 vs 1 process × batch 4 on the same samples and noise, with a frozen
    text encoder (4 steps) and with a trained one, clipping and 2 accumulated micro-batches (3 steps): worst
    |Δ| 1.2e-7 (UNet), 6e-8 (text encoder) against TOL 2e-6; both ranks end bit for bit the same."""
    single, setting = records(f"single-{name}"), SETTINGS[name]
    ranks = [records(f"ddp-{name}", rank) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["strategy"] == "DDPStrategy"
    for rank, run in enumerate(ranks):
        check_equal(run, single, setting, f"DDP rank {rank} vs 1 process")
    assert all(torch.equal(ranks[0]["final"][k], ranks[1]["final"][k]) for k in ranks[0]["final"])


@pytest.mark.parametrize("name", SETTINGS)
def test_fsdp_equals_ddp_and_one_process(records: Any, name: str) -> None:
    """trainer=fsdp (FSDP2 on gloo, 32-true), 2 ranks × batch 2, in both settings: the gathered weights equal
    1 process at batch 4 and DDP at 2 × 2 within TOL 2e-6 (worst |Δ| measured 1.2e-7)."""
    single, setting = records(f"single-{name}"), SETTINGS[name]
    ddp = records(f"ddp-{name}")
    for rank in (0, 1):
        fsdp = records(f"fsdp-{name}", rank)
        assert fsdp["world_size"] == 2 and fsdp["strategy"] == "FSDPStrategy"
        check_equal(fsdp, single, setting, f"FSDP rank {rank} vs 1 process")
        check_equal(fsdp, ddp, setting, f"FSDP rank {rank} vs DDP")


@pytest.mark.parametrize("break_", BREAKS)
def test_broken_averaging_lands_orders_of_magnitude_outside_the_tolerance(records: Any, break_: str) -> None:
    """Each twin is its correct run with gradient averaging broken on purpose (KeyedDiffusion.break_). Worst
    |Δ| against the 1-process run, in the weights it breaks, measured (rank 0 / rank 1), against TOL 2e-6:

        ddp_sum            UNet 2.9e-2           (grad norms exactly 2x)
        ddp_local          UNet 3.2e-2 / 2.5e-2  (and the ranks drift apart)
        ddp_te_unsynced    text encoder 4.7e-3 / 4.1e-3 (UNet 9e-4)
        fsdp_sum           UNet 2.9e-2
        fsdp_no_reduce     UNet 2.7e-2           (no gradients reach the shards: no update at all)
        fsdp_te_unreduced  text encoder 7.4e-3   (its whole update; UNet 9e-4)
        fsdp_clip_local    UNet 1.1e-2, text encoder 3.3e-3

    all >= 2000 × TOL; asserted > FAR = 100 × TOL on each rank."""
    what, setting, prefix = BREAKS[break_]
    single = records(f"single-{setting}")
    for rank in (0, 1):
        diff = worst(records(break_, rank)["final"], single["final"], prefix)
        assert diff > FAR, f"{what}: {prefix} only {diff:.3g} off the 1-process run; the comparison would not see it"
    if break_ == "ddp_local":
        ranks = [records(break_, rank)["final"] for rank in (0, 1)]
        assert worst(ranks[0], ranks[1], "model.diffusion_model.") > FAR
