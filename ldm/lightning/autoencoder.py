"""AutoencoderTraining: stage one of latent diffusion, the first-stage KL autoencoder trained alone.

    python train.py experiment=autoencoder_demo             # tiny autoencoder on the demo shapes, CPU
    python train.py experiment=autoencoder_kl_f8 data.train_shards=... module.lpips_path=[...]
    python train.py module.first_stage_ckpt=outputs/autoencoder_demo/<run>/checkpoints/last.ckpt  # stage two

Per batch (LDM's AutoencoderKL.training_step):
    x̂, q(z|x) = first_stage_model(x)             z sampled from the posterior (generator seed + rank)
    autoencoder step: AutoencoderLoss (rec + LPIPS as NLL with a learned logvar, KL, adaptive GAN term)
    discriminator step (when disc_start is set): hinge loss on x and x̂, its own optimizer

With a discriminator the module optimizes manually (two optimizers), and Lightning counts both
optimizers' steps in `global_step`: two per batch, from the first batch on, so `trainer.max_steps` and
checkpoint intervals count twice the batches. `disc_start` counts batches, as in LDM.

The checkpoint's `state_dict` holds `first_stage_model.*` (LDM names, what
`LatentDiffusion(first_stage_ckpt=...)` reads) and `loss.*`; `ldm_config` holds the first-stage
config and `scale_factor` = 1 / std of the latents over the last ~100 training batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.checkpoint import read_vae_weights
from ldm.lightning.resume import start_next_epoch_fresh
from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussianDistribution
from ldm.models.autoencoder_losses import AutoencoderLoss

log = logging.getLogger(__name__)

# Decay of the running latent moments behind scale_factor: about the last 20 batches, recent enough to
# follow an encoder that is still changing, and each batch holds thousands of latent values.
LATENT_STATS_DECAY = 0.95


class AutoencoderTraining(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        kl_weight: float = 1e-6,
        pixel_loss: str = "l1",
        lpips_weight: float = 0.0,
        lpips_path: str | Sequence[str] | None = None,
        disc_start: int | None = None,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_num_layers: int = 3,
        learn_logvar: bool = True,
        seed: int = 0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if "first_stage" not in model:
            raise ValueError(f"model config has no 'first_stage' (keys: {sorted(model)})")
        self.first_stage_config = dict(model["first_stage"])
        # The loss first: a bad loss setting fails before a large autoencoder is built.
        self.loss = AutoencoderLoss(
            kl_weight=kl_weight,
            pixel_loss=pixel_loss,
            lpips_weight=lpips_weight,
            lpips_path=lpips_path,
            disc_start=disc_start,
            disc_weight=disc_weight,
            disc_factor=disc_factor,
            disc_num_layers=disc_num_layers,
            disc_in_channels=self.first_stage_config["ddconfig"]["in_channels"],
        )
        self.first_stage_model = AutoencoderKL(**self.first_stage_config)
        # LDM declared logvar but never gave it to an optimizer, so SD's VAE trained with logvar = 0.
        self.loss.logvar.requires_grad_(learn_logvar)
        self.optimizer_factory = optimizer
        self.seed = seed
        self.automatic_optimization = disc_start is None
        if init_from:
            # an SD file, a stage-one checkpoint, a standalone VAE file (vae-ft-mse) or a diffusers VAE
            weights, _ = read_vae_weights(init_from, self.first_stage_config, "init_from")
            self.first_stage_model.load_state_dict(weights, strict=True)
        self._generator: torch.Generator | None = None
        # Running (bias-corrected) E[z] and E[z²] of the posterior, for scale_factor.
        self._latent_moments = torch.zeros(2, dtype=torch.float64)
        self._latent_batches = 0

    # -- randomness -----------------------------------------------------------------------------

    @property
    def generator(self) -> torch.Generator:
        """Posterior noise: a stream per rank; a resumed run starts a fresh one (offset by the step)."""
        if self._generator is None or self._generator.device != self.device:
            offset = 1_000_003 * self.global_step + self.global_rank
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed + offset)
        return self._generator

    # -- training -------------------------------------------------------------------------------

    @property
    def batch_step(self) -> int:
        """Batches trained so far: Lightning's global_step counts both optimizers in manual mode."""
        return self.global_step if self.automatic_optimization else self.global_step // 2

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if "image" not in batch:
            raise ValueError("stage one trains the autoencoder on images: use image shards, not data=cached_latents")
        x = batch["image"]
        recon, posterior = self.first_stage_model(x, generator=self.generator)
        self._track_latents(posterior)
        step = self.batch_step
        last_layer = self.first_stage_model.decoder.conv_out.weight
        ae_loss, logs = self.loss.autoencoder_loss(x, recon, posterior, step, last_layer)
        if self.automatic_optimization:
            self._log(logs, x.shape[0])
            return ae_loss
        opt_ae, opt_disc = self.optimizers()
        opt_ae.zero_grad()
        self.manual_backward(ae_loss)
        opt_ae.step()
        # The generator loss left gradients on the discriminator; its own step starts clean.
        opt_disc.zero_grad(set_to_none=True)
        if self.loss.discriminator_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, recon)
            self.manual_backward(d_loss)
            logs.update(d_logs)
        else:
            logs["d_loss"] = torch.zeros((), device=x.device)
        # Before disc_start the discriminator has no gradients and this step changes nothing, but
        # it keeps global_step at two per batch throughout the run.
        opt_disc.step()
        self._log(logs, x.shape[0])
        return None

    def _log(self, logs: dict[str, Tensor], batch_size: int) -> None:
        rec_loss = logs.pop("rec_loss")
        self.log("train/rec_loss", rec_loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)

    @torch.no_grad()
    def _track_latents(self, posterior: DiagonalGaussianDistribution) -> None:
        # Moments of z ~ q(z|x) in closed form: E[z] = mean, E[z²] = mean² + var (no sampling noise).
        mean = posterior.mean.double()
        batch = torch.stack([mean.mean(), (mean**2 + posterior.var.double()).mean()])
        # Kept beside the latents, so tracking never waits on the device.
        self._latent_moments = self._latent_moments.to(batch.device)
        self._latent_moments.mul_(LATENT_STATS_DECAY).add_(batch, alpha=1.0 - LATENT_STATS_DECAY)
        self._latent_batches += 1

    def latent_std(self) -> float | None:
        """Std of the posterior samples over the last ~100 training batches (None before any)."""
        if self._latent_batches == 0:
            return None
        first, second = (self._latent_moments / (1.0 - LATENT_STATS_DECAY**self._latent_batches)).tolist()
        return max(second - first**2, 0.0) ** 0.5

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured (set module.optimizer in the training config)")
        params = list(self.first_stage_model.parameters())
        if self.loss.logvar.requires_grad:
            params.append(self.loss.logvar)
        opt_ae = self.optimizer_factory(params=params)
        if self.loss.discriminator is None:
            return opt_ae
        return [opt_ae, self.optimizer_factory(params=self.loss.discriminator.parameters())]

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        config: dict[str, Any] = {"first_stage": self.first_stage_config}
        std = self.latent_std()
        if std:
            config["scale_factor"] = 1.0 / std
        checkpoint["ldm_config"] = config
        checkpoint["latent_moments"] = {
            "moments": self._latent_moments.cpu(),
            "batches": self._latent_batches,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        start_next_epoch_fresh(checkpoint)
        stats = checkpoint.get("latent_moments")
        if stats is not None:
            self._latent_moments = stats["moments"].clone()
            self._latent_batches = int(stats["batches"])
        self._generator = None


class ReconstructionGrid(L.Callback):
    """Every `every_n_steps` (and at the end), save inputs above their reconstructions (posterior mean)
    from the latest training batch as `<run dir>/reconstructions/step-NNNNNNN.png`."""

    def __init__(self, every_n_steps: int = 500, num_images: int = 8) -> None:
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self._batch: Tensor | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch["image"][: self.num_images].detach()
        if trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)

    @torch.no_grad()
    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch is None or not trainer.is_global_zero:
            return
        model = pl_module.first_stage_model
        was_training = model.training
        model.eval()
        recon = model.decode(model.encode(self._batch.to(pl_module.dtype)).mode())
        model.train(was_training)
        rows = [_to_row(self._batch), _to_row(recon)]
        path = Path(trainer.default_root_dir) / "reconstructions" / f"step-{trainer.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def _to_row(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> one uint8 image of them side by side."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return torch.cat(list(pixels.permute(0, 2, 3, 1)), dim=1).numpy()
