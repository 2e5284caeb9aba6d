"""Parts of the training step that must not read device values back to the host (a GPU stall every step),
checked on the CPU by making every such read raise: the EMA update, the UNet's timestep embedding, the
caption dropout, and whole training steps through the real command line (loss guard, optimizer, LR
scheduler, progress bar and step log) between the steps that log. The non-finite guard skips on the
device and the host learns it a step late: the same weights, optimizer state, EMA and LR as reading it at
once. On a GPU, steps run under `torch.cuda.set_sync_debug_mode("error")`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_train import QUIET, _one_thread, compose_train, load_ckpt, run_dir  # noqa: F401 (autouse fixture)
from torch import nn

from ldm.cli.train import train
from ldm.lightning.ema import EMA
from ldm.lightning.module import LatentDiffusion, NonFiniteLossError
from ldm.models.unet import timestep_embedding


@contextmanager
def no_device_reads() -> Iterator[None]:
    """Tensor -> Python value conversions raise inside the block (what `.item()`, `int(t)`, `if t:` do)."""

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a tensor value was read on the host")

    names = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    tensor = torch.tensor

    def host_value_to_device(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # torch.tensor(x, device=...) is a blocking copy from pageable memory on a GPU (a stream sync)
        if kwargs.get("device") is not None:
            raise AssertionError("a host value was copied to the device with a blocking copy")
        return tensor(*args, **kwargs)

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        torch.tensor = host_value_to_device
        yield
    finally:
        torch.tensor = tensor
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_the_detector_catches_a_read() -> None:
    three = torch.tensor(3)
    for read in (int, float, bool, lambda t: t.item(), lambda t: t.tolist(), lambda t: t.cpu()):
        with pytest.raises(AssertionError, match="read on the host"), no_device_reads():
            read(three)
    with pytest.raises(AssertionError, match="blocking copy"), no_device_reads():
        torch.tensor(3.0, device="cpu")


def test_ema_updates_read_no_device_values_and_follow_ldm_warm_up() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    saved = ema.state_dict()
    saved["num_updates"] = torch.tensor(10, dtype=torch.int32)
    ema.load_state_dict(saved)  # a resumed run: the host copies come from the loaded buffers
    int(ema.num_updates)
    shadow = ema.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.current_decay()  # the one read after a load happens outside the step
    with no_device_reads():
        for _ in range(3):
            ema.update(model)
    assert int(ema.num_updates) == 13
    expected = shadow
    for n in (11, 12, 13):  # LDM's LitEma: decay min(0.99, (1 + n) / (10 + n)) at update n
        d = min(0.99, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model.weight.detach()
    assert torch.allclose(ema.weight, expected, atol=1e-6)


def test_timestep_embedding_builds_its_frequencies_where_the_timesteps_are() -> None:
    t = torch.tensor([0, 10, 999])
    with no_device_reads():
        emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_an_ema_update_skipped_on_the_device_is_no_update_at_all() -> None:
    """The non-finite guard's skip, given as a device boolean: shadows and num_updates exactly as if the
    update had not been called, bit for bit, with warm-up and without; no host read."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 3))
    for warmup in (True, False):
        host, device = EMA(model, 0.99, warmup), EMA(model, 0.99, warmup)
        for step in range(12):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            skipped = step in (0, 5, 6)
            if not skipped:
                host.update(model)
            with no_device_reads():
                device.update(model, skip=torch.tensor(skipped))
        assert int(device.num_updates) == int(host.num_updates) == 9
        for name, shadow in host.shadow_state().items():
            assert torch.equal(device.shadow_state()[name], shadow), name
        assert not torch.equal(host.shadow_state()["0weight"], model[0].weight)  # it does average


def tiny_module(tmp_path: Path, *overrides: str) -> LatentDiffusion:
    cfg = compose_train(tmp_path, ["model=tiny", *overrides])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_")
    return instantiate(cfg.module, model=model_cfg, _convert_="all")


CAPTIONS = [
    "a red circle on a blue background",
    "",
    "Crème brûlée, naïve café — «quoted» ‘curly’ &amp; emoji 🎨🖌️ and 漢字 かな 한국어",
    " ".join(["a very long caption that runs past the seventy-seven tokens of CLIP's context"] * 8),
    "   spaces\tand\nnewlines   ",
    "UPPER case AND Numbers 12345",
]


def test_caption_dropout_blanks_captions_on_the_device_as_blanking_them_in_the_list(tmp_path: Path) -> None:
    """Dropped captions become the empty prompt's ids where the text encoder reads them: the same
    output as encoding the list with those captions replaced by "", with no host read of the draw."""
    module = tiny_module(tmp_path, "module.caption_dropout=0.5")
    captions = CAPTIONS * 4
    with no_device_reads():
        keep = module._kept_captions(len(captions))
        context = module._text_context({"caption": captions}, keep)
    kept = keep.tolist()
    assert 0 < sum(kept) < len(kept)  # some dropped, some kept: the comparison below can fail
    blanked = [c if k else "" for c, k in zip(captions, kept, strict=True)]
    assert torch.equal(context, module.encode_text(blanked))
    assert not torch.equal(context, module.encode_text(captions))
    # and the same random draws as before: one uniform per caption from the module's generator
    module._generator = None
    draw = torch.rand(len(captions), generator=module.generator, device=module.device)
    module._generator = None
    assert torch.equal(module._kept_captions(len(captions)), draw >= 0.5)


class ReadGuard(L.Callback):
    """Every tensor-to-host read raises from the start to the end of each training step whose end does
    not log (the progress bar and step log read the loss every log_every_n_steps): training_step, its
    backward, the optimizer, EMA and LR scheduler steps, and the other callbacks' batch-end hooks (this one
    comes last). Optionally reads the guard's outcome at each step's end, as a host-synchronising guard would."""

    def __init__(self, every: int, guard: bool = True, read_outcome: bool = False) -> None:
        self.every, self.guard, self.read_outcome = every, guard, read_outcome
        self.guarded: list[int] = []
        self._stack: ExitStack | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.guard and (trainer.global_step + 1) % self.every:
            self._stack = ExitStack()
            self._stack.enter_context(no_device_reads())
            self.guarded.append(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._release()
        if self.read_outcome:
            pl_module._read_outcome()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def poison_steps(monkeypatch: pytest.MonkeyPatch, steps: set[int] | range) -> None:
    loss = LatentDiffusion.diffusion_loss

    def poisoned(self: LatentDiffusion, z0: torch.Tensor, context: Any) -> torch.Tensor:
        value = loss(self, z0, context)
        return value * float("nan") if self.global_step in steps else value

    monkeypatch.setattr(LatentDiffusion, "diffusion_loss", poisoned)


def run_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, callback: L.Callback, *overrides: str) -> Path:
    from ldm.cli import train as train_cli

    build = train_cli.build_callbacks
    monkeypatch.setattr(train_cli, "build_callbacks", lambda cfg, has_logger=True: [*build(cfg, has_logger), callback])
    train(compose_train(tmp_path, ["callbacks.sample_images=null", "callbacks.lr_monitor=null", *QUIET, *overrides]))
    return run_dir(tmp_path) / "checkpoints" / "last.ckpt"


EVERY = 4
STEPS = [f"trainer.max_steps={2 * EVERY}", f"trainer.log_every_n_steps={EVERY}", "module.optimizer.weight_decay=0.1"]


def test_training_steps_read_nothing_from_the_device_and_a_step_late_is_as_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a fused AdamW (the default on CUDA; here on the CPU) the steps between two logging steps read
    no tensor on the host, a NaN step among them included; the run ends exactly as one whose host reads
    each step's outcome at once: weights, EMA, AdamW's state, the LR schedule."""
    poison_steps(monkeypatch, {2})
    guard = ReadGuard(EVERY)
    lagged = load_ckpt(run_with(tmp_path / "lagged", monkeypatch, guard, *STEPS, "module.optimizer.fused=true"))
    assert guard.guarded == [0, 1, 2, 4, 5, 6]
    eager = load_ckpt(run_with(tmp_path / "eager", monkeypatch, ReadGuard(EVERY, guard=False, read_outcome=True),
                               *STEPS, "module.optimizer.fused=true"))
    assert lagged["global_step"] == eager["global_step"] == 2 * EVERY
    assert lagged["state_dict"]["model_ema.num_updates"] == 2 * EVERY - 1  # the NaN step moved no EMA
    assert lagged["lr_schedulers"] == eager["lr_schedulers"]
    assert lagged["lr_schedulers"][0]["last_epoch"] == 2 * EVERY - 1  # ...nor the LR schedule
    assert lagged["optimizer_states"][0]["param_groups"] == eager["optimizer_states"][0]["param_groups"]
    for key, value in eager["state_dict"].items():
        assert torch.equal(lagged["state_dict"][key], value), key
    for (p, a), (q, b) in zip(lagged["optimizer_states"][0]["state"].items(), eager["optimizer_states"][0]["state"].items(), strict=True):
        assert p == q and all(torch.equal(a[k], b[k]) for k in b), p
    assert int(eager["optimizer_states"][0]["state"][0]["step"]) == 2 * EVERY - 1


def test_a_foreach_optimizer_reads_the_guard_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: an optimizer that cannot skip on the device (torch's foreach AdamW, bitsandbytes')
    reads the flag each step, and the read guard catches that read."""
    with pytest.raises(AssertionError, match="read on the host"):
        run_with(tmp_path, monkeypatch, ReadGuard(EVERY), *STEPS, "module.optimizer.fused=false")


@pytest.mark.parametrize(("fused", "stopped_at"), [(False, 8), (True, 9)], ids=["foreach", "fused"])
def test_a_run_of_non_finite_losses_stops_with_the_state_of_the_last_good_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused: bool, stopped_at: int
) -> None:
    """NaN at steps 1, 2 and from 5 on, three in a row allowed: the host-read guard stops after step 7
    (the third of the streak); the device guard learns of step 7 at step 8, skips it too and stops. Both
    leave exactly the state of the step-5 checkpoint (after steps 0, 3, 4): weights, EMA, AdamW, LR."""
    poison_steps(monkeypatch, {1, 2} | set(range(5, 100)))
    cfg = ["trainer.max_steps=20", "module.max_nonfinite_steps=3", "callbacks.checkpoint.every_n_train_steps=5",
           f"module.optimizer.fused={str(fused).lower()}"]
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses at step 7"):
        run_with(tmp_path, monkeypatch, ReadGuard(EVERY, guard=False), *cfg)
    checkpoints = run_dir(tmp_path) / "checkpoints"
    last_good, step5 = load_ckpt(checkpoints / "last-good.ckpt"), load_ckpt(checkpoints / "step-0000005.ckpt")
    assert (last_good["global_step"], step5["global_step"]) == (stopped_at, 5)
    assert last_good["lr_schedulers"] == step5["lr_schedulers"] and step5["lr_schedulers"][0]["last_epoch"] == 3
    assert last_good["optimizer_states"][0]["param_groups"] == step5["optimizer_states"][0]["param_groups"]
    for key, value in step5["state_dict"].items():
        assert torch.equal(last_good["state_dict"][key], value), key
    assert int(step5["state_dict"]["model_ema.num_updates"]) == 3
    for p, state in step5["optimizer_states"][0]["state"].items():
        assert all(torch.equal(last_good["optimizer_states"][0]["state"][p][k], state[k]) for k in state), p


@pytest.mark.gpu
def test_training_steps_on_a_gpu_do_not_synchronise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, bf16 autocast, fused AdamW (the GPU defaults), a NaN step among them: the steps between two
    logging steps run under torch.cuda.set_sync_debug_mode("error"), so any host synchronisation raises."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")

    class SyncGuard(ReadGuard):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if (trainer.global_step + 1) % self.every:
                torch.cuda.synchronize()  # what the step before left queued is not this step's
                self._stack = ExitStack()
                torch.cuda.set_sync_debug_mode("error")
                self._stack.callback(torch.cuda.set_sync_debug_mode, "default")
                self.guarded.append(trainer.global_step)

    poison_steps(monkeypatch, {2})
    guard = SyncGuard(EVERY)
    last = load_ckpt(run_with(tmp_path, monkeypatch, guard, *STEPS, "trainer=gpu", "trainer.devices=1"))
    assert guard.guarded == [0, 1, 2, 4, 5, 6]
    assert last["state_dict"]["model_ema.num_updates"] == 2 * EVERY - 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


class RankPoison(L.Callback):
    """Makes one rank's loss NaN at the given steps; at the end writes what each rank's guard did."""

    def __init__(self, rank: int, steps: list[int], out: str) -> None:
        self.rank, self.steps, self.out = rank, set(steps), Path(out)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pl_module.__dict__.pop("diffusion_loss", None)
        if trainer.global_rank == self.rank and trainer.global_step in self.steps:
            clean = type(pl_module).diffusion_loss
            pl_module.diffusion_loss = lambda z0, context: clean(pl_module, z0, context) * float("nan")

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        import json

        optimizer = trainer.optimizers[0]
        weights = torch.cat([p.detach().flatten() for p in pl_module.model.parameters()])
        record = {
            "on_device": pl_module._skips_on_device(optimizer, trainer.precision_plugin),
            "ema_updates": int(pl_module.model_ema.num_updates),
            "adam_steps": sorted({int(s["step"]) for s in optimizer.state.values()}),
            "finite": bool(torch.isfinite(weights).all()),
            "weights": weights.tolist()[:64],
            "last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_a_nan_on_one_rank_is_skipped_by_every_rank_on_the_device(tmp_path: Path) -> None:
    """Two DDP ranks with fused AdamW, a NaN loss on rank 1 alone at step 1: the flag summed on the device
    makes rank 0 skip too (its gradients, averaged with rank 1's NaN ones, would otherwise wreck it), the
    same step on both, and both end on the same finite weights, one EMA, AdamW and LR step short."""
    import json

    from test_train_ddp import train_ddp

    out = tmp_path / "guard"
    train_ddp(tmp_path, "fused", "trainer.max_steps=4", "module.optimizer.fused=true",
              "+callbacks.poison._target_=test_host_sync.RankPoison", "+callbacks.poison.rank=1",
              "+callbacks.poison.steps=[1]", f"+callbacks.poison.out={out}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for record in ranks:
        assert record["on_device"] and record["finite"]
        assert (record["ema_updates"], record["adam_steps"], record["last_epoch"]) == (3, [3], 3)
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_a_semantic_map_step_reads_no_labels_on_the_host(tmp_path: Path) -> None:
    """The semantic map's one-hot condition in training skips the label range check (a host read each step;
    the loader already skipped maps with labels >= data.num_classes); sampling still checks."""
    from ldm.sampling import semantic_condition

    module = tiny_module(tmp_path, "conditioning=semantic_map", "model.semantic_classes=5")
    seg = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    z0 = torch.randn(2, 4, 8, 8)
    with no_device_reads():
        concat, _ = module._concat_and_captions({"caption": ["a", "b"], "seg": seg}, z0)
    assert torch.equal(concat, semantic_condition(seg, 5, (8, 8)))
    assert concat.shape == (2, 5, 8, 8) and torch.allclose(concat.sum(1), torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        semantic_condition(seg + 1, 5, (8, 8))
