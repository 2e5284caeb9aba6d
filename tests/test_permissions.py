"""Files we write get the permissions a plain open() gives under the user's umask, through the real command
lines: under umask 022 every file that train.py (checkpoints, samples, CSV logs, demo data, the LoRA export),
sample.py, ldm-convert, ldm-shards, ldm-compare and ldm-eval write is 0644 and every folder 0755, not the 0600/0700 of a temporary
file; under umask 077 they are 0600/0700. Issue 8, item 4."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's console scripts (ldm-convert, ldm-shards)
TINY = [
    "data.num_samples=16", "data.samples_per_shard=8", "data.batch_size=4", "data.shuffle_buffer=8",
    "data.num_workers=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false", "callbacks.sample_images.steps=2",
]


def cli(command: list[str], cwd: Path, umask: int = 0o022) -> str:
    """Run a command line under `umask` from `cwd` (hash cache in cwd/cache); its output, after asserting success."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LDM_CACHE_DIR": str(cwd / "cache")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: os.umask(umask))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)}\n{output[-3000:]}"
    return output


def written(top: Path) -> list[Path]:
    """Every file and folder under `top` (not `top` itself, which the test made), symlinks left out."""
    return sorted(p for p in top.rglob("*") if not p.is_symlink())


def assert_modes(paths: list[Path], umask: int) -> None:
    """Exactly the umask's permissions: what open() and mkdir() give a new file and folder."""
    wrong = []
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (0o777 if path.is_dir() else 0o666) & ~umask:
            wrong.append(f"{path}: {oct(mode)}")
    assert not wrong, f"under umask {umask:03o}:\n" + "\n".join(wrong)


def names(paths: list[Path]) -> set[str]:
    return {p.name for p in paths}


def train(cwd: Path, *overrides: str) -> Path:
    """`python train.py` with tiny demo data in cwd; its run folder."""
    cli([sys.executable, str(REPO / "train.py"), f"paths.root={cwd}/runs", f"data.root={cwd}/data", *TINY, *overrides], cwd)
    (run,) = (cwd / "runs" / "default").iterdir()
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short run (step files every 2 steps, samples every 2): the folder it ran in, shared by the tests."""
    cwd = tmp_path_factory.mktemp("train")
    train(cwd, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2", "callbacks.sample_images.every_n_steps=2")
    return cwd


def last_ckpt(trained: Path) -> Path:
    (path,) = trained.glob("runs/default/*/checkpoints/last.ckpt")
    return path


def test_train_writes_checkpoints_samples_logs_and_data_world_readable(trained: Path) -> None:
    paths = written(trained)
    assert {"step-0000002.ckpt", "step-0000004.ckpt", "metrics.csv", "hparams.yaml", "train.log", "config.yaml",
            "step-0000004.png", "step-0000004.txt", "MANIFEST.json", "shapes-000001.tar"} <= names(paths)
    assert_modes(paths, 0o022)


def test_lora_export_is_world_readable(trained: Path, tmp_path: Path) -> None:
    run = train(tmp_path, "trainer.max_steps=2", "module.lora={rank:2,alpha:4}", f"init_from={last_ckpt(trained)}")
    paths = written(tmp_path)
    # last.ckpt links to the final step file (the link itself has no mode of its own)
    assert run / "lora.safetensors" in paths and run / "checkpoints" / "step-0000002.ckpt" in paths
    assert (run / "checkpoints" / "last.ckpt").resolve() == run / "checkpoints" / "step-0000002.ckpt"
    assert_modes(paths, 0o022)


def test_sample_writes_world_readable_images_log_and_hash_cache(trained: Path, tmp_path: Path) -> None:
    cli([sys.executable, str(REPO / "sample.py"), f"ckpt={last_ckpt(trained)}", "prompt=a red circle", "steps=2",
         "height=32", "width=32", "num_images=2", f"out_dir={tmp_path}/out/samples"], tmp_path)
    paths = written(tmp_path)
    assert {"00000.png", "00001.png", "grid-00000.png", "sample.log", "hashes.json"} <= names(paths)
    assert_modes(paths, 0o022)


def test_compare_and_eval_write_world_readable_grids_cells_and_metrics(trained: Path, tmp_path: Path) -> None:
    from test_evaluate import write_inception

    ckpt = last_ckpt(trained)
    cli([str(BIN / "ldm-compare"), f"base={ckpt}", f"variants=[{ckpt}]", "prompt=a red circle", "steps=2",
         "height=32", "width=32", "out_dir=out/compare"], tmp_path)
    (tmp_path / "weights").mkdir()
    weights = write_inception(tmp_path / "weights" / "inception.pth")
    cli([str(BIN / "ldm-eval"), "images=out/compare/grid-00000", "reference=out/compare/grid-00000",
         f"inception_weights={weights}", "metrics=[fid]", "out_dir=out/eval"], tmp_path)
    paths = [p for p in written(tmp_path) if tmp_path / "weights" not in p.parents]
    assert {"grid-00000.png", "grid-00000.json", "r00-c00.png", "r00-c01.png", "metrics.json"} <= names(paths)
    assert_modes(paths, 0o022)


def test_convert_writes_world_readable_files_and_folders(trained: Path, tmp_path: Path) -> None:
    ckpt = last_ckpt(trained)
    cli([sys.executable, "-m", "ldm.convert", str(ckpt), "out/m.safetensors"], tmp_path)
    cli([str(BIN / "ldm-convert"), str(ckpt), "out/m.ckpt"], tmp_path)
    cli([sys.executable, "-m", "ldm.convert", str(ckpt), "out/pipe"], tmp_path)
    paths = written(tmp_path)
    out = tmp_path / "out"
    assert {out / "m.safetensors", out / "m.ckpt", out / "pipe" / "unet" / "diffusion_pytorch_model.safetensors",
            out / "pipe" / "tokenizer" / "vocab.json", out / "pipe" / "model_index.json"} <= set(paths)
    assert_modes(paths, 0o022)


def test_a_stricter_umask_is_honoured_and_a_copy_gets_the_users_own(trained: Path, tmp_path: Path) -> None:
    """Under umask 077 a diffusers folder (and the folders above it) is 0700/0600; converting that folder
    under 022 gives 0755/0644 throughout, its tokenizer copied as new files, not with the source's 0600."""
    strict = tmp_path / "strict"
    strict.mkdir()
    cli([sys.executable, "-m", "ldm.convert", str(last_ckpt(trained)), "a/b/pipe"], strict, umask=0o077)
    paths = written(strict)
    assert strict / "a" / "b" / "pipe" / "tokenizer" / "merges.txt" in paths
    assert_modes(paths, 0o077)

    usual = tmp_path / "usual"
    usual.mkdir()
    cli([sys.executable, "-m", "ldm.convert", str(strict / "a" / "b" / "pipe"), "pipe"], usual)
    paths = written(usual)
    assert usual / "pipe" / "tokenizer" / "merges.txt" in paths
    assert_modes(paths, 0o022)


def test_shards_are_world_readable(tmp_path: Path) -> None:
    src, cwd = tmp_path / "src", tmp_path / "run"
    (src / "sub").mkdir(parents=True)
    cwd.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(src / "sub" / f"p{i}.png")
        (src / "sub" / f"p{i}.txt").write_text(f"a photo, number {i}")
    cli([sys.executable, "-m", "ldm.data.make_shards", str(src), "out/shards", "--samples-per-shard", "2"], cwd)
    cli([str(BIN / "ldm-shards"), str(src), "out/again"], cwd)
    paths = written(cwd)
    assert {cwd / "out" / "shards" / "shards-000001.tar", cwd / "out" / "again" / "shards-000000.tar"} <= set(paths)
    assert_modes(paths, 0o022)
