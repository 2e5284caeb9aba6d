"""The conditional UNet of latent diffusion (Stable Diffusion 1.x / 2.x).

Parameter names are those of the original LDM code (`time_embed`, `input_blocks`, `middle_block`,
`output_blocks`, `out`, `label_emb`), so an original single-file checkpoint's
`model.diffusion_model.*` tensors load strictly, and the constructor takes the `params` of an
original yaml as-is:

    UNetModel(**yaml["model"]["params"]["unet_config"]["params"])

Layout, for `channel_mult` of length L (`ds` is the downsampling factor of a level, 2**level):

    input_blocks.0                 conv_in
    input_blocks.n                 [ResBlock, (SpatialTransformer if ds in attention_resolutions)]
                                   per res block, then [Downsample] between levels
    middle_block                   ResBlock, SpatialTransformer, ResBlock
    output_blocks.n                [ResBlock (on cat(h, skip)), (SpatialTransformer), (Upsample)]
                                   num_res_blocks + 1 per level, deepest level first
    out                            GroupNorm, SiLU, conv

Numerics follow the original and diffusers' `UNet2DConditionModel` with SD's config: timestep
embedding `[cos, sin]` with frequencies exp(-ln(10000) i / half) (diffusers' `flip_sin_to_cos=True,
freq_shift=0`), GroupNorm(32) (eps 1e-5 in res blocks, computed in float32 as LDM does; eps 1e-6
before a transformer), LayerNorm eps 1e-5, GEGLU feed-forward, softmax(QK^T / sqrt(d_head)) V
through `scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: `[cos(t f), sin(t f)]`, B×dim."""
    half = dim // 2
    # built where the timesteps are: a CPU tensor copied to the GPU at every call would be a blocking copy
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32: half-precision statistics over large maps lose too much."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != torch.float32:  # precision=bf16-true: float32 all the same
            weight, bias = weight.float(), bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-init the last layer of a residual branch so a fresh block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        # Upsampling to the skip connection's size (not a blind 2x) keeps odd latent sizes working.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, None, dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the h·w tokens of a feature map; `use_linear` is SD2's projection style."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int | None,
        use_linear: bool,
        dropout: float,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner_dim)
            self.proj_out = _zero(nn.Linear(inner_dim, channels))
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, 1)
            self.proj_out = _zero(nn.Conv2d(inner_dim, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout) for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor | None, checkpointed: bool = False) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = checkpoint(block, h, context, use_reentrant=False) if checkpointed else block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).unflatten(2, (height, width))
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: hands each layer the input it needs (embedding, context, target size).

    `checkpointed`: gradient checkpointing at diffusers' grain, each res block and each transformer block
    recomputed in backward on its own; the cheap layers between them (the transformer's norm and
    projections, down- and upsampling convolutions) keep their activations, so the recompute is the same work
    as diffusers' (checkpointing the whole block recomputed those too: ~9% more FLOPs, more on a CPU)."""

    def forward(
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor | None,
        upsample_size: torch.Size | None = None,
        checkpointed: bool = False,
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = checkpoint(layer, x, emb, use_reentrant=False) if checkpointed else layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, checkpointed)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


def _per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries, expected one per level ({levels})")
    return values


class UNetModel(nn.Module):
    """LDM's conditional UNet (the `model.diffusion_model` of SD 1.x/2.x checkpoints).

    Heads: `num_head_channels` (SD2: 64) fixes the width of a head, so the head count grows with
    the level's channels; otherwise `num_heads` (SD1: 8) fixes the count. `num_res_blocks` and
    `transformer_depth` take an int or one value per level (the middle block uses the last level's
    depth). `adm_in_channels` adds `label_emb`, an MLP of the vector `y` added to the timestep
    embedding (SD2 unCLIP's `num_classes: sequential`).

    Accepted and ignored, so original yaml params pass through: `image_size` (unused by the
    original too), `legacy` (no effect on spatial-transformer models), `use_fp16` (precision is
    the trainer's choice). `use_spatial_transformer` must be true and `num_classes` None or
    "sequential"; the older non-SD variants they select are not implemented.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions: Sequence[int],
        num_res_blocks: int | Sequence[int],
        channel_mult: Sequence[int],
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
        use_checkpoint: bool = False,
        dropout: float = 0.0,
        num_classes: str | None = None,
        image_size: int | None = None,
        use_spatial_transformer: bool = True,
        legacy: bool = False,
        use_fp16: bool = False,
    ):
        super().__init__()
        if not use_spatial_transformer:
            raise ValueError("only use_spatial_transformer=True (the Stable Diffusion UNet) is implemented")
        if num_classes not in (None, "sequential") or (num_classes and adm_in_channels is None):
            raise ValueError(
                f"num_classes={num_classes!r}: only the 'sequential' embedding of adm_in_channels is supported"
            )
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        levels = len(channel_mult)
        res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        depths = _per_level(transformer_depth, levels, "transformer_depth")
        self.model_channels = model_channels
        self.gradient_checkpointing = use_checkpoint
        time_embed_dim = model_channels * 4

        def attention(ch: int, depth: int) -> SpatialTransformer:
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            dim_head = ch // num_heads if num_head_channels == -1 else num_head_channels
            if heads < 1 or dim_head < 1:
                raise ValueError(
                    f"{ch} channels do not split into heads"
                    f" (num_heads={num_heads}, num_head_channels={num_head_channels})"
                )
            return SpatialTransformer(
                ch, heads, dim_head, depth, context_dim, use_linear_in_transformer, dropout
            )

        def res_block(ch: int, out_ch: int) -> ResBlock:
            return ResBlock(ch, time_embed_dim, out_ch, dropout)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            use_attention = 2**level in attention_resolutions
            for _ in range(res_blocks[level]):
                layers: list[nn.Module] = [res_block(ch, model_channels * mult)]
                ch = model_channels * mult
                if use_attention:
                    layers.append(attention(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention(ch, depths[-1]), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            use_attention = 2**level in attention_resolutions
            for i in range(res_blocks[level] + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if use_attention:
                    layers.append(attention(ch, depths[level]))
                if level and i == res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # `ch` is the first level's width; LDM wrote model_channels here, which breaks (only) the
        # forward of models whose channel_mult[0] != 1. The two agree for every SD model.
        self.out = nn.Sequential(
            GroupNorm32(32, ch), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each res block's and transformer block's activations in backward (training with grad
        only) to save memory, as diffusers' UNet2DConditionModel does (see TimestepEmbedSequential)."""
        self.gradient_checkpointing = enabled

    def _run(self, block: TimestepEmbedSequential, *args: object) -> Tensor:
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        return block(*args, checkpointed=checkpointed)

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        """Predict noise (or v) for latents `x` (B×C×H×W) at `timesteps` (B, or a scalar).

        `context` is the cross-attention sequence (B×T×context_dim); `y` the B×adm_in_channels
        vector of models built with `adm_in_channels`.
        """
        if (y is not None) != hasattr(self, "label_emb"):
            raise ValueError(
                "y is required by (and only by) a model built with adm_in_channels"
                f" (this one: {'with' if hasattr(self, 'label_emb') else 'without'})"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))

        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            upsample_size = skips[-1].shape[-2:] if skips else None
            h = self._run(block, h, emb, context, upsample_size)
        return self.out(h)
