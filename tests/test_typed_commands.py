"""Commands as users of diffusers' scripts, kohya's sd-scripts and AUTOMATIC1111 type them, mistakes included:
each runs, or stops with exit status 2 and one line that names the problem and the fix, and nothing already
written is lost. Run through bash, as typed."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_sd_file
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PY = shlex.quote(sys.executable)
BIN = Path(sys.executable).parent
SAMPLE = f"{PY} {REPO}/sample.py"
TRAIN = f"{PY} {REPO}/train.py"


def bash(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess[str], tool: str) -> str:
    """The one error line of a refused command (exit status 2, no traceback, no usage dump)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"{tool}: error: "), result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd_file(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


FLAGS = [
    (SAMPLE, "sample.py", '--prompt "a cat" --ckpt tiny.safetensors', "--prompt is not an option", 'prompt="a cat"'),
    (SAMPLE, "sample.py", "--ckpt=tiny.safetensors prompt=x", "--ckpt is not an option", "ckpt=tiny.safetensors"),
    (SAMPLE, "sample.py", "ckpt=x.safetensors prompt=x --steps 20", "--steps is not an option", "steps=20"),
    (SAMPLE, "sample.py", "prompt=x --cfg_scale 7", "--cfg_scale is not an option", "guidance_scale=7"),
    (TRAIN, "train.py", "--max_train_steps 10", "--max_train_steps is not an option", "trainer.max_steps=10"),
    (TRAIN, "train.py", "--learning-rate=1e-4", "--learning-rate is not an option", "module.optimizer.lr=1e-4"),
    (f"{BIN}/ldm-eval", "ldm-eval", "--ckpt m.safetensors", "--ckpt is not an option of ldm-eval", "ckpt=m.safetensors"),
]


@pytest.mark.parametrize(("cmd", "tool", "args", "problem", "fix"), FLAGS, ids=[f[2] for f in FLAGS])
def test_argparse_style_flags_name_the_override_to_type(
    tmp_path: Path, cmd: str, tool: str, args: str, problem: str, fix: str
) -> None:
    line = one_line_error(bash(f"{cmd} {args}", tmp_path), tool)
    assert problem in line and f"as {fix} " in line, line


MISTAKES = [
    (SAMPLE, "sample.py", "ckpt=x prompt=x sampler.step=20", "unknown key sampler.step (did you mean steps?)"),
    (SAMPLE, "sample.py", "ckpt=x prompt=x cfg_scale=7", "unknown key cfg_scale (did you mean guidance_scale?)"),
    (TRAIN, "train.py", "experiment=sd15_finetun", "(did you mean experiment=sd15_finetune?)"),
    (SAMPLE, "sample.py", "ckpt=x prompt=x sampler=DDIM", "(did you mean sampler=ddim?); available options in"),
    (SAMPLE, "sample.py", "ckpt=x prompt=x sampler=euler_a sampler.eta=0.5",
     "sampler=euler_a has no eta: sampler.eta applies to sampler=ddim"),
    (SAMPLE, "sample.py", "ckpt=x prompt=x guidance_scale=7,5", "a number takes a decimal point, as guidance_scale=7.5"),
    (TRAIN, "train.py", "module.optimizer.lr=1,5", "as module.optimizer.lr=1.5"),
]


@pytest.mark.parametrize(("cmd", "tool", "args", "expected"), MISTAKES, ids=[m[2] for m in MISTAKES])
def test_misspelled_keys_and_options_get_the_one_meant(
    tmp_path: Path, cmd: str, tool: str, args: str, expected: str
) -> None:
    line = one_line_error(bash(f"{cmd} {args}", tmp_path), tool)
    assert expected in line and "Config search path" not in line, line


def test_an_unquoted_prompt_with_an_equals_sign_and_a_quoted_home_path_run(tmp_path: Path, ckpt: Path) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny.safetensors").symlink_to(ckpt)
    result = bash(
        f"{SAMPLE} 'ckpt=~/models/tiny.safetensors' prompt=a cat, sitting = on mat - é 東京 steps=1 height=32 width=32 "
        "'out_dir=~/out'",
        tmp_path, HOME=str(home),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "~").exists()
    png = Image.open(home / "out" / "00000.png")
    assert json.loads(png.text["ldm"])["prompt"] == "a cat, sitting = on mat - é 東京"


def test_a_file_where_the_output_folder_goes_is_refused_and_kept(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for cmd, tool, args in (
        (SAMPLE, "sample.py", f"ckpt={ckpt} prompt=x out_dir=notes.txt"),
        (TRAIN, "train.py", "paths.root=notes.txt logger=none trainer.max_steps=1"),
        (TRAIN, "train.py", "paths.root=notes.txt/runs logger=none trainer.max_steps=1"),
    ):
        line = one_line_error(bash(f"{cmd} {args}", tmp_path), tool)
        assert "notes.txt is a file, not a folder" in line, line
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_sample_inputs_stop_with_one_line(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.png").write_bytes(b"an earlier image")
    for args, expected in (
        ("prompt_file=prompts", "prompt_file=prompts is a folder"),
        ("prompt=x batch_size=-1", "batch_size must be at least 1, got -1"),
        ("prompt=x height=0 width=32", "height must be at least 1, got 0"),
        ("prompt=x device=gpu", "device=gpu is not a device: give auto, cpu, cuda, cuda:N or mps"),
        *([] if torch.cuda.is_available() else [("prompt=x device=cuda", "torch sees no CUDA GPU here; use device=cpu")]),
    ):
        line = one_line_error(bash(f"{SAMPLE} ckpt={ckpt} steps=1 out_dir=out {args}", tmp_path), "sample.py")
        assert expected in line, line
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".png") == ["00000.png"]
    assert (tmp_path / "out" / "00000.png").read_bytes() == b"an earlier image"


def test_ldm_convert_takes_paths_as_typed(tmp_path: Path, ckpt: Path) -> None:
    line = one_line_error(bash(f"{BIN}/ldm-convert src={ckpt} dst=out.safetensors", tmp_path), "ldm-convert")
    assert f"without src=: ldm-convert {ckpt} out.safetensors" in line, line
    home = tmp_path / "home"
    home.mkdir()
    result = bash(f"{BIN}/ldm-convert {ckpt} '~/converted.safetensors'", tmp_path, HOME=str(home))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (home / "converted.safetensors").is_file() and not (tmp_path / "~").exists()


def test_a_value_given_twice_is_judged_by_the_one_that_wins(tmp_path: Path) -> None:
    # test_cli's bad overrides come after its own trainer.max_steps=1: only the bad one is named
    line = one_line_error(bash(f"{TRAIN} trainer.max_steps=1 trainer.max_steps=ten", tmp_path), "train.py")
    assert "trainer.max_steps=ten: expected an integer" in line and "trainer.max_steps=1:" not in line, line


def test_ldm_compare_refuses_a_zero_size_instead_of_taking_the_native_one(tmp_path: Path, ckpt: Path) -> None:
    result = bash(f"{BIN}/ldm-compare base={ckpt} prompt=x variants=[{ckpt}] steps=1 height=0 width=32 out_dir=c",
                  tmp_path)
    assert "height must be at least 1, got 0" in one_line_error(result, "ldm-compare")
    assert not list((tmp_path / "c").glob("grid-*"))


def test_train_resume_and_start_mistakes_say_what_to_pass(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "runs").mkdir()
    for args, expected in (
        # kohya/diffusers users resume from their model file: that is init_from here
        (f"ckpt_path={ckpt}", f"is a weights file, not a training checkpoint to resume (a run's "
                              f"checkpoints/last.ckpt): to start from its weights, pass init_from={ckpt}"),
        ("ckpt_path=runs", "ckpt_path=runs is a folder: give a checkpoint file"),
        # stage two of the demo before stage one: our resolver's words, without OmegaConf's prefix
        ("experiment=demo", "train.py: error: no checkpoint of run 'autoencoder_demo' under runs/autoencoder_demo"),
        ("run_name=my run", 'needs quotes in the shell, as run_name="my run"'),
    ):
        line = one_line_error(bash(f"{TRAIN} paths.root=runs logger=none trainer.max_steps=1 {args}", tmp_path),
                              "train.py")
        assert expected in line and "raised while resolving" not in line, line
    assert not list((tmp_path / "runs").glob("*/*/checkpoints/*"))


def test_prompt_files_as_editors_save_them(tmp_path: Path, ckpt: Path) -> None:
    # Windows Notepad: a byte-order mark and CRLF line ends; an older editor: Latin-1
    (tmp_path / "notepad.txt").write_bytes("\ufeffa café\r\na dog\r\n".encode())
    (tmp_path / "latin.txt").write_bytes("a café\n".encode("latin-1"))
    line = one_line_error(bash(f"{SAMPLE} ckpt={ckpt} prompt_file=latin.txt steps=1", tmp_path), "sample.py")
    assert "prompt_file=latin.txt is not UTF-8 text" in line and "save it as UTF-8" in line, line
    result = bash(f"{SAMPLE} ckpt={ckpt} prompt_file=notepad.txt steps=1 height=32 width=32 out_dir=out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    prompts = [json.loads(Image.open(tmp_path / "out" / f"0000{i}.png").text["ldm"])["prompt"] for i in (0, 1)]
    assert prompts == ["a café", "a dog"]


def test_help_typed_as_a_word_and_flags_without_a_key_point_to_help(tmp_path: Path) -> None:
    line = one_line_error(bash(f"{SAMPLE} help", tmp_path), "sample.py")
    assert line == "sample.py: error: 'help' is not an override (key=value): `python sample.py --help` lists the settings"
    line = one_line_error(bash(f"{BIN}/ldm-eval help", tmp_path), "ldm-eval")
    assert "`ldm-eval --help` lists the settings" in line, line
    # a flag that names no key here: no made-up key=value to copy
    line = one_line_error(bash(f"{SAMPLE} -n 4 prompt=x", tmp_path), "sample.py")
    assert line.endswith("-n is not an option of python sample.py: settings are key=value overrides "
                         "(`python sample.py --help` lists them)"), line
