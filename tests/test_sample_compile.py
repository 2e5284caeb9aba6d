"""sample.py compile=true: the UNet compiled in place for sampling, in the mode compile_mode names.

Under the CUDA-graph modes (reduce-overhead, max-autotune) a UNet output lives in memory the next step
overwrites; generate() copies it out, so samplers that keep old outputs (PLMS) stay exact. The CPU has no
CUDA graphs, so a stand-in compile that returns each output in one reused buffer plays the graph's part.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_sd_file
from PIL import Image
from test_sample import sample_config

from ldm.cli.sample import run
from ldm.models.unet import UNetModel

ROOT = Path(__file__).resolve().parent.parent
BASE = ["prompt=a red square", "steps=4", "height=32", "width=32", "sampler=plms", "guidance_scale=1", "seed=3"]


def image(cfg) -> np.ndarray:  # noqa: ANN001
    (path,) = run(cfg)
    return np.asarray(Image.open(path))


def graph_like_compile(modes: list[str]):  # noqa: ANN201
    """A stand-in for UNetModel.compile: records the mode, and the forward returns its output in one
    buffer that every later call overwrites (what a captured CUDA graph's output does)."""

    def compile(self: UNetModel, mode: str = "default", **_: object) -> None:
        modes.append(mode)
        forward, buffers = self.forward, {}

        def static_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = forward(*args, **kwargs)
            buffer = buffers.setdefault((out.shape, out.dtype), torch.empty_like(out))
            return buffer.copy_(out)

        self.forward = static_forward

    return compile


def test_cuda_graph_modes_copy_the_unet_output_before_plms_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tiny_sd_file(tmp_path / "tiny.safetensors")
    eager = image(sample_config([f"ckpt={ckpt}", *BASE, f"out_dir={tmp_path / 'eager'}"]))
    modes: list[str] = []
    monkeypatch.setattr(UNetModel, "compile", graph_like_compile(modes))
    graphed = image(sample_config([f"ckpt={ckpt}", *BASE, "compile=true", "compile_mode=reduce-overhead",
                                   f"out_dir={tmp_path / 'graphed'}"]))
    assert modes == ["reduce-overhead"]
    np.testing.assert_array_equal(graphed, eager)
    # The stand-in does catch a missing copy: in a mode without CUDA graphs generate() copies nothing, and
    # PLMS then combines outputs the buffer has overwritten.
    uncopied = image(sample_config([f"ckpt={ckpt}", *BASE, "compile=true", "compile_mode=default",
                                    f"out_dir={tmp_path / 'uncopied'}"]))
    assert modes == ["reduce-overhead", "default"]
    assert np.abs(uncopied.astype(int) - eager.astype(int)).max() > 0


def test_a_wrong_compile_mode_is_one_line_naming_the_modes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={tmp_path / 'none.safetensors'}",
                           "prompt=a cat", "compile=true", "compile_mode=fast"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "compile_mode=fast" in lines[0] and "reduce-overhead" in lines[0], proc.stderr


@pytest.mark.slow  # inductor on a 2-core CPU: about a minute
def test_compiled_sampling_gives_the_eager_image(tmp_path: Path) -> None:
    ckpt = tiny_sd_file(tmp_path / "tiny.safetensors")
    common = [f"ckpt={ckpt}", "prompt=a red square", "steps=3", "height=32", "width=32", "seed=1"]
    eager = image(sample_config([*common, f"out_dir={tmp_path / 'eager'}"]))
    compiled = image(sample_config([*common, "compile=true", "compile_mode=reduce-overhead",
                                    f"out_dir={tmp_path / 'compiled'}"]))
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 2  # float32 rounding of fused kernels
