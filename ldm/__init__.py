"""Train and sample latent diffusion (Stable Diffusion) models with Lightning and Hydra.

    from ldm import load_model, generate
    model = load_model("v1-5-pruned-emaonly.safetensors")      # any SD 1.x/2.x file or diffusers folder
    (images,) = generate(model, ["a castle on a hill, oil painting"], steps=25, seed=42)

`generate` is `ldm.sampling.generate_images` (what sample.py runs); `load_model` is
`ldm.checkpoint.load_model`. Both are imported on first use, so `import ldm` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["generate", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "generate":
        from ldm.sampling import generate_images

        return generate_images
    if name == "load_model":
        from ldm.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
