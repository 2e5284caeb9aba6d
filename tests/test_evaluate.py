"""ldm-eval and ldm.metrics (issue 9): FID, KID, IS and CLIP score equal torchmetrics' own classes on random
weights saved in the formats the metric code loads; the CLI generates a prompt set that survives an interrupt,
scores existing images, caches reference features, and refuses bad input in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_
from hydra import compose, initialize_config_module
from PIL import Image

from ldm.checkpoint import checkpoint_from_model, save_checkpoint
from ldm.cli.sample import UsageError
from ldm.evaluate import run
from ldm.metrics import ImageMetrics, ImageSet, MetricError, load_clip, load_inception
from ldm.models.stable_diffusion import StableDiffusion

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square, small", "it's a (green:1.2) triangle", "a yellow star",
           "a purple ring", "an orange cross", "a white dot", "a black line"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_inception(path: Path) -> Path:
    """torch-fidelity's InceptionV3 at full size with random weights, saved as its weights file is (a state
    dict for torch.load). Batch-norm statistics are measured on random images, so features are of unit scale."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # The same random weights in every session (torch seeds each process differently): a value a test checks
    # does not change from one run to the next.
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    gen = torch.Generator().manual_seed(0)
    noise = [torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=gen) for size in (32, 48)]
    net.train()  # batch-norm statistics of pictures like the tests' (smooth ones, and the noisy ones random SD makes)
    with torch.no_grad():
        for batch in (smooth_images(4, 48, 0), *noise):
            net(batch)
    torch.save(net.state_dict(), path)
    return path


def write_clip(folder: Path) -> Path:
    """A tiny transformers CLIP folder as save_pretrained writes it, with CLIP's real tokenizer files."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ldm.models.encoders import write_clip_tokenizer

    torch.manual_seed(7)  # a random CLIP that scores the tests' pictures above 0, where CLIPScore does not clamp
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    write_clip_tokenizer(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def smooth_images(n: int, size: int, seed: int, shift: int = 0) -> torch.Tensor:
    """Image-like uint8 pictures (upsampled coarse noise), optionally brighter by `shift`."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=gen) * 200 + 20
    pictures = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (pictures + shift).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {"inception": write_inception(root / "weights-inception-2015-12-05-6726825d.pth"),
            "clip": write_clip(root / "clip")}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(checkpoint_from_model(randomize_(StableDiffusion.from_config(model_config("tiny")), std=0.05)), path)
    return path


def test_metrics_equal_torchmetrics_own_classes(weights: dict[str, Path]) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    real, shifted = smooth_images(6, 48, 1), smooth_images(6, 40, 2, shift=70)
    ours = ImageMetrics(["fid", "kid", "inception_score"], inception_weights=str(weights["inception"]),
                        kid_subsets=20, kid_subset_size=4, inception_splits=2, seed=3)
    ours.add_reference(real[:4])
    ours.add_reference(real[4:])
    ours.update(real[:3].clone())
    ours.update(real[3:].clone())
    against_itself = ours.compute()
    ours.reset()
    ours.update(shifted)
    against_shifted = ours.compute()
    assert abs(against_itself["fid"]) < 1e-3 * against_shifted["fid"]
    assert abs(against_itself["kid_mean"]) < 0.05 * against_shifted["kid_mean"]  # unbiased MMD: -O(1/m) on itself
    assert against_shifted["fid"] > 1 and against_shifted["kid_mean"] > 0

    def network(feature: str) -> NoTrainInceptionV3:  # what torchmetrics builds for an int/str feature
        return NoTrainInceptionV3("inception-v3-compat", [feature], feature_extractor_weights_path=str(weights["inception"]))

    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights["inception"]))
    kid = KernelInceptionDistance(feature=network("2048"), subsets=20, subset_size=4)
    inception = InceptionScore(feature=network("logits_unbiased"), splits=2)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(shifted, real=False)
    inception.update(shifted)
    torch.manual_seed(3)
    kid_mean, kid_std = kid.compute()
    torch.manual_seed(3)
    is_mean, is_std = inception.compute()
    theirs = {"fid": fid.compute(), "kid_mean": kid_mean, "kid_std": kid_std,
              "inception_score_mean": is_mean, "inception_score_std": is_std}
    assert set(against_shifted) == set(theirs)
    for key, value in theirs.items():
        assert against_shifted[key] == pytest.approx(float(value), rel=1e-4), key
    assert against_shifted["inception_score_mean"] > 1


def test_frechet_distance_is_torchmetrics_formula() -> None:
    """The symmetric eigenproblems give torchmetrics' `_compute_fid` (eigvals of Σ1 Σ2), full rank or not."""
    from torchmetrics.image.fid import _compute_fid

    from ldm.metrics import _centred_root, frechet_distance

    gen = torch.Generator().manual_seed(0)
    for n1, n2 in ((200, 150), (200, 10), (12, 9)):
        f1 = torch.randn(n1, 64, generator=gen, dtype=torch.float64)
        f2 = torch.randn(n2, 64, generator=gen, dtype=torch.float64) * 1.3 + 0.2
        m1, m2, c1, c2 = f1.mean(0), f2.mean(0), torch.cov(f1.t()), torch.cov(f2.t())
        theirs = float(_compute_fid(m1, c1, m2, c2))
        # Where Σ1 Σ2 is not of full rank torchmetrics adds the √ of its round-off eigenvalues (~1e-8 each).
        assert frechet_distance(m1, c1, m2, c2) == pytest.approx(theirs, rel=1e-6)
        assert frechet_distance(m1, c1, m2, c2, _centred_root(f2)) == pytest.approx(theirs, rel=1e-6)


def test_clip_score_equals_torchmetrics_clip_score(weights: dict[str, Path]) -> None:
    from transformers import CLIPModel, CLIPProcessor

    pictures = [smooth_images(2, 40, 4), smooth_images(1, 56, 5)]  # images of two sizes
    captions = ["a red circle", "a blue square on grey", "two cats, asleep"]
    ours = ImageMetrics(["clip_score"], clip_model=str(weights["clip"]))
    ours.update(pictures[0], captions[:2])
    ours.update(pictures[1], captions[2:])
    value = ours.compute()["clip_score"]
    # What torchmetrics.CLIPScore computes: 100 · cosine of the projected features, averaged, at least 0.
    model = CLIPModel.from_pretrained(weights["clip"], local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(weights["clip"], local_files_only=True)
    with torch.no_grad():
        image = model.get_image_features(**processor(images=[*pictures[0], *pictures[1]], return_tensors="pt"))
        text = model.get_text_features(**processor(text=captions, return_tensors="pt", padding=True))
    image, text = (getattr(f, "pooler_output", f) for f in (image, text))
    cosine = torch.nn.functional.cosine_similarity(image, text)
    assert value > 0 and value == pytest.approx(max(100 * cosine.mean().item(), 0.0), rel=1e-4)


def write_open_clip(folder: Path) -> torch.nn.Module:
    """A tiny OpenCLIP folder as MLPerf downloads ViT-H/14: open_clip_config.json + open_clip_pytorch_model.bin."""
    from open_clip.model import CLIP

    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                                             "head_width": 16},
                            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = CLIP(**config["model_cfg"]).eval()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model


def test_openclip_folder_clip_score(tmp_path: Path) -> None:
    """An OpenCLIP folder as MLPerf downloads ViT-H/14 (open_clip_config.json + open_clip_pytorch_model.bin), here
    tiny: CLIPScore's number with OpenCLIP's own preprocessing and tokenizer."""
    import open_clip

    model = write_open_clip(tmp_path)
    pictures, captions = smooth_images(3, 40, 6), ["a red circle", "a blue square on grey", "two cats, asleep"]
    ours = ImageMetrics(["clip_score"], clip_model=str(tmp_path))
    ours.update(pictures, captions)
    preprocess = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pictures]))
        text = model.encode_text(open_clip.tokenize(captions))
    expected = 100 * torch.nn.functional.cosine_similarity(image, text).mean().item()
    assert expected > 0 and ours.compute()["clip_score"] == pytest.approx(expected, rel=1e-4)
    assert ours.weights["clip"]["path"] == str(tmp_path)


def test_bad_weights_are_one_line(tmp_path: Path, weights: dict[str, Path]) -> None:
    wrong = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, wrong)
    with pytest.raises(MetricError, match=r"is not torch-fidelity.s InceptionV3 \(\d+ missing keys, 1 unexpected keys, 1 tensors of another shape\)"):
        load_inception(wrong)
    sd = torch.load(weights["inception"], weights_only=True)
    sd["fc.weight"] = torch.zeros(10, 2048)
    torch.save(sd, wrong)
    with pytest.raises(MetricError, match=r"\(1 tensors of another shape\)"):
        load_inception(wrong)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MetricError, match="is a 'bert' model, not CLIP"):
        load_clip(bert)
    with pytest.raises(MetricError, match="weights-inception-2015-12-05-6726825d.pth") as err:
        ImageMetrics(["fid"], inception_weights=str(tmp_path / "nowhere.pth"))
    assert "\n" not in str(err.value) and "releases/download" in str(err.value)


def test_image_sets_convert_modes_and_read_shards(tmp_path: Path) -> None:
    import tarfile

    folder = tmp_path / "mixed"
    folder.mkdir()
    rgb = np.asarray(Image.fromarray(smooth_images(1, 24, 0)[0].permute(1, 2, 0).numpy()))
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(rgb).convert("L").save(folder / "b.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "c.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "d.jpg")
    images = ImageSet.from_folder(folder)
    arrays = [a for _, a in images.iter_arrays()]
    assert [a.shape for a in arrays] == [(24, 24, 3)] * 4
    assert images.conversion_note("reference") == "reference: 3 of 4 images converted to RGB (1 CMYK, 1 L, 1 RGBA)"
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("a.png", "b.png"):
            tar.add(folder / name, arcname=f"{name[0]}.png")
            caption = tmp_path / f"{name[0]}.txt"
            caption.write_text(f"caption {name[0]}")
            tar.add(caption, arcname=f"{name[0]}.txt")
    from_shards = ImageSet.from_spec(str(shard))
    assert [i.caption for i in from_shards.items] == ["caption a", "caption b"]
    assert len(list(from_shards.iter_batches(8))[0][1]) == 2


def test_mlperf_captions_table_names_its_pictures_through_image_template(tmp_path: Path) -> None:
    """MLPerf's val2014_30k.tsv has image_id, id and caption, no file name: image_template makes the path."""
    from ldm.evaluate import read_prompt_set

    tsv = tmp_path / "coco2014" / "val2014_30k.tsv"
    tsv.parent.mkdir()
    tsv.write_text("image_id\tid\tcaption\n9\t42\tA man riding a wave.\n139\t7\ta kitchen, with a stove\n")
    template = "val2014/COCO_val2014_{image_id:012d}.jpg"
    prompts = read_prompt_set(str(tsv), image_template=template)
    assert prompts.captions == ["A man riding a wave.", "a kitchen, with a stove"]
    assert prompts.images == [str(tsv.parent / "val2014" / "COCO_val2014_000000000009.jpg"),
                              str(tsv.parent / "val2014" / "COCO_val2014_000000000139.jpg")]
    assert read_prompt_set(str(tsv)).images is None  # without it: captions only
    with pytest.raises(UsageError, match=r"does not fit row 1 .*'image_id', 'id', 'caption'") as err:
        read_prompt_set(str(tsv), image_template="{file_name}")
    assert "\n" not in str(err.value)
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(UsageError, match="is not a .csv/.tsv/.jsonl table"):
        read_prompt_set(str(tmp_path / "p.txt"), image_template=template)


def eval_config(overrides: list[str]):
    from ldm.cli.overrides import rewrite_argv

    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        return compose(config_name="eval", overrides=rewrite_argv(overrides))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, weights: dict[str, Path], ckpt: Path) -> None:
    empty, prompts, no_images = tmp_path / "empty.txt", tmp_path / "prompts.txt", tmp_path / "no-images"
    empty.write_text("\n  \n")
    prompts.write_text("\n".join(PROMPTS[:2]))
    no_images.mkdir()
    (no_images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    common = [f"ckpt={ckpt}", f"out_dir={out}", f"inception_weights={weights['inception']}", f"clip_model={weights['clip']}"]
    cases = [
        ([f"prompts={empty}", f"reference={no_images}"], UsageError, "holds no prompts"),
        ([f"prompts={prompts}", f"reference={no_images}"], MetricError, "holds no images"),
        ([f"prompts={prompts}"], UsageError, "fid, kid compare with real images: give reference="),
        ([f"prompts={prompts}", f"reference={no_images}", "inception_weights=nowhere.pth"], MetricError,
         "inception_weights=nowhere.pth does not exist: fid, kid, inception_score need"),
        ([f"prompts={prompts}", "metrics=[clip_score]", "clip_model=nowhere"], MetricError, "clip_model=nowhere does not exist"),
        ([f"prompts={prompts}", "metrics=[fid,psnr]"], MetricError, "unknown psnr"),
    ]
    for overrides, kind, message in cases:
        with pytest.raises(kind, match=message.replace("(", r"\(")) as err:
            run(eval_config([*common, *overrides]))
        assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())


def ldm_eval(*args: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "ldm.evaluate", *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_interrupted_generation_resumes_with_the_same_metrics(tmp_path: Path, weights: dict[str, Path], ckpt: Path) -> None:
    prompts, reference, cache = tmp_path / "prompts.txt", tmp_path / "reference", tmp_path / "cache"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    reference.mkdir()
    for i, picture in enumerate(smooth_images(6, 32, 7)):
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(reference / f"ref{i}.png")
    args = [f"ckpt={ckpt}", f"prompts={prompts}", f"reference={reference}", f"cache_dir={cache}", "steps=12",
            "sampler=euler_a", "batch_size=2", f"inception_weights={weights['inception']}", f"clip_model={weights['clip']}",
            "kid_subsets=10", "inception_splits=2", "negative_prompt=blurry, low quality", "device=cpu"]
    whole = ldm_eval(*args, f"out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert "kid: subset size 1000 is more than the 6 reference images: shrunk to 6" in whole.stdout
    assert {"fid", "kid_mean", "kid_std", "clip_score", "inception_score_mean", "inception_score_std"} <= set(expected)
    assert expected["num_images"] == 8 and expected["weights"]["inception"]["sha256"] and expected["clip_score"] > 0
    assert expected["settings"]["negative_prompt"] == "blurry, low quality"

    out = tmp_path / "resumed"
    started = ldm_eval(*args, f"out_dir={out}", background=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.png"))) < 2 and time.monotonic() < deadline and started.poll() is None:
        time.sleep(0.05)
    started.send_signal(signal.SIGINT)
    _, stderr = started.communicate(timeout=120)
    assert started.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again" in stderr
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(kept) < 8 and not (out / "metrics.json").exists()
    # The reference is read once: its files now hold other bytes (same sizes, same times); a second read fails.
    for path in reference.iterdir():
        stat = path.stat()
        path.write_bytes(b"\0" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resumed = ldm_eval(*args, f"out_dir={out}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(kept)} of 8 images are in" in resumed.stdout and "features from the cache" in resumed.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in kept} == kept
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(8)]
    for name in sorted(kept) + ["00007.png"]:
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(tmp_path / "whole" / name)))
    got = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "kid_mean", "kid_std", "clip_score", "inception_score_mean", "inception_score_std"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key

    # Another run's images in the same folder are refused, naming the image and the setting.
    with pytest.raises(UsageError, match=r"00000.png was made with other settings \(seed 0, this run 5\)"):
        run(eval_config([*args, f"out_dir={out}", "seed=5"]))

    # Scoring what exists: captions from the PNGs' settings; a mixed-mode reference smaller than KID's subset.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, (picture, mode) in enumerate(zip(smooth_images(4, 32, 9), ["RGB", "L", "RGBA", "CMYK"], strict=True)):
        Image.fromarray(picture.permute(1, 2, 0).numpy()).convert(mode).save(mixed / f"m{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    scored = ldm_eval(f"images={out}", f"reference={mixed}", f"out_dir={tmp_path / 'scored'}", f"cache_dir={cache}",
                      f"inception_weights={weights['inception']}", f"clip_model={weights['clip']}",
                      "metrics=[fid,kid,clip_score]", "device=cpu")
    assert scored.returncode == 0, scored.stderr
    assert "reference: 3 of 4 images converted to RGB (1 CMYK, 1 L, 1 RGBA)" in scored.stdout
    assert "kid: subset size 1000 is more than the 4 reference images: shrunk to 4" in scored.stdout
    report = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert report["clip_score"] == pytest.approx(expected["clip_score"], rel=1e-6)
    assert report["num_images"] == 8 and report["num_reference_images"] == 4 and "inception_score_mean" not in report


def test_help_and_config_errors_answer_without_torch(tmp_path: Path) -> None:
    probe = """
import json, sys
sys.argv = json.loads(sys.argv[1])
from ldm.evaluate import main
code = 0
try:
    main()
except SystemExit as err:
    code = err.code if isinstance(err.code, int) else 1
print(json.dumps({"code": code, "imported": [m for m in ("torch", "torchmetrics", "transformers") if m in sys.modules]}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for argv, code in ((["ldm-eval", "--help"], 0), (["ldm-eval", "stepz=3"], 2)):
        done = subprocess.run([sys.executable, "-c", probe, json.dumps(argv)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report == {"code": code, "imported": []}, done.stderr
        if code == 2:
            assert done.stderr.strip() == "ldm-eval: error: unknown key stepz (did you mean steps?); `ldm-eval --cfg job` lists the keys"


def test_bad_input_typed_on_the_command_line_is_one_line(tmp_path: Path, weights: dict[str, Path], ckpt: Path) -> None:
    """What test_bad_input_is_one_line_and_writes_nothing checks through compose, as a user meets it: the
    `ldm-eval` command (python -m ldm.evaluate) exits 2 with one line naming the problem, and writes nothing."""
    empty, prompts, mixed = tmp_path / "empty.txt", tmp_path / "prompts.txt", tmp_path / "no-images"
    empty.write_text("\n  \n")
    prompts.write_text("\n".join(PROMPTS[:2]))
    mixed.mkdir()
    (mixed / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    common = [f"ckpt={ckpt}", f"out_dir={out}", f"inception_weights={weights['inception']}", f"clip_model={weights['clip']}"]
    for overrides, message in (([f"prompts={empty}", f"reference={mixed}"], "holds no prompts"),
                               ([f"prompts={prompts}", f"reference={mixed}"], "holds no images")):
        done = ldm_eval(*common, *overrides)
        assert done.returncode == 2, done.stderr[-3000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ldm-eval: error: ") and message in lines[0], done.stderr[-3000:]
    # Hydra's run log (evaluate.log) is the one file a run writes before its checks; no image, no metrics.json
    assert {p.name for p in out.rglob("*") if not p.is_dir()} <= {"evaluate.log"}
