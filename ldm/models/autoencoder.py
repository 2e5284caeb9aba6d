"""The first-stage KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"), with the original LDM parameter names so the
`first_stage_model.*` weights of SD 1.x/2.x single files load strictly.

    encoder:  x (B, in_channels, H, W) -> 2*z_channels moments at H/f, f = 2^(len(ch_mult)-1)
    quant_conv (1x1): -> 2*embed_dim moments = (mean, logvar) of a diagonal Gaussian posterior
    post_quant_conv (1x1): z (B, embed_dim, H/f, W/f) -> z_channels
    decoder:  -> (B, out_ch, H, W)

Every ResNet block and attention block normalizes with GroupNorm(32, eps=1e-6), so every
channel count (ch * ch_mult[i]) must be divisible by 32. The mid-block of encoder and decoder
always holds one single-head self-attention; `attn_resolutions` adds more at those feature sizes.
The training losses (LPIPS, patch discriminator) are not here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DDCONFIG_KEYS = frozenset(
    {
        "double_z",
        "z_channels",
        "resolution",
        "in_channels",
        "out_ch",
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "dropout",
    }
)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # LDM's name for the 1x1 projection of the skip path when the width changes.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in LDM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1 head, H*W, C)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        out = F.scaled_dot_product_attention(
            tokens(self.q(normed)), tokens(self.k(normed)), tokens(self.v(normed))
        )
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right/bottom only) as LDM: the trained weights assume it.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResNet `block`s, each followed by an `attn` when
    the level has attention."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, dropout: float):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[i], widths[i + 1], dropout) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks) if with_attn)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class DownLevel(Level):
    def __init__(self, *args: Any, downsample: bool) -> None:
        super().__init__(*args)
        # Identity holds no weights, so the last level has no `downsample.*` keys, as in LDM.
        self.downsample = Downsample(self.block[-1].conv2.out_channels) if downsample else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.run_blocks(h))


class UpLevel(Level):
    def __init__(self, *args: Any, upsample: bool) -> None:
        super().__init__(*args)
        self.upsample = Upsample(self.block[-1].conv2.out_channels) if upsample else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.run_blocks(h))


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        dropout: float,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down = nn.ModuleList()
        for i in range(len(ch_mult)):
            with_attn = resolution >> i in attn_resolutions
            self.down.append(
                DownLevel(
                    widths[i],
                    widths[i + 1],
                    num_res_blocks,
                    with_attn,
                    dropout,
                    downsample=i != len(ch_mult) - 1,
                )
            )
        self.mid = MidBlock(widths[-1], dropout)
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(
            widths[-1], 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        dropout: float,
        resolution: int,
        z_channels: int,
    ) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(widths[-1], dropout)
        # `up[i]` works at the resolution of `encoder.down[i]` (LDM's indexing), so it runs in
        # reverse; each level takes the width of the level below it and has one extra block.
        self.up = nn.ModuleList()
        for i in range(len(ch_mult)):
            block_in = widths[min(i + 1, len(ch_mult) - 1)]
            with_attn = resolution >> i in attn_resolutions
            self.up.append(
                UpLevel(block_in, widths[i], num_res_blocks + 1, with_attn, dropout, upsample=i != 0)
            )
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The encoder's posterior q(z|x): independent Gaussians per latent element."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        # LDM's clamp keeps exp() finite for untrained or diverging encoders.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Draw on the generator's device (as diffusers does), so a seeded CPU generator gives
        # the same latents whatever device the model runs on.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over all latent elements: shape (B,)."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=self._latent_dims())

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `x` under q per sample: shape (B,)."""
        squared = (x - self.mean) ** 2 / self.var
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + squared, dim=self._latent_dims())

    def _latent_dims(self) -> list[int]:
        return list(range(1, self.mean.dim()))


class AutoencoderKL(nn.Module):
    """`AutoencoderKL(ddconfig, embed_dim)` with LDM's `ddconfig` keys (see DDCONFIG_KEYS)."""

    def __init__(self, ddconfig: dict[str, Any], embed_dim: int) -> None:
        super().__init__()
        _check_ddconfig(ddconfig)
        common = {k: ddconfig[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")}
        common.update(resolution=ddconfig["resolution"], z_channels=ddconfig["z_channels"])
        self.encoder = Encoder(**common, in_channels=ddconfig["in_channels"], double_z=True)
        self.decoder = Decoder(**common, out_ch=ddconfig["out_ch"])
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], kernel_size=1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def _check_ddconfig(ddconfig: dict[str, Any]) -> None:
    missing = sorted(DDCONFIG_KEYS - ddconfig.keys())
    unexpected = sorted(ddconfig.keys() - DDCONFIG_KEYS)
    if missing or unexpected:
        raise ValueError(f"bad autoencoder ddconfig: missing keys {missing}, unexpected keys {unexpected}")
    if not ddconfig["double_z"]:
        raise ValueError("AutoencoderKL needs ddconfig double_z=True: the encoder outputs mean and logvar")
