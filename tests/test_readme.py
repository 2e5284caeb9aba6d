"""Every command in README.md's code blocks runs as printed, pasted into bash (issue 7).

The commands run in order in a sandbox folder where the README's placeholders exist as small files of
the real formats: `v1-5-pruned.safetensors` is a tiny SD 1.x-structured LDM single file, `arcane.ckpt` a
tiny `.ckpt`, `sketch.png` a small picture, `shards/` what the README's own `ldm-shards` command writes.
Each command is run as typed, with only size overrides appended (2 training steps, 32 px, 2 sampling
steps, the CPU); where a run cannot fit here (several GPUs, a SLURM submission) it is composed with
`--cfg job` instead. `...` and `<run>` placeholders map to the sandbox's files and runs. A README command
that does not parse or run fails this test, with its line number and output.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_
from hydra import compose, initialize_config_module
from PIL import Image
from safetensors.torch import load_file, save_file
from test_evaluate import write_clip, write_inception, write_open_clip
from test_sample import tiny_sd2_config

from ldm.checkpoint import checkpoint_from_model, ema_key_for, save_checkpoint
from ldm.cli.overrides import rewrite_argv
from ldm.data.synthetic import ensure_demo_shards
from ldm.lora import UNetLoRA, save_kohya
from ldm.models.stable_diffusion import StableDiffusion, with_concat

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MULTI_DEVICE = re.compile(r"(^|\s)(-m|--multirun)(\s|$)|trainer=(ddp|fsdp|multinode)|trainer\.devices=[2-9]")


def readme_python(readme: Path = README) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    text = readme.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def readme_commands(readme: Path = README) -> list[tuple[int, str]]:
    """(line number, command) for each command in the README's ```bash blocks; continuation lines kept."""
    commands, block = [], None
    lines = readme.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            block = [] if block is None and line.strip() == "```bash" else None
            continue
        if block is None or not line.strip() or line.strip().startswith("#"):
            continue
        if commands and commands[-1][1].endswith("\\"):
            commands[-1] = (commands[-1][0], commands[-1][1] + "\n" + line)
        else:
            commands.append((number, line))
    return commands


def without_comment(command: str) -> str:
    """The command without a trailing `# comment` (outside quotes)."""
    kept = shlex.split(command.replace("\\\n", " "), comments=True)
    # cut at the first ' #' that shlex treated as a comment start
    for match in re.finditer(r"\s#", command):
        head = command[: match.start()]
        try:
            if shlex.split(head.replace("\\\n", " ")) == kept:
                return head.rstrip()
        except ValueError:
            continue
    return command.rstrip()


# -- the sandbox ----------------------------------------------------------------------------------------


def _bare(path: Path) -> Path:
    """Tensors only, as released single files are (no config of ours in the metadata)."""
    save_file(load_file(str(path)), str(path))
    return path


def _ckpt_file(model: StableDiffusion, path: Path, ema: bool = False) -> Path:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ema:
        sd.update({ema_key_for(k): v.clone() for k, v in sd.items() if k.startswith("model.diffusion_model.")})
        sd["model_ema.decay"] = torch.tensor(0.999)
        sd["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd}, path)
    return path


def _picture(path: Path, seed: int, mode: str = "RGB", classes: int = 0) -> None:
    rng = np.random.default_rng(seed)
    if mode == "L" and classes:
        labels = np.zeros((32, 32), np.uint8)
        labels[8:24, 8:24] = 1 + seed % (classes - 1)
        Image.fromarray(labels, "L").save(path)
    elif mode == "L":
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255
        Image.fromarray(mask, "L").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def _edit_shards(root: Path, out: Path) -> None:
    """The demo's before/after pairs under the README's key for the before picture (`src.jpg`)."""
    out.mkdir(parents=True)
    for shard in ensure_demo_shards(root, num_samples=16, samples_per_shard=16, variant="edit"):
        with tarfile.open(shard) as src, tarfile.open(out / Path(shard).name, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                name = member.name
                if name.endswith(".cond.png"):
                    buffer = io.BytesIO()
                    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="JPEG", quality=95)
                    data, name = buffer.getvalue(), name[: -len("cond.png")] + "src.jpg"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("readme")
    for name in (".venv", "train.py", "sample.py", "benchmarks", "Makefile", "pyproject.toml"):
        (root / name).symlink_to(REPO / name)
    torch.manual_seed(0)
    sd1 = randomize_(StableDiffusion.from_config(model_config("tiny")), std=0.05)
    for name in ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors", "model.safetensors"):
        save_checkpoint(checkpoint_from_model(sd1), root / name)
        if name != "v1-5-pruned-emaonly.safetensors":  # one keeps its config: 32 px native, for the Python snippet
            _bare(root / name)
    _ckpt_file(sd1, root / "arcane.ckpt")
    _ckpt_file(sd1, root / "train-run" / "last.ckpt", ema=True)
    save_checkpoint(checkpoint_from_model(sd1), root / "path" / "to" / "diffusers-folder")
    sd2 = randomize_(StableDiffusion.from_config(tiny_sd2_config()), std=0.05)
    save_checkpoint(checkpoint_from_model(sd2), root / "v2-1_768-ema-pruned.safetensors")
    _bare(root / "v2-1_768-ema-pruned.safetensors")
    lora = UNetLoRA(sd1.unet, rank=4, alpha=4)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.05)
    save_kohya(lora, sd1.config["unet"], root / "style.safetensors")
    for kind, name in (("inpainting", "sd-v1-5-inpainting.ckpt"), ("image", "instruct-pix2pix-00-22000.ckpt")):
        model = randomize_(StableDiffusion.from_config(with_concat(model_config("tiny"), kind)), std=0.05)
        _ckpt_file(model, root / name)
    for i, name in enumerate(("sketch.png", "room.png", "street.png")):
        _picture(root / name, i)
    _picture(root / "mask.png", 0, "L")
    _picture(root / "layout.png", 1, "L", classes=4)
    for folder in ("dog", "arcane_frames"):  # DreamBooth instance folders
        (root / folder).mkdir()
        for i in range(3):
            _picture(root / folder / f"{folder}{i}.png", 20 + i)
    (root / "prompts.txt").write_text("a red circle on a blue background\na castle, oil painting\n")
    # ldm-eval's weights, random, in the files' own formats (torch-fidelity's Inception, a transformers CLIP)
    write_inception(root / "weights-inception-2015-12-05-6726825d.pth")
    write_clip(root / "clip-vit-large-patch14")
    (root / "images").mkdir()
    for i in range(8):
        _picture(root / "images" / f"img{i}.png", 10 + i)
        (root / "images" / f"img{i}.txt").write_text(f"a picture number {i}, with colours")
    # MLPerf's COCO-2014 files as its scripts lay them out: val2014_30k.tsv (image_id, id, caption) beside val2014/
    write_open_clip(root / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    (root / "coco2014" / "val2014").mkdir(parents=True)
    rows = [(42, 1055, "A man riding a wave on top of a surfboard."), (139, 2401, "A kitchen with a stove, sink and table"),
            (285, 3012, "a big brown bear sitting in the grass"), (632, 7764, "A bedroom with a bed and a window.")]
    (root / "coco2014" / "val2014_30k.tsv").write_text(
        "image_id\tid\tcaption\n" + "".join(f"{i}\t{n}\t{c}\n" for i, n, c in rows))
    for k, (image_id, _, _) in enumerate(rows):
        _picture(root / "coco2014" / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", 30 + k)
    _edit_shards(root / "editdemo", root / "edit-shards")
    (root / "semantic-shards").mkdir()
    for shard in ensure_demo_shards(root / "semdemo", num_samples=16, samples_per_shard=16, variant="semantic"):
        (root / "semantic-shards" / Path(shard).name).symlink_to(shard)
    torch.set_num_threads(threads)
    return root


# -- preparing and running a command ------------------------------------------------------------------


def newest_run(root: Path, run_name: str) -> Path | None:
    runs = sorted((root / "outputs" / run_name).glob("*/"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def fill_placeholders(command: str, root: Path) -> str | None:
    """`...` and `<run>` mapped to the sandbox's files; None while a `<run>` does not exist yet."""
    for run_name in re.findall(r"outputs/([\w-]+)/<run>", command):
        run = newest_run(root, run_name)
        if run is None:
            return None
        command = command.replace(f"outputs/{run_name}/<run>", str(run.relative_to(root)))
    shards = "edit-shards/" if "cond_image_key" in command else "semantic-shards/" if "seg_key" in command else "shards/"
    command = command.replace("init_from=...", "init_from=v1-5-pruned.safetensors")
    return command.replace("data.train_shards=...", f"data.train_shards={shards}")


def train_overrides(args: list[str]) -> list[str]:
    """Size overrides for a train.py command, by what it composes."""
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=[a for a in rewrite_argv(args) if not a.startswith("-")])
    extra = [
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.precision=32-true",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
    ]
    if str(cfg.data._target_).endswith("ShapesDataModule"):
        extra += ["data.num_samples=32", "data.samples_per_shard=16", "data.batch_size=4"]
    else:
        extra += ["data.batch_size=2", "data.num_workers=0", "data.resolution=32"]
        if "bucket_step" in cfg.data:  # aspect-ratio buckets (on in the fine-tune recipes) around 32 px
            extra.append("data.bucket_step=8")
    if str(cfg.data._target_).endswith("DreamBoothDataModule"):
        extra += ["data.num_class_images=2", "data.class_steps=2", "data.class_batch_size=2"]
    for name, callback in (cfg.get("callbacks") or {}).items():
        if callback is not None and "steps" in callback:
            extra.append(f"callbacks.{name}.steps=2")
    return extra


def prepare(command: str, root: Path) -> str | None:
    """The command as bash runs it here: as printed, size overrides appended (None: not yet runnable)."""
    command = fill_placeholders(without_comment(command), root)
    if command is None:
        return None
    words = shlex.split(command.replace("\\\n", " "))
    if words[0] == "make":
        return f"make -n -C {shlex.quote(str(REPO))} {' '.join(words[1:])}"
    if words[0] == "bash" and words[1].endswith(".sh"):
        return f"bash -n {words[1]}"
    if "train.py" in words[1:2]:
        if MULTI_DEVICE.search(command):
            return re.sub(r"(^|\s)(-m|--multirun)(?=\s)", r"\1", command) + " --cfg job"
        return command + " " + " ".join(train_overrides(words[2:]))
    if "sample.py" in words[1:2]:
        return command + " steps=2 height=32 width=32 device=cpu"
    if words[0].endswith("ldm-eval") and not any(w.startswith("images=") for w in words):
        return command + " steps=2 height=32 width=32 device=cpu"
    if words[0].endswith("ldm-compare"):
        return command + " steps=2 height=32 width=32 device=cpu"
    if words[0].endswith("ldm-cache-latents"):
        return command + " --resolution 32"
    if words[1:2] and words[1].startswith("benchmarks/") and words[1].endswith(".py"):
        return command + " --model tiny --size 32 --device cpu --dtype fp32"
    return command


def after(command: str, root: Path) -> None:
    """What the README's own next commands assume: `shards-{000000..000099}.tar` exist."""
    if "ldm-shards" in command:
        first = root / "shards" / "shards-000000.tar"
        for i in range(1, 100):
            link = root / "shards" / f"shards-{i:06d}.tar"
            if not link.exists():
                link.symlink_to(first.name)


def run(command: str, root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_has_the_commands_a_newcomer_needs() -> None:
    commands = [c for _, c in readme_commands()]
    assert commands[:2] == [c for c in commands[:2] if c.startswith("make ")], commands[:2]
    for needed in ("sample.py", "ldm-shards", "experiment=sd15_finetune", "ckpt_path=last", "experiment=sd15_lora"):
        assert any(needed in c for c in commands[2:7]), needed


def test_every_readme_command_runs_as_printed(sandbox: Path) -> None:
    pending = readme_commands()
    failures: list[str] = []
    ran = 0
    done: set[str] = set()  # a command printed twice (the same text, prepared the same) runs once: ~10 s of CI each
    while pending:
        waiting = []
        for number, command in pending:
            try:
                prepared = prepare(command, sandbox)  # make targets: `make -n`, the targets exist and parse
            except Exception as err:  # a command whose overrides do not even compose
                failures.append(f"README.md:{number}: {command}\n  does not compose: {err}")
                continue
            if prepared is None:
                waiting.append((number, command))
                continue
            if prepared in done:
                continue
            done.add(prepared)
            result = run(prepared, sandbox)
            ran += 1
            if result.returncode != 0:
                failures.append(f"README.md:{number}: {command}\n  ran: {prepared}\n  {result.stderr[-1500:]}")
            else:
                after(command, sandbox)
        if len(waiting) == len(pending):
            failures += [f"README.md:{n}: {c}\n  its <run> never appeared" for n, c in waiting]
            break
        pending = waiting
    assert ran >= 30
    assert not failures, "\n\n".join(failures)


def test_readme_python_runs_as_printed(sandbox: Path) -> None:
    blocks = readme_python()
    assert blocks, "the README shows the Python API"
    for number, code in blocks:
        result = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", code], cwd=sandbox,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README.md:{number}:\n{code}\n{result.stderr[-2000:]}"
    assert (sandbox / "castle.png").is_file()

