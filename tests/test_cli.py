"""The command line as people type it (issue 7): prompts and patterns verbatim, one-line errors that name
the key, `init_from` in every composition. Commands run through bash where the typing is the point."""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image
from test_sample import write_model

from ldm.cli.overrides import hydra_quote, rewrite_arg, rewrite_argv
from ldm.pnginfo import parse_a1111_parameters

REPO = Path(__file__).resolve().parent.parent
PY = shlex.quote(sys.executable)
NASTY = [
    "a castle on a hill, oil painting",
    "a cat's hat",
    "(red:1.2) cat, [blue|green] sky",
    'a sign that says "hello", neon',
    "a=b, c: d; e? f& g% h# i!",
    "été, 東京の夜景 ☃ — naïve",
    "back\\slash and end\\",
    "{braces} and ${not an interpolation}",
    "  leading and trailing spaces  ",
    "masterpiece, best quality, ((detailed)), [[lowres]]",
]


def parsed(arg: str) -> object:
    """What Hydra makes of one override, resolved as the config would be."""
    value = OverridesParser.create().parse_override(arg).value()
    return OmegaConf.to_container(OmegaConf.create({"v": value}), resolve=True)["v"]


@pytest.mark.parametrize("text", NASTY)
def test_free_text_keys_take_the_argument_verbatim(text: str) -> None:
    for key in ("prompt", "negative_prompt", "callbacks.sample_images.prompt", "+module.instance_prompt"):
        assert parsed(rewrite_arg(f"{key}={text}")) == text
    assert parsed(rewrite_arg(f"validation_prompts={text}")) == [text]


def test_random_texts_survive_the_quoting() -> None:
    alphabet = "ab ,'\"\\()[]{}:=$%&?!#|;.-_~*+é東\t"
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        assert parsed("k=" + hydra_quote(text)) == text, repr(text)
        assert parsed(rewrite_arg("prompt=" + text)) == text, repr(text)


def test_quoted_forms_keep_working_and_other_values_are_left_to_hydra() -> None:
    assert parsed(rewrite_arg("negative_prompt='blurry, low quality'")) == "blurry, low quality"
    assert parsed(rewrite_arg('prompt="a, b"')) == "a, b"
    assert parsed(rewrite_arg("validation_prompts=[a cat,a dog]")) == ["a cat", "a dog"]
    assert rewrite_arg("trainer.max_steps=10") == "trainer.max_steps=10"
    assert rewrite_arg("experiment=demo") == "experiment=demo"
    assert rewrite_arg("+trainer.enable_model_summary=false") == "+trainer.enable_model_summary=false"
    assert rewrite_arg("x=[a,b") == "x=[a,b"  # a broken structure: Hydra's error, not a silent string
    # Strings Hydra's grammar refuses, taken as typed
    for value in ("shards/shard-{000000..000099}.tar", "https://host/a.tar?sig=1&t=2", "pipe:curl -s 'x y'"):
        assert parsed(rewrite_arg(f"data.train_shards={value}")) == value
    # the shell split an unquoted prompt into words: they join again
    assert [parsed(a) for a in rewrite_argv(["prompt=a", "red", "cat,", "oil", "steps=3"])] == ["a red cat, oil", 3]


def bash(command: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command line as a user types it into bash."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def test_prompts_as_typed_reach_the_text_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sample.py's own entry point, with the arguments bash makes of a typed command line."""
    from ldm.cli import sample as sample_cli
    from ldm.models.stable_diffusion import StableDiffusion

    ckpt = write_model(tmp_path, "tiny", fmt="single")
    seen: list[str] = []
    encode = StableDiffusion.encode_text

    def recording(self: StableDiffusion, prompts: list[str]) -> torch.Tensor:
        seen.extend(prompts)
        return encode(self, prompts)

    monkeypatch.setattr(StableDiffusion, "encode_text", recording)
    monkeypatch.chdir(tmp_path)
    for i, text in enumerate(NASTY[:7]):
        negative = NASTY[(i + 3) % len(NASTY)]
        line = (
            f"sample.py ckpt={ckpt} prompt={shlex.quote(text)} negative_prompt={shlex.quote(negative)} "
            f"steps=1 height=32 width=32 out_dir={tmp_path}/out{i} device=cpu"
        )
        monkeypatch.setattr(sys, "argv", shlex.split(line))
        seen.clear()
        sample_cli.main()
        assert text in seen and negative in seen, (text, negative, seen)
        # and verbatim in the PNG: our exact settings, and A1111's text read by A1111's rules
        png = Image.open(tmp_path / f"out{i}" / "00000.png")
        exact = json.loads(png.text["ldm"])
        assert (exact["prompt"], exact["negative_prompt"]) == (text, negative)
        a1111 = parse_a1111_parameters(png.text["parameters"])
        assert (a1111["Prompt"], a1111["Negative prompt"]) == (text.strip(), negative.strip())


def test_a_typed_sample_command_runs(tmp_path: Path) -> None:
    ckpt = write_model(tmp_path, "tiny", fmt="single")
    result = bash(
        f"{PY} {REPO}/sample.py ckpt={ckpt} prompt=\"a cat's hat, (red:1.2), [a|b]\" "
        f"negative_prompt=blurry, low quality steps=2 height=32 width=32 out_dir=out",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "00000.png").is_file()


def test_train_py_takes_patterns_and_prompt_lists_as_typed(tmp_path: Path) -> None:
    result = bash(
        f"{PY} {REPO}/train.py experiment=sd15_finetune init_from=v1-5-pruned.safetensors "
        f"data.train_shards='shards/shard-{{000000..000099}}.tar' validation_prompts=a cat, oil painting "
        "--cfg job",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    job = OmegaConf.create(result.stdout)
    assert job.data.train_shards == "shards/shard-{000000..000099}.tar"
    assert list(job.validation_prompts) == ["a cat, oil painting"]
    assert job.init_from == "v1-5-pruned.safetensors"


ONE_LINE_ERRORS = [
    ("trainer.max_step=3", "unknown key trainer.max_step (did you mean trainer.max_steps?)"),
    ("+init_from=x.safetensors", "init_from is already a key: set it without the '+', as init_from=x.safetensors"),
    ("+trainer.max_step=3", "lightning.Trainer takes no argument 'max_step' (did you mean trainer.max_steps?)"),
    ("+foo=1", "+foo adds a key nothing reads"),
    ("+data.resolutoin=64", "takes no argument 'resolutoin' (did you mean data.resolution?)"),
    ("+callbacks.extra._target_=lightning.pytorch.callbacks.LearningRateMonitor +callbacks.extra.every=2",
     "+callbacks.extra.every: lightning.pytorch.callbacks.LearningRateMonitor takes no argument 'every'"),
    ("trainer.max_steps=abc", "trainer.max_steps=abc: expected an integer"),
    ("module.optimizer.lr=fast", "module.optimizer.lr=fast: expected a number"),
    ("module.caption_dropout=lots", "module.caption_dropout=lots: expected a number"),
    ("trainer.enable_progress_bar=maybe", "expected true or false"),
    ("model=sd99", "Could not find 'model/sd99'"),
    ("init_from=nope.safetensors", "nope.safetensors does not exist"),
    ("ckpt_path=nope.ckpt", "ckpt_path=nope.ckpt does not exist"),
]


@pytest.mark.parametrize(("args", "expected"), ONE_LINE_ERRORS, ids=[a for a, _ in ONE_LINE_ERRORS])
def test_bad_train_overrides_get_one_line_naming_the_key(tmp_path: Path, args: str, expected: str) -> None:
    result = bash(f"{PY} {REPO}/train.py paths.root=runs logger=none trainer.max_steps=1 {args}", tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: "), result.stderr[-2000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").glob("*/*/checkpoints/*"))


def test_hydra_full_error_still_shows_the_traceback(tmp_path: Path) -> None:
    result = bash(f"{PY} {REPO}/train.py trainer.max_steps=abc paths.root=runs logger=none", tmp_path,
                  env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_bad_sample_values_get_one_line(tmp_path: Path) -> None:
    ckpt = write_model(tmp_path, "tiny", fmt="single")
    for args, expected in (
        (f"ckpt={ckpt} prompt=x steps=many", "steps=many: expected an integer"),
        (f"ckpt={ckpt} prompt=x guidance_scale=high", "guidance_scale=high: expected a number"),
        (f"ckpt={ckpt} prompt=x stpes=3", "unknown key stpes (did you mean steps?)"),
    ):
        result = bash(f"{PY} {REPO}/sample.py {args}", tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith("sample.py: error: ")
        assert expected in result.stderr and "Traceback" not in result.stderr
    # half precision on the CPU: a warning, and the images in fp32
    result = bash(f"{PY} {REPO}/sample.py ckpt={ckpt} prompt=x steps=1 height=32 width=32 dtype=fp16 device=cpu "
                  "out_dir=half", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dtype=fp16 does not run on the CPU: sampling in fp32" in result.stdout + result.stderr
    assert (tmp_path / "half" / "00000.png").is_file()


@pytest.mark.parametrize(
    "extra",
    [[], ["conditioning=inpainting"], ["conditioning=image_concat"], ["model=small"], ["module.lora={rank:4,alpha:4}"],
     ["experiment=demo"], ["experiment=sd15_lora", "data.train_shards=x"]],
)
def test_init_from_is_a_top_level_key_of_every_composition(extra: list[str]) -> None:
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=["init_from=/ckpt/sd15.safetensors", *extra])
    assert cfg.module.init_from == "/ckpt/sd15.safetensors"


def test_init_from_with_a_conditioning_group_starts_from_the_weights(tmp_path: Path) -> None:
    """`train.py conditioning=inpainting init_from=...` (no recipe): the run starts from the file's UNet."""
    from safetensors.torch import load_file

    ckpt = write_model(tmp_path, "tiny", fmt="single")
    result = bash(
        f"{PY} {REPO}/train.py conditioning=inpainting init_from={ckpt} paths.root=runs logger=none "
        f"data.root={tmp_path}/data data.num_samples=8 data.samples_per_shard=8 data.batch_size=4 "
        "trainer.max_steps=1 module.optimizer.lr=0 module.ema_decay=null callbacks.sample_images=null "
        "callbacks.throughput=null trainer.enable_progress_bar=false",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (last,) = (tmp_path / "runs").glob("*/*/checkpoints/last.ckpt")
    trained = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    given = load_file(str(ckpt))
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(trained[key], given[key])  # lr=0: exactly the file's weights
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(trained[conv_in][:, :4], given[conv_in]) and not trained[conv_in][:, 4:].any()


def test_wandb_without_an_api_key_logs_offline_and_says_how_to_sync(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        ["bash", "-c", f"{PY} {REPO}/train.py logger=wandb paths.root=runs data.root={tmp_path}/data "
         "data.num_samples=8 data.samples_per_shard=8 data.batch_size=4 trainer.max_steps=1 "
         "callbacks.sample_images=null callbacks.throughput=null trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "logging offline" in said and "wandb sync" in said
    assert list((tmp_path / "runs").glob("*/*/wandb/offline-run-*"))


def test_trainer_gpu_without_a_gpu_says_what_to_pass(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = bash(f"{PY} {REPO}/train.py trainer=gpu paths.root=runs logger=none trainer.max_steps=1", tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "trainer=cpu" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


@pytest.mark.parametrize("config_name", ["train", "sample", "style_demo", "compare", "eval"])
def test_a_command_line_of_no_arguments_passes_the_precheck(config_name: str) -> None:
    """`python -m ldm.style_demo` as make style-demo types it (no override at all) reaches its job: the
    precheck used to fail on an empty argument list (a zip of unequal lengths)."""
    from ldm.cli.checks import ConfigProblem, precheck

    precheck(config_name, [])  # nothing to refuse
    with pytest.raises(ConfigProblem, match="is not an override"):
        precheck(config_name, ["word"])
