"""trainer=fsdp: fully sharded data parallel with torch's FSDP2 (`fully_shard`) under Lightning.

Lightning's `ModelParallelStrategy` sets up the processes and a device mesh; the module shards itself in
`configure_model` (`shard_latent_diffusion` below). Each UNet block is one FSDP unit, so at most one
block's full weights are gathered at a time; the UNet's parameters, gradients, AdamW state and EMA are
split over all ranks. The frozen autoencoder and text encoder stay whole on every rank: they get no
gradients or optimizer state, and sharding them would only add communication (a trainable text encoder
is sharded like the UNet, or its gradients would never be averaged).

Why not Lightning's `FSDPStrategy` (FSDP1): it wraps the whole LightningModule, flattening frozen and
trainable weights together, and only gathers them inside `forward` — but sampling calls the autoencoder's
`decode` and the text encoder's `encode` directly, and the EMA has to follow sharded parameters.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method


class FSDPStrategy(ModelParallelStrategy):
    """FSDP over every rank: a data-parallel mesh of `devices × num_nodes` and no tensor parallelism.

    Checkpoints are one file gathered on rank 0 (`save_distributed_checkpoint=False`), the same
    `last.ckpt` that sample.py, ldm-convert and `ckpt_path=last` read for any other strategy.
    """

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" would make the data-parallel size the number of nodes.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def shard_latent_diffusion(module: Any, mesh: DeviceMesh) -> None:
    """Apply FSDP2 to a LatentDiffusion in place: UNet blocks, then the UNet, then the EMA shadows."""
    unet = module.model.diffusion_model
    for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks):
        fully_shard(block, mesh=mesh)
    # Explicit True: FSDP2 would otherwise keep the root's weights gathered after a forward for the
    # backward that follows, but sampling runs forwards with no backward, and swaps EMA shards in between.
    fully_shard(unet, mesh=mesh, reshard_after_forward=True)
    if module.train_text_encoder:
        fully_shard(module.cond_stage_model, mesh=mesh, reshard_after_forward=True)
        # encode_text calls `encode`, not `forward`: gather the weights around it too.
        register_fsdp_forward_method(module.cond_stage_model, "encode")
    if module.model_ema is not None:
        module.model_ema.shard_like(module.model)
