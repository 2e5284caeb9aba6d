"""Exact mid-epoch resume: a run stopped at a step inside an epoch (SIGTERM, a crash after a periodic
checkpoint, max_steps) and resumed reads the samples the uninterrupted run reads, in its order, and ends
with bit-identical UNet, EMA, optimizer and noise state; with loader workers, two DDP ranks, cached
latents, `resampled=true` and gradient accumulation. Data state: ldm/data/webdataset.py (WebDataModule's
`state_dict`, ShardLoader, _WorkerStream).

Without the stream's saved position (`test_without_the_saved_stream_position_the_resume_differs`, the
behaviour before it) the resumed epoch restarts with another order and every one of these comparisons fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import model_config, randomize_
from PIL import Image
from test_train import BARE, QUIET, compose_train, load_ckpt, trained_tensors

from ldm.cli.train import Interrupted, train
from ldm.data import webdataset as wdm
from ldm.data.cache_latents import cache_latents
from ldm.data.synthetic import ensure_demo_shards, random_sample
from ldm.data.webdataset import POSITION, WebDataModule
from ldm.models.autoencoder import AutoencoderKL

REPO = Path(__file__).resolve().parent.parent
STEPS, CUT = 10, 3  # 8 batches an epoch (32 samples in batches of 4): the cut is mid-epoch, the end in epoch 1
COMMON = [
    f"trainer.max_steps={STEPS}",
    "callbacks.checkpoint.every_n_train_steps=1000",
    "module.ema_decay=0.9",
    "module.caption_dropout=0.5",
    "module.offset_noise=0.1",
    "data.num_samples=32",
    "data.samples_per_shard=8",
    "data.batch_size=4",
    "data.shuffle_buffer=8",
    *BARE,
    *QUIET,
]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch):
    """One thread here and in the processes started (see tests/test_train.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class KeyProbe(L.Callback):
    """Writes `<out>/<tag>-rank<R>.json`: the sample keys this rank trained on and the step it started at.
    `sigterm_at=N` sends this process SIGTERM during step N (the interrupt callback saves at its end);
    `crash_at=N` raises once N steps are done, as if the run were killed after its last periodic checkpoint."""

    def __init__(self, out: str, tag: str, sigterm_at: int | None = None, crash_at: int | None = None) -> None:
        self.out, self.tag, self.sigterm_at, self.crash_at = Path(out), tag, sigterm_at, crash_at
        self.record: dict[str, Any] = {"keys": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.record["start_step"] = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        assert POSITION not in batch  # the loader's bookkeeping never reaches the model
        if self.crash_at is not None and trainer.global_step == self.crash_at:
            raise RuntimeError("killed")
        self.record["keys"] += list(batch["key"])
        if self.sigterm_at is not None and trainer.global_step == self.sigterm_at - 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.tag}-rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def probe(tmp_path: Path, tag: str, **kwargs: int) -> list[str]:
    return [
        "+callbacks.probe._target_=test_midepoch_resume.KeyProbe",
        f"+callbacks.probe.out={tmp_path}/probe",
        f"+callbacks.probe.tag={tag}",
        *(f"+callbacks.probe.{k}={v}" for k, v in kwargs.items()),
    ]


def keys_of(tmp_path: Path, tag: str, rank: int = 0) -> list[str]:
    return json.loads((tmp_path / "probe" / f"{tag}-rank{rank}.json").read_text())["keys"]


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """UNet, EMA, optimizer, LR schedule and noise streams bit for bit."""
    assert a["global_step"] == b["global_step"]
    wa, wb = trained_tensors(a["state_dict"]), trained_tensors(b["state_dict"])
    assert any(k.startswith("model_ema.") for k in wa) and wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} UNet/EMA tensors differ, e.g. {different[:3]}"
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for index, state in oa["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][index][name])), (index, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert all(torch.equal(x, y) for x, y in zip(a["noise_generators"], b["noise_generators"], strict=True))


def run_cut(tmp_path: Path, data: list[str], cut_by: str, tag: str = "first", cut: int = CUT) -> Path:
    """Train towards STEPS under runs/cut/, stopped at step `cut` by `cut_by`; returns its last.ckpt."""
    first = [*COMMON, *data]
    if cut_by == "sigterm":
        first += probe(tmp_path, tag, sigterm_at=cut)
    elif cut_by == "crash":
        first += ["callbacks.checkpoint.every_n_train_steps=" + str(cut), *probe(tmp_path, tag, crash_at=cut + 2)]
    else:
        first += [f"trainer.max_steps={cut}", *probe(tmp_path, tag)]
    cfg = compose_train(tmp_path, first, output_dir=f"${{paths.root}}/cut/{tag}")
    if cut_by == "crash":
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg)
    elif cut_by == "sigterm":
        with pytest.raises(Interrupted, match=f"SIGTERM at step {cut} of"):
            train(cfg)
    else:
        train(cfg)
    last = tmp_path / "runs" / "cut" / tag / "checkpoints" / "last.ckpt"
    assert load_ckpt(last)["global_step"] == cut
    return last


def resume_last(tmp_path: Path, data: list[str], tag: str = "resumed") -> Path:
    """`ckpt_path=last` to STEPS: resumes the newest run under runs/cut/ in its own folder."""
    cfg = compose_train(
        tmp_path, [*COMMON, *data, "ckpt_path=last", *probe(tmp_path, tag)], output_dir="${paths.root}/cut/new"
    )
    train(cfg)
    (last,) = (tmp_path / "runs" / "cut").glob("*/checkpoints/last.ckpt")
    return last


def straight(tmp_path: Path, data: list[str]) -> dict[str, Any]:
    train(compose_train(tmp_path, [*COMMON, *data, *probe(tmp_path, "straight")], output_dir="${paths.root}/straight"))
    return load_ckpt(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize(
    ("data", "cut_by"),
    [
        (["data.num_workers=2", "data.random_flip=true"], "sigterm"),  # save-on-interrupt's checkpoint
        (["data.num_workers=2", "data.random_flip=true"], "crash"),  # a periodic step file, the run killed later
        (["data.num_workers=0"], "max_steps"),  # a run that ended mid-epoch, trained on
        (["data.num_workers=0", "+data.epoch_length=5"], "max_steps"),  # ... and Lightning counting its batches
        (["data.num_workers=2", "trainer.accumulate_grad_batches=2"], "sigterm"),  # cut at batch 6 of 8
        (["data.num_workers=2", "+data.resampled=true", "+data.epoch_length=5"], "sigterm"),
    ],
    ids=["workers2-sigterm", "workers2-crash", "workers0-max_steps", "epoch_length-max_steps", "accumulate2", "resampled"],
)
def test_a_run_stopped_mid_epoch_resumes_exactly(tmp_path: Path, data: list[str], cut_by: str) -> None:
    accumulate = 2 if "trainer.accumulate_grad_batches=2" in data else 1
    a = straight(tmp_path, data)
    last = run_cut(tmp_path, data, cut_by)
    saved = load_ckpt(last)
    (position,) = saved["ShapesDataModule"]["streams"]["positions"]
    assert position["batches"] == CUT * accumulate and not position["final"]  # mid-epoch
    b = load_ckpt(resume_last(tmp_path, data))
    assert_same_training_state(a, b)
    done = CUT * accumulate * 4
    assert keys_of(tmp_path, "resumed") == keys_of(tmp_path, "straight")[done:]
    if cut_by != "crash":  # a crashed run trained past its checkpoint
        assert keys_of(tmp_path, "first") + keys_of(tmp_path, "resumed") == keys_of(tmp_path, "straight")


def test_without_the_saved_stream_position_the_resume_differs(tmp_path: Path) -> None:
    """The twin of the tests above with the stream's position taken out of the checkpoint, as checkpoints
    were before: the resumed epoch starts a new order (samples seen before the stop come again)."""
    data = ["data.num_workers=2", "data.random_flip=true"]
    a = straight(tmp_path, data)
    last = run_cut(tmp_path, data, "sigterm")
    target = last.resolve()
    saved = load_ckpt(target)
    del saved["ShapesDataModule"]["streams"]
    torch.save(saved, target)
    b = load_ckpt(resume_last(tmp_path, data))
    assert keys_of(tmp_path, "resumed") != keys_of(tmp_path, "straight")[CUT * 4 :]
    wa, wb = trained_tensors(a["state_dict"]), trained_tensors(b["state_dict"])
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def write_autoencoder(path: Path) -> Path:
    config = model_config("tiny")["first_stage"]
    vae = randomize_(AutoencoderKL(**config), std=0.05, seed=1)
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
                "ldm_config": {"first_stage": config}}, path)
    return path


def test_training_on_cached_latents_resumes_mid_epoch_exactly(tmp_path: Path) -> None:
    images = tmp_path / "images"
    ensure_demo_shards(str(images), 32, 8, 32, 0)
    ae = write_autoencoder(tmp_path / "ae.ckpt")
    cache_latents(ae, str(images), tmp_path / "latents", resolution=32, batch_size=4)
    data = [
        "data=cached_latents",
        f"data.train_shards={tmp_path / 'latents'}",
        "data.resolution=32",
        "data.batch_size=4",
        "data.shuffle_buffer=8",
        "data.num_workers=2",
        f"module.first_stage_ckpt={ae}",
    ]
    common = [c for c in COMMON if not c.startswith(("data.num_samples", "data.samples_per_shard"))]
    train(compose_train(tmp_path, [*common, *data, *probe(tmp_path, "straight")], output_dir="${paths.root}/straight"))
    a = load_ckpt(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt")
    cut = compose_train(tmp_path, [*common, *data, *probe(tmp_path, "first", sigterm_at=CUT)],
                        output_dir="${paths.root}/cut/first")
    with pytest.raises(Interrupted):
        train(cut)
    (position,) = load_ckpt(tmp_path / "runs/cut/first/checkpoints/last.ckpt")["WebDataModule"]["streams"]["positions"]
    assert position["batches"] == CUT
    train(compose_train(tmp_path, [*common, *data, "ckpt_path=last", *probe(tmp_path, "resumed")],
                        output_dir="${paths.root}/cut/new"))
    b = load_ckpt(tmp_path / "runs" / "cut" / "first" / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    assert keys_of(tmp_path, "first") + keys_of(tmp_path, "resumed") == keys_of(tmp_path, "straight")


def test_two_ddp_ranks_resume_mid_epoch_exactly(tmp_path: Path) -> None:
    """train.py on 2 CPU processes (gloo), each rank its own stream (16 samples, batches of 2), 6-batch
    epochs (`epoch_length`): cut at step 5, the end (step 8) in the next epoch."""
    # tests/ on the path for the probe: `tests` itself may name another package (torch-fidelity installs one)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}

    def run(tag: str, *overrides: str) -> None:
        command = [
            sys.executable, str(REPO / "train.py"), "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_steps=8",
            "trainer.enable_progress_bar=false", f"paths.root={tmp_path}/runs", f"data.root={tmp_path}/data",
            "data.num_samples=32", "data.samples_per_shard=8", "data.batch_size=2", "data.shuffle_buffer=8",
            "data.num_workers=0", "data.random_flip=true", "+data.epoch_length=6", "module.ema_decay=0.9",
            "callbacks.checkpoint.every_n_train_steps=5", *BARE, *probe(tmp_path, tag), *overrides,
        ]  # fmt: skip
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-4000:]

    run("straight", f"hydra.run.dir={tmp_path}/runs/straight")
    step5 = tmp_path / "runs" / "straight" / "checkpoints" / "step-0000005.ckpt"
    positions = load_ckpt(step5)["ShapesDataModule"]["streams"]["positions"]
    assert len(positions) == 2 and [p["batches"] for p in positions] == [5, 5]
    assert positions[0]["workers"][0]["url"] != positions[1]["workers"][0]["url"]  # each rank its own shards
    run("resumed", f"hydra.run.dir={tmp_path}/runs/resumed", f"ckpt_path={step5}")
    a = load_ckpt(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt")
    b = load_ckpt(tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    for rank in (0, 1):
        assert keys_of(tmp_path, "resumed", rank) == keys_of(tmp_path, "straight", rank)[5 * 2 :]


# ---------------------------------------------------------------- the stream alone, every cut


def _png(image: np.ndarray) -> bytes:
    buffer = __import__("io").BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _shards_with_bad_samples(folder: Path) -> list[str]:
    """5 shards of 6 to 9 samples, some malformed (among them a shard's last ones, after its last batch)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, size in enumerate((9, 6, 8, 7, 6)):
        with wds.TarWriter(str(folder / f"b-{s}.tar"), encoder=False) as writer:
            for i in range(size):
                image, caption = random_sample(rng, 16)
                sample = {"__key__": f"s{s}-{i}", "png": _png(image), "txt": caption.encode()}
                if (s + i) % 5 == 4 or (s == 2 and i >= 6):
                    sample = {"__key__": f"s{s}-{i}", "jpg": b"not an image", "txt": b"x"}
                writer.write(sample)
        paths.append(str(folder / f"b-{s}.tar"))
    return paths


def _stream(dm: WebDataModule) -> list[dict[str, Any]]:
    """One pass, its workers stopped after it: a persistent loader dropped unclosed keeps them until it is
    collected, and then waits on each (minutes in all, at a later test's garbage collection or at exit)."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    try:
        return list(loader)
    finally:
        loader.close()


@pytest.mark.parametrize(
    "settings",
    [
        {"num_workers": 0, "shuffle_buffer": 6},
        {"num_workers": 2, "shuffle_buffer": 6, "epoch_length": 9},  # the epoch's second pass too
        {"num_workers": 2, "shuffle_buffer": 0},  # 3 shards and 2: one worker ends first
        {"num_workers": 2, "shuffle_buffer": 6, "resampled": True, "epoch_length": 7},
    ],
    ids=["workers0", "workers2-epoch_length", "workers2-unshuffled", "workers2-resampled"],
)
def test_the_stream_goes_on_exactly_after_any_batch(tmp_path: Path, settings: dict[str, Any]) -> None:
    """Keys, pixels (random crops and flips), skip counts and skipped keys after every cut equal the
    uninterrupted stream's; so does what `skipped_samples` saves (skips of batches trained on)."""
    shards = _shards_with_bad_samples(tmp_path)

    def module() -> WebDataModule:
        return WebDataModule(shards, batch_size=2, resolution=16, random_crop=True, random_flip=True, **settings)

    full_dm = module()
    full = _stream(full_dm)
    assert sum(sum(b["skipped"].values()) for b in full) > 0
    cuts = range(1, len(full))
    if settings["num_workers"]:  # starting worker processes takes most of the time: the cuts that differ
        cuts = sorted({1, 2, 3, len(full) // 2, len(full) - 2, len(full) - 1})
    for cut in cuts:
        before = module()
        before.setup("fit")
        loader = before.train_dataloader()
        stream = iter(loader)
        for _ in range(cut):
            batch = next(stream)
            before.on_before_batch_transfer(batch, 0)
        next(stream)  # read ahead, as Lightning does: not trained on, not saved
        state = before.state_dict()
        stream.close()
        loader.close()
        trained_skips = Counter()
        for b in full[:cut]:
            trained_skips.update(b["skipped"])
        assert state["skipped_samples"] == dict(trained_skips)
        after = module()
        after.load_state_dict(state)
        rest = _stream(after)
        assert [b["key"] for b in rest] == [b["key"] for b in full[cut:]], cut
        for x, y in zip(rest, full[cut:], strict=True):
            assert torch.equal(x["image"], y["image"]) and x["skipped"] == y["skipped"]
            assert [d[:3] for d in x["dropped"]] == [d[:3] for d in y["dropped"]]
    # a changed setting: the saved position does not apply, the stream starts afresh
    changed = WebDataModule(shards, batch_size=3, resolution=16, **{**settings})
    changed.load_state_dict(state)
    assert [b["key"] for b in _stream(changed)] == [b["key"] for b in _stream(
        WebDataModule(shards, batch_size=3, resolution=16, **settings))]
    assert wdm.POSITION in full[0]
