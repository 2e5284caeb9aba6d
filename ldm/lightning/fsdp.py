"""trainer=fsdp: fully sharded data parallel with torch's FSDP2 (`fully_shard`) under Lightning.

Lightning's `ModelParallelStrategy` sets up the processes and a device mesh; the module shards itself in
`configure_model` (`shard_latent_diffusion` below). Each UNet block is one FSDP unit, so at most one
block's full weights are gathered at a time; the UNet's parameters, gradients, AdamW state and EMA are
split over all ranks. The frozen autoencoder and text encoder stay whole on every rank: they get no
gradients or optimizer state, and sharding them would only add communication (a trainable text encoder
is sharded like the UNet, or its gradients would never be averaged).

Mixed precision (`trainer.strategy.param_dtype`, `auto` by default): under `trainer.precision=bf16-mixed` or
`bf16-true` the blocks run on bf16 copies of their weights, gathered in bf16 (half the all-gather traffic of
float32), while the sharded weights the optimizer updates, their gradients and the EMA stay float32 and
gradients are reduce-scattered in float32 (`reduce_dtype`): torch's `MixedPrecisionPolicy`, the setting
MLPerf's FSDP runs use. Under `32-true` everything stays float32.

Why not Lightning's `FSDPStrategy` (FSDP1): it wraps the whole LightningModule, flattening frozen and
trainable weights together, and only gathers them inside `forward` — but sampling calls the autoencoder's
`decode` and the text encoder's `encode` directly, and the EMA has to follow sharded parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


class FSDPStrategy(ModelParallelStrategy):
    """FSDP over every rank: a data-parallel mesh of `devices × num_nodes` and no tensor parallelism.

    Checkpoints are one file gathered on rank 0 (`save_distributed_checkpoint=False`), the same
    `last.ckpt` that sample.py, ldm-convert and `ckpt_path=last` read for any other strategy.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        param_dtype: str | None = "auto",
        reduce_dtype: str = "float32",
        **kwargs: Any,
    ) -> None:
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in (*DTYPES, "auto", None) or (name == "reduce_dtype" and value in ("auto", None)):
                choices = ", ".join(sorted(DTYPES)) + (", auto, null" if name == "param_dtype" else "")
                raise ValueError(f"trainer.strategy.{name}={value!r}: choose one of {choices}")
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
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


    def mixed_precision(self, precision: str) -> MixedPrecisionPolicy:
        """The FSDP2 policy for Lightning's `precision` flag (see the module's docstring)."""
        param = self.param_dtype
        if param == "auto":
            param = "bfloat16" if str(precision).startswith("bf16") else None
        return MixedPrecisionPolicy(
            param_dtype=DTYPES[param] if param else None, reduce_dtype=DTYPES[self.reduce_dtype]
        )


def shard_latent_diffusion(module: Any, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> None:
    """Apply FSDP2 to a LatentDiffusion in place: UNet blocks, then the UNet, then the EMA shadows."""
    policy = mp_policy or MixedPrecisionPolicy()
    unet = module.model.diffusion_model
    for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # Explicit True: FSDP2 would otherwise keep the root's weights gathered after a forward for the
    # backward that follows, but sampling runs forwards with no backward, and swaps EMA shards in between.
    fully_shard(unet, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    if module.train_text_encoder:
        fully_shard(module.cond_stage_model, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
        # encode_text calls `encode`, not `forward`: gather the weights around it too.
        register_fsdp_forward_method(module.cond_stage_model, "encode")
    if module.model_ema is not None:
        module.model_ema.shard_like(module.model)
