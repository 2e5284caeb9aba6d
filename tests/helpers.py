"""Small shared pieces for tests: model configs from the shipped Hydra files, random weights."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def logging_as_it_was() -> Iterator[None]:
    """Every logger's handlers, level and flags as they were before: a CLI entry point run in the test process
    (train.py's or sample.py's main) has Hydra set up its job logging, whose handlers would outlive the test,
    writing to its captured stderr or to a log file in its tmp folder long gone."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger(), *(lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    saved = {id(lg): (lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers}
    try:
        yield
    finally:
        for lg in [logging.getLogger(), *manager.loggerDict.values()]:
            if not isinstance(lg, logging.Logger):
                continue
            handlers, level, propagate, disabled = saved.get(id(lg), ([], logging.NOTSET, True, False))
            # pytest's own capture handlers come and go with each test phase: they stay as pytest left them
            pytests = [h for h in lg.handlers if _is_pytests(h)]
            ours = [h for h in handlers if not _is_pytests(h)]
            for handler in lg.handlers:
                if handler not in ours and handler not in pytests:
                    handler.close()
            lg.handlers[:] = ours + pytests
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


def _is_pytests(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")


def tiny_sd_file(path: Path, seed: int = 0) -> Path:
    """A tiny random SD 1.x-structured checkpoint (tiny config, weights ~N(0, 0.05)) saved at `path`."""
    from ldm.checkpoint import checkpoint_from_model, save_checkpoint
    from ldm.models.stable_diffusion import StableDiffusion

    model = randomize_(StableDiffusion.from_config(model_config("tiny")), std=0.05, seed=seed)
    save_checkpoint(checkpoint_from_model(model), path)
    return path
