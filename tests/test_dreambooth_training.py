"""DreamBooth training with prior preservation (issue 11, item 1): `experiment=dreambooth` through train.py on
a tiny random base checkpoint and a folder of a few pictures. The base model's class pictures are made once
(a second run from the same base and class prompt samples none); batches hold the instance rows, then the
class rows; the loss is the instance rows' mean + module.prior_loss_weight x the class rows' mean; a run
cut and resumed with ckpt_path=last reads the uninterrupted run's samples and ends with its weights, bit for
bit; bad input stops with one `train.py: error:` line that names the fix."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import pytest
import torch
from helpers import logging_as_it_was, randomize_, tiny_sd_file
from PIL import Image
from test_host_sync import no_device_reads
from test_train import (
    BARE,
    QUIET,
    _one_thread,  # noqa: F401 (autouse: tiny models on one thread)
    compose_train,
    load_ckpt,
    trained_tensors,
)

from ldm import sampling
from ldm.cli.train import train
from ldm.data.dreambooth import DreamBoothDataModule, token_count, trigger_words
from ldm.lightning.module import LatentDiffusion

REPO = Path(__file__).resolve().parent.parent
INSTANCE, CLASS = "a photo of sks dog", "a photo of dog"
NUM_CLASS = 3
# the tiny model at 32 px squares (experiment=dreambooth's aspect-ratio buckets: test_dreambooth_buckets.py); the
# class pictures sampled in 2 steps
TINY = [
    "model=tiny", "trainer=cpu", "logger=csv", "module.compile=false", "module.channels_last=false",
    "data.resolution=32", "data.buckets=false", "data.num_workers=0", f"data.num_class_images={NUM_CLASS}",
    "data.class_steps=2", "data.class_batch_size=2", "data.class_guidance_scale=3.0", "callbacks.sample_images=null",
]




@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD checkpoint (the weights DreamBooth starts from and samples class pictures with)."""
    return tiny_sd_file(tmp_path_factory.mktemp("base") / "tiny.safetensors")


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three pictures: one with its own caption, one smaller than the 32 px resolution."""
    folder = tmp_path_factory.mktemp("dog")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 48), "b.jpg": (36, 36), "c.webp": (24, 40)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name, quality=95)
    (folder / "b.txt").write_text("a photo of sks dog on a sofa\n")
    (folder / "notes.md").write_text("not a picture")
    return folder


class BatchProbe(L.Callback):
    """Records, per tag, what every training batch held: captions, `prior` and a hash of each image row."""

    records: ClassVar[dict[str, list[dict[str, Any]]]] = {}

    def __init__(self, tag: str) -> None:
        self.tag = tag
        BatchProbe.records[tag] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        BatchProbe.records[self.tag].append({
            "caption": list(batch["caption"]),
            "prior": batch["prior"].tolist(),
            "images": [hashlib.sha256(row.numpy().tobytes()).hexdigest()[:12] for row in batch["image"]],
            "shape": tuple(batch["image"].shape),
            "input_ids": "input_ids" in batch,
        })


def probe(tag: str) -> list[str]:
    return ["+callbacks.probe._target_=test_dreambooth_training.BatchProbe", f"+callbacks.probe.tag={tag}"]


def dreambooth(root: Path, base: Path, instances: Path, *overrides: str, output_dir: str = "${paths.root}/run"):
    return compose_train(root, [
        "experiment=dreambooth", *TINY, f"init_from={base}", f"data.instance_dir={instances}",
        f"data.instance_prompt={INSTANCE}", f"data.class_prompt={CLASS}", *BARE, *QUIET, *overrides,
    ], output_dir=output_dir)


@pytest.fixture
def sampled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every sampling call (class pictures are made by sampling.generate)."""
    calls: list[int] = []
    real = sampling.generate

    def counting(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", counting)
    return calls


def test_train_py_makes_the_class_pictures_once_and_batches_hold_instance_then_class_rows(
    tmp_path: Path, base: Path, instances: Path, sampled: list[int], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "experiment=dreambooth", *TINY, f"init_from={base}",
         f"data.instance_dir={instances}", "trainer.max_steps=2", f"paths.root={tmp_path}/runs", *QUIET],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"making {NUM_CLASS} of {NUM_CLASS} class images of '{CLASS}'" in result.stderr + result.stdout
    (folder,) = (tmp_path / "runs" / "class_images").iterdir()  # the default cache: under paths.root
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(NUM_CLASS)]
    made = {p: p.stat().st_mtime_ns for p in pngs}
    (last,) = (tmp_path / "runs" / "dreambooth").glob("*/checkpoints/last.ckpt")
    assert load_ckpt(last)["global_step"] == 2

    # A second run from the same base and class prompt: no model loaded for sampling, nothing sampled.
    import ldm.checkpoint

    monkeypatch.setattr(ldm.checkpoint, "load_model", lambda *a, **k: pytest.fail("the base was loaded to sample"))
    caplog.set_level(logging.WARNING, logger="ldm.data.dreambooth")
    train(dreambooth(tmp_path, base, instances, "trainer.max_steps=2", "data.batch_size=2",
                     f"data.class_cache={tmp_path}/runs/class_images", *probe("second")))
    assert sampled == [] and {p: p.stat().st_mtime_ns for p in pngs} == made
    batches = BatchProbe.records["second"]
    assert len(batches) == 2
    for batch in batches:
        assert batch["shape"] == (4, 3, 32, 32) and batch["prior"] == [False, False, True, True]
        assert batch["caption"][2:] == [CLASS, CLASS]
        assert set(batch["caption"][:2]) <= {INSTANCE, "a photo of sks dog on a sofa"}  # b.txt is b.jpg's caption
        assert batch["input_ids"]  # tokenized in the loader, by the model's tokenizer
    seen = [c for b in batches for c in b["caption"][:2]]
    assert "a photo of sks dog on a sofa" in seen and INSTANCE in seen  # 4 samples: all 3 pictures, cycled
    assert "1 of 3 instance picture(s) are smaller than data.resolution=32: upscaled" in caplog.text
    assert "trigger word" not in caplog.text  # "sks" is one token


def test_the_loss_is_the_instance_mean_plus_the_weighted_class_mean(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["model=tiny", "module.min_snr_gamma=5.0"])
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_")
    module: LatentDiffusion = instantiate(cfg.module, model=model_cfg, _convert_="all")
    randomize_(module.model, std=0.05, seed=1)  # a fresh UNet's zero output layer would predict 0 everywhere
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = module.encode_text(["a photo of sks dog"] * 2 + ["a photo of dog"] * 2)
    prior = torch.tensor([False, False, True, True])

    start = module.generator.get_state()
    with torch.no_grad():
        # the per-sample losses by hand, from the same draws: w(t) |eps_pred - eps|^2, min-SNR weighted
        g = module.generator
        t = torch.randint(0, module.schedule.num_timesteps, (4,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        pred = module.apply_model(module.schedule.q_sample(z0, t, noise), t, context)
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3)) * module.schedule.min_snr_weight(t, 5.0, "epsilon")
        for weight in (0.5, 0.0, 1.0):
            module.prior_loss_weight = weight
            g.set_state(start)
            with no_device_reads():  # the split stays on the device: no host read per step
                loss = module.diffusion_loss(z0, context, prior=prior)
            expected = per_sample[:2].mean() + weight * per_sample[2:].mean()
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
            instance, class_part = module._loss_parts
            torch.testing.assert_close(instance, per_sample[:2].mean(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(class_part, per_sample[2:].mean(), rtol=1e-5, atol=1e-6)
        g.set_state(start)
        torch.testing.assert_close(module.diffusion_loss(z0, context), per_sample.mean())  # without `prior`: as before
    assert per_sample[:2].mean() != per_sample[2:].mean()  # the test tells the parts apart


def test_a_run_cut_and_resumed_reads_the_same_samples_and_ends_with_the_same_weights(
    tmp_path: Path, base: Path, instances: Path
) -> None:
    common = ["data.batch_size=2", "data.random_flip=true", "module.optimizer.lr=1e-3", "trainer.max_steps=4",
              "trainer.accumulate_grad_batches=2", "callbacks.checkpoint.every_n_train_steps=1000"]
    train(dreambooth(tmp_path, base, instances, *common, *probe("straight"), output_dir="${paths.root}/straight"))
    train(dreambooth(tmp_path, base, instances, *common, "trainer.max_steps=2", *probe("first"),
                     output_dir="${paths.root}/cut/first"))
    train(dreambooth(tmp_path, base, instances, *common, "ckpt_path=last", *probe("resumed"),
                     output_dir="${paths.root}/cut/new"))
    straight, first, resumed = (BatchProbe.records[k] for k in ("straight", "first", "resumed"))
    assert len(straight) == 8 and len(first) == 4 and len(resumed) == 4  # 2 batches a step
    assert first + resumed == straight  # the same pictures, crops, flips and class rows, in order
    assert straight[0]["images"] != straight[4]["images"]  # (the stream does move on)
    a = load_ckpt(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt")
    (cut,) = (tmp_path / "runs" / "cut").glob("*/checkpoints/last.ckpt")
    b = load_ckpt(cut)
    assert a["global_step"] == b["global_step"] == 4
    wa, wb = trained_tensors(a["state_dict"]), trained_tensors(b["state_dict"])
    assert wa and wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} UNet tensors differ after resume, e.g. {different[:3]}"


def test_ranks_take_disjoint_slices_of_each_global_batch(instances: Path) -> None:
    dm = DreamBoothDataModule(str(instances), INSTANCE, resolution=32, batch_size=2)
    dm.setup("fit")
    whole = dm.batches()
    rank0, rank1 = (dm.batches() for _ in range(2))
    rank0.rank, rank0.world_size, rank1.rank, rank1.world_size = 0, 2, 1, 2
    for b in range(3):  # global batch b of two ranks = single-rank batches 2b and 2b + 1
        assert rank0.sample_indices(b) == whole.sample_indices(2 * b)
        assert rank1.sample_indices(b) == whole.sample_indices(2 * b + 1)
        assert torch.equal(rank1[b]["image"], whole[2 * b + 1]["image"])
    # each pass over the pictures shows every one once, in a new order per pass
    order = [whole.instances.index(k) for k in range(9)]
    assert all(sorted(order[i:i + 3]) == [0, 1, 2] for i in (0, 3, 6)) and len({tuple(order[i:i + 3]) for i in (0, 3, 6)}) > 1


def test_experiment_dreambooth_lora_runs(tmp_path: Path, base: Path, instances: Path) -> None:
    cfg = compose_train(tmp_path, [
        "experiment=dreambooth_lora", *TINY, f"init_from={base}", f"data.instance_dir={instances}",
        "trainer.max_steps=2", *BARE, *QUIET,
    ], output_dir="${paths.root}/lora")
    assert cfg.module.lora.rank == 8 and cfg.module.optimizer.lr == 1e-4 and cfg.module.prior_loss_weight == 1.0
    metrics = train(cfg)
    assert {"train/instance_loss", "train/prior_loss"} <= metrics.keys()
    assert (tmp_path / "runs" / "lora" / "lora.safetensors").is_file()


def test_trigger_words_and_their_token_counts() -> None:
    assert trigger_words(INSTANCE, CLASS) == ["sks"]
    assert trigger_words("arcane style", None) == ["arcane", "style"]
    from ldm.models.encoders import ClipBPETokenizer

    tokenizer = ClipBPETokenizer()
    assert token_count(tokenizer, "sks") == 1
    assert token_count(tokenizer, "qzxvwkjplmb") >= 3


def train_py(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """train.py's own entry point in this process, with a user's command line: (exit status, stderr)."""
    from ldm.cli import train as train_cli

    monkeypatch.setattr(sys, "argv", ["train.py", *args, f"paths.root={tmp_path}/runs", "logger=none", *QUIET])
    capsys.readouterr()
    with logging_as_it_was():
        try:
            train_cli.main()
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "caption.txt").write_text("no picture here")
    return folder


def bad_inputs(base: Path, instances: Path, empty: Path, missing: Path) -> dict[str, tuple[list[str], str]]:
    plain = ["data=dreambooth", *TINY, f"data.instance_prompt={INSTANCE}", "trainer.max_steps=1"]
    return {
        "missing instance_dir": ([*plain, f"data.instance_dir={missing}"],
                                 f"data.instance_dir={missing} is not a folder"),
        "no pictures": ([*plain, f"data.instance_dir={empty}"],
                        f"data.instance_dir={empty} holds no pictures: put the subject's pictures there as .jpg, .jpeg, .png, .webp"),
        "no caption": (["data=dreambooth", *TINY, f"data.instance_dir={instances}", "trainer.max_steps=1"],
                       "have no caption (a.png has no a.txt): set data.instance_prompt"),
        "weight without class_prompt": ([*plain, f"data.instance_dir={instances}", f"init_from={base}",
                                         "module.prior_loss_weight=1.0"],
                                        "module.prior_loss_weight=1.0 weighs the class pictures' loss, but data.class_prompt is not set"),
        "class_prompt without base": ([*plain, f"data.instance_dir={instances}", f"data.class_prompt={CLASS}"],
                                      "prior preservation samples the base model: set module.init_from=..."),
        "null as text": ([*plain, f"data.instance_dir={instances}", f"init_from={base}", "data.class_prompt=null"],
                         "data.class_prompt='null' would be taken as text: to leave it unset give data.class_prompt= (empty)"),
        "experiment without instance_dir": (["experiment=dreambooth", *TINY, f"init_from={base}"],
                                            "missing mandatory value(s): data.instance_dir"),
        "experiment without init_from": (["experiment=dreambooth", *TINY, f"data.instance_dir={instances}"],
                                         "prior preservation samples the base model: set module.init_from=..."),
    }


@pytest.mark.parametrize("case", ["missing instance_dir", "no pictures", "no caption", "weight without class_prompt",
                                  "class_prompt without base", "null as text",
                                  "experiment without instance_dir", "experiment without init_from"])
def test_bad_input_stops_with_one_line_naming_the_fix(
    case: str, tmp_path: Path, base: Path, instances: Path, empty_dir: Path, sampled: list[int],
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    args, expected = bad_inputs(base, instances, empty_dir, tmp_path / "nope")[case]
    code, err = train_py(tmp_path, capsys, monkeypatch, *args)
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: "), err[-3000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in err and sampled == []
    assert not list((tmp_path / "runs").glob("*/*/checkpoints/*"))


def test_a_trigger_word_of_many_tokens_gets_a_warning_with_the_count(
    tmp_path: Path, base: Path, instances: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ldm.data.dreambooth")
    train(dreambooth(tmp_path, base, instances, "trainer.max_steps=1", "data.instance_prompt=a photo of qzxvwkjplmb dog",
                     "data.class_prompt=null", "module.prior_loss_weight=0"))
    (line,) = [r.getMessage() for r in caplog.records if "trigger word" in r.getMessage()]
    assert "'qzxvwkjplmb' of data.instance_prompt splits into" in line and "tokens" in line


def test_the_data_module_alone_checks_the_base_at_setup(instances: Path) -> None:
    """Built in Python (no train.py to check the config first), setup says the same."""
    from types import SimpleNamespace

    from ldm.cli.sample import UsageError

    dm = DreamBoothDataModule(str(instances), INSTANCE, resolution=32, class_prompt=CLASS)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(init_from=None, prior_loss_weight=1.0),
                                 global_rank=0, world_size=1)
    with pytest.raises(UsageError, match=r"prior preservation samples the base model: set module\.init_from="):
        dm.prepare_data()
    with pytest.raises(UsageError, match=r"set module\.init_from="):
        dm.setup("fit")
