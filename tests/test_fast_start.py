"""Fast start (issue 7): `--help`, `--cfg job` and config errors answer before torch, Lightning and the
model code are imported, and building a model imports only what it needs (open_clip's tokenizer without
open_clip's model zoo). What is imported is checked here; the seconds are in benchmarks/cli_start.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "lightning", "open_clip", "torchvision", "transformers", "timm")

# A fresh interpreter runs one CLI's main() with `argv`, then reports its exit code and the heavy
# modules it imported, on the last line of stdout.
PROBE = """
import json, sys
sys.argv = json.loads(sys.argv[1])
from ldm.cli.{cli} import main
code = 0
try:
    main()
except SystemExit as err:
    code = err.code if isinstance(err.code, int) else 1
print(json.dumps({{"code": code, "imported": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "argv, code",
    [
        (["sample.py", "--help"], 0),
        (["sample.py", "--cfg", "job"], 0),
        (["sample.py", "steps=abc"], 2),
        (["sample.py", "sampler=nope"], 2),
        (["train.py", "--help"], 0),
        (["train.py", "--cfg", "job"], 0),
        (["train.py", "experiment=sd15_finetune", "--cfg", "job"], 0),
        (["train.py", "trainer.max_step=3"], 2),
        (["train.py", "trainer.max_steps=abc"], 2),
    ],
)
def test_cli_answers_without_the_model_code(tmp_path: Path, argv: list[str], code: int) -> None:
    cli = argv[0].removesuffix(".py")
    done = python(PROBE.format(cli=cli, heavy=HEAVY), tmp_path, json.dumps(argv))
    assert done.stdout.strip(), done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == code, done.stderr
    assert report["imported"] == [], f"{' '.join(argv)} imported {report['imported']}"
    if code == 2:
        assert done.stderr.startswith(f"{argv[0]}: error: ") and len(done.stderr.strip().splitlines()) == 1


def test_cli_modules_import_light_and_register_their_resolvers(tmp_path: Path) -> None:
    """Importing the CLI modules (as tests and the SLURM launcher config do) registers the resolvers
    the configs use, and keeps the names callers import."""
    code = f"""
import sys
from omegaconf import OmegaConf
from ldm.cli.sample import DTYPES, UsageError, run, torch_dtype
from ldm.cli.train import ConfigError, missing_values, requeued_resume_path, resolve_ckpt_path, train, user_error
print([r for r in ("latest_ckpt", "demo_variant", "gpus_per_node") if not OmegaConf.has_resolver(r)])
print([m for m in {HEAVY!r} if m in sys.modules])
print(torch_dtype("bf16"), sorted(DTYPES))
"""
    done = python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    unregistered, imported, dtypes = done.stdout.strip().splitlines()
    assert unregistered == "[]" and imported == "[]"
    assert dtypes == "torch.bfloat16 ['bf16', 'fp16', 'fp32']"


def test_sd1_text_encoder_tokenizes_without_open_clip_and_as_open_clip(tmp_path: Path) -> None:
    """An SD 1.x text encoder takes CLIP's BPE from open_clip's tokenizer file alone (no open_clip, so no
    torchvision model zoo, no timm); its ids are open_clip's, bit for bit."""
    code = """
import sys
import torch
from ldm.models.encoders import ClipBPETokenizer, CLIPTextEmbedder, clean_text
prompts = [
    "a photograph of an astronaut riding a horse",
    "A Painting of a CAT, by Greg Rutkowski!! (trending on ArtStation), 4k; highly-detailed...",
    "Café Müller — naïve façade at night, 東京の夜景 🌃🚀",
    "it's a dog's life: 42% off #sale @home <|endoftext|> x",
    " ".join(f"word{i}" for i in range(60)),
    "",
    "don’t “quote” me &amp; you",
    "  spaces\\tand\\nnewlines  ",
]
sd1 = CLIPTextEmbedder({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
ids = sd1.tokenize(prompts)
sd2_ids = ClipBPETokenizer(pad_id=0)(prompts)
cleaned = [clean_text(p) for p in prompts]
assert "open_clip" not in sys.modules and "timm" not in sys.modules, sorted(m for m in sys.modules if "clip" in m)
import open_clip
from open_clip.tokenizer import basic_clean, whitespace_clean
reference = open_clip.tokenize(prompts)
assert torch.equal(sd2_ids, reference), (sd2_ids, reference)
reference[reference == 0] = 49407  # SD 1.x pads with <eot>
assert torch.equal(ids, reference)
assert cleaned == [whitespace_clean(basic_clean(p)).lower() for p in prompts]
print("ok")
"""
    done = python(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
