"""Exponential moving average of the UNet weights, stored under LDM's `model_ema.*` names.

LDM's LitEma keeps one buffer per parameter, named after the parameter with the dots removed
(`diffusion_model.time_embed.0.weight` -> `diffusion_modeltime_embed0weight`), plus `decay` and
`num_updates`. Keeping that layout means the original SD checkpoints' EMA loads, and ours can be read by
any tool that reads theirs.

Under trainer=fsdp the UNet's parameters are DTensor shards; `shard_like` gives each shadow the same
sharding, so every rank averages only its own shard (no communication, 1/N of the memory) and a full
state dict gathers the shadows under the same names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor


def _local(t: Tensor) -> Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


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

    # `decay` and `num_updates` are buffers (saved under LDM's names) that live on the device; reading them
    # every step would stall the GPU, so the host keeps copies: read once, after any load of the buffers.
    _host: tuple[int, float] | None = None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        """Moves follow the model (device, sharding), casts do not: under precision=bf16-true Lightning
        casts the whole module to bf16, but an average of many small steps needs float32 to move at all
        (a 1e-4 step of a bf16 weight rounds away), so the shadows stay float32, never rounded on the way."""
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != torch.float32:
                self._buffers[name] = before if before.device == after.device else before.to(after.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._host = None
        super()._load_from_state_dict(*args, **kwargs)

    def _host_counters(self) -> tuple[int, float]:
        if self._host is None:
            self._host = (int(self.num_updates), float(self.decay))
        return self._host

    def current_decay(self) -> float:
        """LDM's warm-up: early averages forget fast, so the EMA is not stuck near the random init."""
        n, decay = self._host_counters()
        return min(decay, (1 + n) / (10 + n)) if self.warmup else decay

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """Average the model's current weights in. `skip` (a boolean on the device) makes the update a
        no-op there, `num_updates` included, with no host read: the training step's non-finite guard
        decides on the device. Without it the decay comes from the host copies of the counters."""
        params = dict(model.named_parameters())
        shadows = [_local(getattr(self, b)) for b in self.names.values()]
        currents = [_local(params[n].detach()).to(s.dtype) for n, s in zip(self.names, shadows, strict=True)]
        if skip is None:
            n, decay_setting = self._host_counters()
            self._host = (n + 1, decay_setting)
            self.num_updates.fill_(n + 1)  # a write from the host: no device read
            torch._foreach_lerp_(shadows, currents, 1.0 - self.current_decay())
            return
        kept = ~skip.to(self.num_updates.device, torch.bool)
        self.num_updates.add_(kept.to(self.num_updates.dtype))
        self._host = None  # the counters moved on the device: a host read re-reads them
        weight = (1.0 - self._device_decay()) * kept  # in float64, as the host path's Python floats
        weights = {s.dtype: weight.to(s.dtype) for s in shadows}
        for shadow, current in zip(shadows, currents, strict=True):
            # the host path's lerp, its weight a 0-dim device tensor where that one is a scalar
            shadow.lerp_(current, weights[shadow.dtype])

    def _device_decay(self) -> Tensor:
        """`current_decay` computed where the counters are, in float64 as the host does it."""
        decay = self.decay.double()
        if not self.warmup:
            return decay
        n = self.num_updates.double()
        return torch.minimum(decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def shard_like(self, model: nn.Module) -> None:
        """Shard each shadow exactly as its (already sharded) parameter, keeping the shadow's values."""
        params = dict(model.named_parameters())
        for name, buffer_name in self.names.items():
            p = params[name]
            if isinstance(p, DTensor):
                full = getattr(self, buffer_name).to(p.device)
                self.register_buffer(buffer_name, distribute_tensor(full, p.device_mesh, p.placements))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, buffer_name in self.names.items():
            _local(params[name]).copy_(_local(getattr(self, buffer_name)))

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """The model holds the EMA weights inside the block, and its own weights again after it."""
        params = dict(model.named_parameters())
        saved = {n: _local(params[n]).detach().clone() for n in self.names}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    _local(params[n]).copy_(value)

    def shadow_state(self) -> dict[str, Tensor]:
        return {b: getattr(self, b) for b in self.names.values()}
