"""Exponential moving average of the UNet weights, stored under LDM's `model_ema.*` names.

LDM's LitEma keeps one buffer per parameter, named after the parameter with the dots removed
(`diffusion_model.time_embed.0.weight` -> `diffusion_modeltime_embed0weight`), plus `decay` and
`num_updates`. Keeping that layout means the original SD checkpoints' EMA loads, and ours can be read by
any tool that reads theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.warmup = warmup
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int32))
        self.names = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                buffer_name = name.replace(".", "")
                self.names[name] = buffer_name
                self.register_buffer(buffer_name, p.detach().clone().float())

    def current_decay(self) -> float:
        """LDM's warm-up: early averages forget fast, so the EMA is not stuck near the random init."""
        n = int(self.num_updates)
        decay = float(self.decay)
        return min(decay, (1 + n) / (10 + n)) if self.warmup else decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = self.current_decay()
        params = dict(model.named_parameters())
        shadows = [getattr(self, b) for b in self.names.values()]
        currents = [params[n].detach().to(s.dtype) for n, s in zip(self.names, shadows, strict=True)]
        torch._foreach_lerp_(shadows, currents, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, buffer_name in self.names.items():
            params[name].copy_(getattr(self, buffer_name))

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """The model holds the EMA weights inside the block, and its own weights again after it."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.names}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    params[n].copy_(value)

    def shadow_state(self) -> dict[str, Tensor]:
        return {b: getattr(self, b) for b in self.names.values()}
