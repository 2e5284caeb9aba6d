"""The evaluation callback (issue 9, item 2): a short CPU training run through `train.py` with `data.val_shards`
and `+callbacks/evaluate=default` logs `val/loss`, `val/fid`, `val/kid_*`, `val/clip_score`,
`val/inception_score_*` and the demo judge's `val/caption_fidelity` to CSV, TensorBoard and offline wandb,
the same numbers in all three; the callback's images are ldm-eval's (seeds seed+i, EMA weights), so its FID
is ldm-eval's on the saved checkpoint, against reference features computed once and cached; validation
repeated on the same weights gives the same loss; a missing weights file stops the run in one line."""

from __future__ import annotations

import json
import math
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from test_evaluate import write_clip, write_inception
from test_train import BARE, QUIET, _one_thread, cli, column, load_ckpt, metrics  # noqa: F401

from ldm.data.synthetic import write_shapes_shards

METRICS = ["val/fid", "val/kid_mean", "val/kid_std", "val/clip_score", "val/inception_score_mean",
           "val/inception_score_std"]


def wandb_history(path: Path) -> list[dict[str, object]]:
    """The history rows of an offline run's `.wandb` file: LevelDB-log records (32 KiB blocks, 7-byte headers:
    crc, length, type) of wandb's protobuf `Record`s, after wandb's own 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, block, offset, chunks, rows = path.read_bytes(), 32768, 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunks += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        elif kind == 0:
            break
    return rows


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {"inception": write_inception(root / "weights-inception-2015-12-05-6726825d.pth"),
            "clip": write_clip(root / "clip")}


def shards(tmp_path: Path) -> None:
    write_shapes_shards(tmp_path / "train", num_samples=32, samples_per_shard=16, seed=0)
    write_shapes_shards(tmp_path / "val", num_samples=8, samples_per_shard=8, seed=1)


def test_a_training_run_logs_val_loss_and_the_metrics_to_csv_tensorboard_and_wandb(
    tmp_path: Path, weights: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    data = ["data=webdataset", f"data.train_shards={tmp_path}/train", f"data.val_shards={tmp_path}/val",
            "data.num_workers=0", "data.batch_size=4", "data.resolution=32"]
    evaluate = ["+callbacks/evaluate=default", f"callbacks.evaluate.inception_weights={weights['inception']}",
                f"callbacks.evaluate.clip_model={weights['clip']}",
                "callbacks.evaluate.metrics=[fid,kid,clip_score,inception_score]", "callbacks.evaluate.num_images=4",
                "callbacks.evaluate.steps=2", "callbacks.evaluate.batch_size=2", "callbacks.evaluate.kid_subsets=5",
                "callbacks.evaluate.inception_splits=2", "callbacks.evaluate.save_images=true"]
    judge = ("+callbacks.caption_fidelity={_target_:ldm.lightning.callbacks.CaptionFidelity,"
             "prompts:${validation_prompts},steps:2,judge:{_target_:hydra.utils.get_method,"
             "path:ldm.data.synthetic.caption_fidelity}}")
    result = cli(*data, *evaluate, judge, "logger=[csv,tensorboard,wandb]", "logger.wandb.offline=true",
                 f"hydra.run.dir={run}", "module.ema_decay=0.9", "module.optimizer.lr=1e-2",
                 "module.lr_scheduler.start_factor=1.0", "trainer.max_steps=5", "trainer.log_every_n_steps=1",
                 "+trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=2", *BARE, *QUIET,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr

    # CSV: val/loss after steps 2 and 4 (Lightning's steps 1 and 3); the metrics there too, and at the end
    rows = metrics(run)
    steps = {name: [int(r["step"]) for r in rows if r.get(name)] for name in ["val/loss", *METRICS]}
    assert steps["val/loss"] == [1, 3]
    assert all(steps[name] == [1, 3, 5] for name in METRICS), steps
    csv_values = {name: column(rows, name) for name in ["val/loss", *METRICS]}
    assert all(math.isfinite(v) for values in csv_values.values() for v in values)
    assert all(v > 0 for v in csv_values["val/fid"]) and len(set(csv_values["val/fid"])) == 3  # the weights moved
    assert all(v >= 1 for v in csv_values["val/inception_score_mean"])  # IS is at least 1 by definition
    # the demo judge reports the same way: its printed line unchanged, its number in the loggers as val/...
    printed = re.search(r"caption fidelity: ([0-9.]+) of 2 generated images match their prompt", output)
    assert printed, output[-3000:]
    (fidelity,) = column(rows, "val/caption_fidelity")
    assert f"{fidelity:.3f}" == printed.group(1)
    # the reference set's features were computed once for the run, not at each of its three evaluations
    assert len(re.findall(r"reference features of 4 images", output)) == 1, output[-3000:]

    # TensorBoard: the same scalars, at the same steps (stored as float32)
    (events,) = run.glob("tensorboard/version_*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    for name, values in csv_values.items():
        board = accumulator.Scalars(name)
        assert [e.step for e in board] == steps[name]
        assert [e.value for e in board] == pytest.approx(values, rel=1e-6)
    assert [e.value for e in accumulator.Scalars("val/caption_fidelity")] == [fidelity]

    # wandb: the offline run's history holds them, with the same values
    (record,) = run.glob("wandb/offline-run-*/*.wandb")
    deadline = time.monotonic() + 30  # wandb's writer process may still be flushing after the run exits
    while b"val/fid" not in record.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    history = wandb_history(record)
    for name, values in csv_values.items():
        assert [row[name] for row in history if name in row] == values, name
    assert [row["val/caption_fidelity"] for row in history if "val/caption_fidelity" in row] == [fidelity]

    # the same weights validated twice give the same val/loss: the one the run logged after step 4
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*data, "module.ema_decay=0.9"])
    import lightning as L

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_", None)
    module = instantiate(cfg.module, model=model_cfg, _convert_="all")
    module.load_state_dict(load_ckpt(run / "checkpoints" / "step-0000004.ckpt")["state_dict"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    datamodule = instantiate(cfg.data)
    first, second = (trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"] for _ in range(2))
    assert first == second == csv_values["val/loss"][-1]

    # the end-of-run evaluation is ldm-eval's on the final checkpoint (EMA weights, image i from seed i, the
    # same batches), and ldm-eval finds the reference features in the cache the run wrote
    from ldm.evaluate import run as evaluate_run

    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        eval_overrides = [
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"prompts={tmp_path}/val", "num_images=4",
            f"inception_weights={weights['inception']}", f"clip_model={weights['clip']}",
            "metrics=[fid,kid,clip_score,inception_score]", "steps=2", "batch_size=2", "guidance_scale=7.5",
            "kid_subsets=5", "kid_subset_size=100", "inception_splits=2", "height=32", "width=32", "device=cpu",
        ]
        eval_cfg = compose("eval", overrides=[*eval_overrides, "ema=true", f"out_dir={tmp_path / 'eval'}"])
    report = evaluate_run(eval_cfg)
    assert report["reference_cache"]["hit"] is True
    # (the two models' kernels differ in float rounding: 1e-4 of each value, and a spread to 1e-4 of its mean)
    for name in ("fid", "kid_mean", "clip_score", "inception_score_mean"):
        assert csv_values[f"val/{name}"][-1] == pytest.approx(report[name], rel=1e-4), name
    for name, mean in (("kid_std", "kid_mean"), ("inception_score_std", "inception_score_mean")):
        assert csv_values[f"val/{name}"][-1] == pytest.approx(report[name], abs=1e-4 * abs(report[mean])), name
    # the pictures themselves: ldm-eval's to rounding; its raw (not EMA) weights' clearly not
    def pictures(folder: Path) -> np.ndarray:
        return np.stack([np.asarray(Image.open(folder / f"{i:05d}.png"), dtype=np.int16) for i in range(4)])

    ours = pictures(run / "evaluation" / "step-0000005")
    assert np.abs(ours - pictures(tmp_path / "eval")).max() <= 1
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        raw_cfg = compose("eval", overrides=[*eval_overrides, "ema=false", f"out_dir={tmp_path / 'eval-raw'}"])
    evaluate_run(raw_cfg)
    assert np.abs(ours - pictures(tmp_path / "eval-raw")).mean() > 2


def test_a_missing_weights_file_stops_the_run_in_one_line_before_training(tmp_path: Path) -> None:
    shards(tmp_path)
    result = cli("data=webdataset", f"data.train_shards={tmp_path}/train", f"data.val_shards={tmp_path}/val",
                 "data.num_workers=0", "data.resolution=32", "+callbacks/evaluate=default", f"hydra.run.dir={tmp_path}/run",
                 "trainer.max_steps=1", *BARE, *QUIET, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "inception_weights" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "inception_weights=weights/weights-inception-2015-12-05-6726825d.pth does not exist" in lines[0]
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # it stopped before the first step


def test_a_setting_checked_inside_fit_is_one_line_too(tmp_path: Path, weights: dict[str, Path]) -> None:
    """The callback's check of the model (text alone, not an image_concat model) runs in its setup, inside
    trainer.fit: train.py still prints it as one line, with no traceback."""
    write_shapes_shards(tmp_path / "train", num_samples=8, samples_per_shard=8, seed=0, variant="edit")
    write_shapes_shards(tmp_path / "val", num_samples=8, samples_per_shard=8, seed=1, variant="edit")
    result = cli("data=webdataset", f"data.train_shards={tmp_path}/train", f"data.val_shards={tmp_path}/val",
                 "data.num_workers=0", "data.resolution=32", "conditioning=image_concat", "data.cond_image_key=cond.png",
                 "+callbacks/evaluate=default", f"callbacks.evaluate.inception_weights={weights['inception']}",
                 f"callbacks.evaluate.clip_model={weights['clip']}", f"hydra.run.dir={tmp_path}/run",
                 "trainer.max_steps=1", *BARE, *QUIET, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and "generates from text alone" in lines[0], result.stderr[-3000:]


def test_two_ranks_share_the_generation_and_rank_0_scores_what_one_process_would(
    tmp_path: Path, weights: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DDP each rank makes every second image (5 images: the last batch of rank 1 is a stand-in, dropped);
    rank 0 gathers them in order and scores them: ldm-eval's pictures and numbers on the checkpoint."""
    from ldm.evaluate import run as evaluate_run

    shards(tmp_path)
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    result = cli("trainer=ddp_cpu", "data=webdataset", f"data.train_shards={tmp_path}/train",
                 f"data.val_shards={tmp_path}/val", "data.num_workers=0", "data.batch_size=2", "data.resolution=32",
                 "+callbacks/evaluate=default", f"callbacks.evaluate.inception_weights={weights['inception']}",
                 f"callbacks.evaluate.clip_model={weights['clip']}", "callbacks.evaluate.num_images=5",
                 "callbacks.evaluate.steps=2", "callbacks.evaluate.batch_size=2", "callbacks.evaluate.kid_subsets=5",
                 "callbacks.evaluate.save_images=true", f"hydra.run.dir={run}", "module.ema_decay=0.9",
                 "module.optimizer.lr=1e-2", "module.lr_scheduler.start_factor=1.0", "trainer.max_steps=3",
                 "+trainer.val_check_interval=2", *BARE, *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(run)
    assert [int(r["step"]) for r in rows if r.get("val/fid")] == [1, 3]  # after step 2 (beside val/loss) and at the end
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "ema=true", f"prompts={tmp_path}/val", "num_images=5",
            f"out_dir={tmp_path / 'eval'}", f"inception_weights={weights['inception']}", f"clip_model={weights['clip']}",
            "metrics=[fid,kid,clip_score]", "steps=2", "batch_size=2", "kid_subsets=5", "kid_subset_size=100",
            "height=32", "width=32", "device=cpu",
        ])
    report = evaluate_run(cfg)
    ours = sorted((run / "evaluation" / "step-0000003").glob("*.png"))
    assert [p.name for p in ours] == [f"{i:05d}.png" for i in range(5)]
    for path in ours:
        made = np.asarray(Image.open(path), dtype=np.int16)
        assert np.abs(made - np.asarray(Image.open(tmp_path / "eval" / path.name), dtype=np.int16)).max() <= 1
    for name in ("fid", "kid_mean", "clip_score"):
        assert column(rows, f"val/{name}")[-1] == pytest.approx(report[name], rel=1e-4), name
