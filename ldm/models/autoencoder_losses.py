"""Training losses of the first-stage autoencoder: LDM's `LPIPSWithDiscriminator` (Esser et al. 2021,
"Taming Transformers"; Rombach et al. 2022), with its parameter names (`logvar`, `perceptual_loss.*`,
`discriminator.*`), so a training checkpoint lines up with LDM's.

    rec  = |x - x̂| (or (x - x̂)²) + lpips_weight · LPIPS(x, x̂)        per pixel (LPIPS per image, broadcast)
    nll  = Σ (rec / exp(logvar) + logvar) / B                       logvar: one learned scalar, init 0
    kl   = Σ KL(q(z|x) || N(0, I)) / B
    g    = -mean D(x̂)                                               generator loss, from disc_start on
    λ    = disc_weight · ‖∇_w nll‖ / (‖∇_w g‖ + 1e-4)                w: the decoder's last conv (adaptive weight)
    loss = nll + kl_weight · kl + disc_factor · λ · g
    d    = disc_factor · ½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))   hinge loss, the discriminator's own step

LPIPS (Zhang et al. 2018) is VGG16's relu1_2 … relu5_3 features, unit-normalised over channels,
squared differences weighted per channel by five learned 1x1 convs (`lin0` … `lin4`), averaged over
space and summed over layers. Its weights come from a local file, never a download; see `load_lpips`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.autoencoder import DiagonalGaussianDistribution

# torchvision vgg16().features index ranges ending in relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS's input normalisation of [-1, 1] images (the ImageNet statistics, rescaled).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_LAYOUT = """\
expected LPIPS weights (one file, or a list of files whose keys are merged; .safetensors, or .pth/.ckpt
read with weights_only):
  VGG16 trunk:    'features.N.weight/bias' (torchvision's vgg16-397923af.pth; 'classifier.*' is ignored)
                  or 'net.sliceK.N.weight/bias' (LDM/taming names, N the torchvision index)
  linear layers:  'lin0.model.1.weight' ... 'lin4.model.1.weight' (the lpips package's weights/v0.1/vgg.pth)
  keys may carry the prefix 'loss.perceptual_loss.' (an LDM autoencoder training checkpoint), and
  a top-level 'state_dict' is looked into.
Example: lpips_path='[/weights/vgg16-397923af.pth,/weights/lpips_vgg.pth]'"""


class ScalingLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE)[None, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class VGG16Trunk(nn.Module):
    """torchvision's VGG16 convolutions, cut after each LPIPS layer; `sliceK.N` keeps torchvision's index N."""

    def __init__(self) -> None:
        super().__init__()
        # make_layers builds only the convolutional part: vgg16() would also build (and here discard)
        # its 120M-parameter classifier. weights are loaded separately, never downloaded.
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])
        for k, (start, end) in enumerate(_VGG_SLICES, start=1):
            part = nn.Sequential()
            for index in range(start, end):
                part.add_module(str(index), features[index])
            self.add_module(f"slice{k}", part)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for k in range(1, len(_VGG_SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            outputs.append(x)
        return outputs


class NetLinLayer(nn.Module):
    """LPIPS's per-channel weighting of one layer's squared feature difference."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Index 1 keeps LPIPS's key names (`linK.model.1.weight`); index 0 held a dropout that only
        # LPIPS's own training used.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Perceptual distance of images in [-1, 1]: `lpips(x, y)` -> (B, 1, 1, 1). Frozen; load weights first."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Trunk()
        for k, width in enumerate(_VGG_WIDTHS):
            self.add_module(f"lin{k}", NetLinLayer(width))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        feats_x = self.net(self.scaling_layer(x))
        feats_y = self.net(self.scaling_layer(y))
        total = 0.0
        for k, (fx, fy) in enumerate(zip(feats_x, feats_y, strict=True)):
            diff = (_unit_channels(fx) - _unit_channels(fy)) ** 2
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _unit_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


def load_lpips(path: str | Path | Sequence[str | Path]) -> LPIPS:
    """An LPIPS with its weights from `path` (a file or a list of files merged); layout: LPIPS_LAYOUT."""
    from ldm.checkpoint import read_tensor_file

    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths:
        raise ValueError(f"lpips_path is an empty list\n{LPIPS_LAYOUT}")
    merged: dict[str, Tensor] = {}
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"lpips_path: {p} does not exist\n{LPIPS_LAYOUT}")
        obj, _ = read_tensor_file(p)
        merged.update(obj.get("state_dict", obj))
    lpips = LPIPS()
    trunk, lins = _split_lpips_keys(merged)
    expected_trunk, expected_lins = set(lpips.net.state_dict()), {f"lin{k}.model.1.weight" for k in range(5)}
    missing = sorted(expected_trunk - trunk.keys()) + sorted(expected_lins - lins.keys())
    unexpected = sorted(trunk.keys() - expected_trunk) + sorted(lins.keys() - expected_lins)
    if missing or unexpected:
        raise ValueError(
            f"lpips_path={paths}: missing keys {missing[:12]}, unexpected keys {unexpected[:12]}\n{LPIPS_LAYOUT}"
        )
    lpips.net.load_state_dict(trunk, strict=True)
    for k in range(5):
        getattr(lpips, f"lin{k}").model[1].weight.data.copy_(lins[f"lin{k}.model.1.weight"])
    return lpips


def _split_lpips_keys(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trunk under `sliceK.N.*` names, `linK.*` weights) from any accepted layout."""
    index_to_slice = {i: k for k, (start, end) in enumerate(_VGG_SLICES, start=1) for i in range(start, end)}
    trunk: dict[str, Tensor] = {}
    lins: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            continue
        key = key.removeprefix("loss.perceptual_loss.")
        if key.startswith(("classifier.", "scaling_layer.")):
            continue  # VGG's ImageNet head and LPIPS's constant normalisation: not weights we load
        if key.startswith("net."):
            trunk[key.removeprefix("net.")] = value
        elif key.startswith("features."):
            _, index, param = key.split(".")
            trunk[f"slice{index_to_slice.get(int(index), 0)}.{index}.{param}"] = value
        elif key.startswith("lin"):
            lins[key] = value
        else:
            trunk[key] = value  # reported as unexpected, with the layout
    return trunk, lins


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix (Isola et al. 2017) as LDM uses it: one logit per image patch.

    `main` = [conv s2, LeakyReLU] + (n_layers - 1) x [conv s2, BatchNorm, LeakyReLU]
             + [conv s1, BatchNorm, LeakyReLU] + [conv s1 -> 1 channel]; 4x4 kernels, widths ndf·min(2^i, 8).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        width = ndf
        for n in range(1, n_layers + 1):
            next_width = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            # no conv bias: BatchNorm's shift replaces it
            layers += [
                nn.Conv2d(width, next_width, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(next_width),
                nn.LeakyReLU(0.2, True),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_pix2pix_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _pix2pix_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """LDM's LPIPSWithDiscriminator (see the module docstring); `disc_start=None` builds no discriminator."""

    def __init__(
        self,
        kl_weight: float = 1e-6,
        pixel_loss: str = "l1",
        lpips_weight: float = 0.0,
        lpips_path: str | Sequence[str] | None = None,
        disc_start: int | None = None,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        logvar_init: float = 0.0,
    ) -> None:
        super().__init__()
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        if lpips_weight > 0 and not lpips_path:
            raise ValueError(
                f"lpips_weight={lpips_weight} needs lpips_path: LPIPS weights are never downloaded; "
                f"set lpips_path to local files, or lpips_weight=0\n{LPIPS_LAYOUT}"
            )
        if disc_start is not None and disc_start < 0:
            raise ValueError(f"disc_start must be >= 0 or null (no discriminator), got {disc_start}")
        self.kl_weight = kl_weight
        self.pixel_loss = pixel_loss
        self.lpips_weight = lpips_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.perceptual_loss = load_lpips(lpips_path) if lpips_weight > 0 else None
        self.discriminator = (
            NLayerDiscriminator(disc_in_channels, n_layers=disc_num_layers)
            if disc_start is not None
            else None
        )

    def train(self, mode: bool = True) -> AutoencoderLoss:
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()  # a fixed metric, whatever mode the trainer sets
        return self

    def discriminator_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start and self.disc_factor > 0

    def autoencoder_loss(
        self, x: Tensor, recon: Tensor, posterior: DiagonalGaussianDistribution, step: int, last_layer: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder's objective and its parts (detached) for logging. `step` counts batches."""
        x, recon = x.float(), recon.float()
        rec = (x - recon).abs() if self.pixel_loss == "l1" else (x - recon) ** 2
        if self.perceptual_loss is not None:
            rec = rec + self.lpips_weight * self.perceptual_loss(x, recon)
        batch = x.shape[0]
        nll = torch.sum(rec / torch.exp(self.logvar) + self.logvar) / batch
        kl = posterior.kl().float().sum() / batch
        total = nll + self.kl_weight * kl
        logs = {
            "rec_loss": rec.detach().mean(),
            "nll": nll.detach(),
            "kl": kl.detach(),
            "logvar": self.logvar.detach(),
        }
        if self.discriminator is not None:
            g_loss = torch.zeros((), device=x.device)
            if self.discriminator_active(step):
                g_loss = -self.discriminator(recon).mean()
                d_weight = self._adaptive_weight(nll, g_loss, last_layer)
                total = total + self.disc_factor * d_weight * g_loss
                logs["d_weight"] = d_weight
            logs["g_loss"] = g_loss.detach()
        logs["total"] = total.detach()
        return total, logs

    def _adaptive_weight(self, nll: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
        """Balance the GAN term against reconstruction by their gradient norms at the decoder's output layer."""
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return self.disc_weight * torch.clamp(weight, 0.0, 1e4).detach()

    def discriminator_loss(self, x: Tensor, recon: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss of the discriminator on real `x` and (detached) reconstructions."""
        if self.discriminator is None:
            raise RuntimeError("discriminator_loss called without a discriminator (disc_start is None)")
        logits_real = self.discriminator(x.detach().float())
        logits_fake = self.discriminator(recon.detach().float())
        d_loss = self.disc_factor * hinge_d_loss(logits_real, logits_fake)
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
