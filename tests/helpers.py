"""Small shared pieces for tests: model configs from the shipped Hydra files, random weights."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

CONF = Path(__file__).resolve().parent.parent / "ldm" / "conf"


def model_config(name: str) -> dict:
    """A model config from ldm/conf/model/NAME.yaml, following its `defaults` (no Hydra needed)."""
    raw = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    merged: dict = {}
    for parent in [d for d in raw.pop("defaults", []) if d != "_self_"]:
        merged = _merge(merged, model_config(parent))
    merged = _merge(merged, raw)
    merged.pop("_target_", None)
    return merged


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@torch.no_grad()
def randomize_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (zero-initialised output layers would hide mapping errors)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        # Norm scales stay near 1 so activations keep their size through deep stacks.
        p.copy_(1.0 + noise if p.ndim == 1 and name.endswith("weight") else noise)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
