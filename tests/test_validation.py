"""Validation loss during training (issue 9, item 2): with `data.val_shards`, `val/loss` is the training
loss on held-out shards at noise and timesteps fixed for the whole run (EMA weights when present), logged
every `trainer.val_check_interval` steps; the same weights give the same number; the training itself is
not touched by it."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_train import BARE, QUIET, _one_thread, column, compose_train, load_ckpt, metrics  # noqa: F401

from ldm.cli.train import import_lightning, train
from ldm.data.synthetic import write_shapes_shards


def shards(tmp_path: Path) -> list[str]:
    write_shapes_shards(tmp_path / "train", num_samples=32, samples_per_shard=16, seed=0)
    write_shapes_shards(tmp_path / "val", num_samples=8, samples_per_shard=8, seed=1)
    return ["data=webdataset", f"data.train_shards='{tmp_path}/train/shapes-*.tar'", "data.num_workers=0",
            "data.batch_size=4", "data.resolution=32", "module.ema_decay=0.9", "trainer.max_steps=6",
            "trainer.log_every_n_steps=1", *BARE, *QUIET]


def test_val_loss_is_logged_every_interval_repeatable_and_leaves_training_alone(tmp_path: Path) -> None:
    common = shards(tmp_path)
    with_val = [*common, f"data.val_shards='{tmp_path}/val/shapes-*.tar'", "+trainer.val_check_interval=3"]
    train(compose_train(tmp_path, with_val, output_dir="${paths.root}/val"))
    rows = metrics(tmp_path / "runs" / "val")
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [2, 5]  # after steps 3 and 6
    losses = column(rows, "val/loss")
    assert all(0 < v < 10 for v in losses) and losses[0] != losses[1]  # the weights moved in between

    # validation draws from its own generator and puts the trained weights back: training is unchanged
    train(compose_train(tmp_path, common, output_dir="${paths.root}/plain"))
    a = load_ckpt(tmp_path / "runs" / "val" / "checkpoints" / "last.ckpt")
    b = load_ckpt(tmp_path / "runs" / "plain" / "checkpoints" / "last.ckpt")
    trained = [k for k in a["state_dict"] if k.startswith(("model.diffusion_model.", "model_ema."))]
    assert trained and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in trained)

    # the same weights, validated twice: the same val/loss, and the EMA weights are the ones validated
    L = import_lightning()
    cfg = compose_train(tmp_path, with_val, output_dir="${paths.root}/again")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_", None)
    module = instantiate(cfg.module, model=model_cfg, _convert_="all")
    module.load_state_dict(a["state_dict"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    datamodule = instantiate(cfg.data)
    first, second = (trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"] for _ in range(2))
    assert first == second
    ema_weights = {k: v.clone() for k, v in module.state_dict().items() if k.startswith("model.diffusion_model.")}
    module.model_ema = None  # the raw weights instead: a different number
    raw = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    assert raw != first
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in ema_weights.items())  # swapped back after each
