"""The training loader at GPU speed: one DataLoader with persistent workers for the whole run (a pass no
longer waits for new worker processes), giving the batches a DataLoader per pass gives, item for item,
across epochs, `epoch_length` cuts mid-pass and mid-epoch resumes; captions tokenized in the workers by the
training model's own tokenizer, the ids identical to tokenizing in the training process, so training is
too."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from test_train import BARE, QUIET, _one_thread, compose_train, load_ckpt, run_dir  # noqa: F401 (autouse fixture)

from ldm.cli.train import train
from ldm.data import webdataset as wdm
from ldm.data.synthetic import write_shapes_shards
from ldm.data.webdataset import WebDataModule
from ldm.models.encoders import ClipBPETokenizer, write_clip_tokenizer

RES = 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_shapes_shards(tmp_path_factory.mktemp("shapes"), 48, 12, RES, seed=3)


def stream(dm: WebDataModule, epochs: int) -> list[list[dict[str, Any]]]:
    dm.setup("fit")
    loader = dm.train_dataloader()
    return [list(loader) for _ in range(epochs)]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Keys, captions, images, skips and stream positions (the serial counts batches handed out)."""
    strip = [{k: v for k, v in x.items() if k != wdm.POSITION} | {"at": {**x[wdm.POSITION], "serial": 0}} for x in a]
    other = [{k: v for k, v in y.items() if k != wdm.POSITION} | {"at": {**y[wdm.POSITION], "serial": 0}} for y in b]
    return same(strip, other)


@pytest.mark.parametrize("settings", [{"epoch_length": 7}, {"epoch_length": 5, "resampled": True}, {}],
                         ids=["cut-mid-pass", "resampled", "whole-passes"])
def test_one_persistent_loader_gives_the_batches_of_a_loader_per_pass(
    shapes: list[str], monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any]
) -> None:
    def module() -> WebDataModule:
        return WebDataModule(shapes, batch_size=4, num_workers=2, resolution=RES, shuffle_buffer=8,
                             random_flip=True, **settings)

    made: list[bool] = []
    data_loader = wdm.DataLoader

    def counted(*args: Any, **kwargs: Any) -> Any:
        made.append(bool(kwargs.get("persistent_workers")))
        return data_loader(*args, **kwargs)

    monkeypatch.setattr(wdm, "DataLoader", counted)
    persistent = stream(module(), epochs=3)
    assert made == [True]  # one DataLoader for all passes of all epochs
    made.clear()
    per_pass = module()
    per_pass.setup("fit")
    loader = per_pass.train_dataloader()
    loader.persistent = False  # the old way: a DataLoader per pass
    fresh = [list(loader) for _ in range(3)]
    assert len(made) >= 3 and not any(made)
    for epoch, (a, b) in enumerate(zip(persistent, fresh, strict=True)):
        assert same_batches(a, b), epoch
    assert wdm.POSITION in persistent[0][0] and persistent[0][0]["key"] != persistent[1][0]["key"]


def test_a_persistent_loader_resumes_mid_pass_as_the_uninterrupted_stream(shapes: list[str]) -> None:
    """A position saved mid-pass, given to a new loader, goes on with the batches the first one gave next
    (the workers take their saved starts through the pass queue)."""
    def module() -> WebDataModule:
        return WebDataModule(shapes, batch_size=4, num_workers=2, resolution=RES, shuffle_buffer=8, epoch_length=9)

    (whole,) = stream(module(), epochs=1)
    dm = module()
    dm.setup("fit")
    dm.trainer = None
    resumed = dm.train_dataloader()
    resumed.resume = whole[3][wdm.POSITION]
    resumed.batches_done = lambda: 4
    rest = list(resumed)
    assert [b["key"] for b in rest] == [b["key"] for b in whole[4:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, whole[4:], strict=True))


CAPTIONS = [
    "a red circle on a blue background",
    "Crème brûlée, naïve café — «quoted» ‘curly’ &amp; emoji 🎨🖌️ and 漢字 かな 한국어",
    " ".join(["a very long caption that runs past the seventy-seven tokens of CLIP's context"] * 8),
    "   spaces\tand\nnewlines   ",
    "UPPER case AND Numbers 12345 <|endoftext|> literal specials",
    "x",
]


def caption_shard(path: Path) -> str:
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path), encoder=False) as writer:
        for i in range(24):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(buffer, format="PNG")
            writer.write({"__key__": f"{i:04d}", "png": buffer.getvalue(), "txt": CAPTIONS[i % len(CAPTIONS)].encode()})
    return str(path)


@pytest.mark.parametrize("source", ["open_clip", "tokenizer_dir"])
@pytest.mark.parametrize("pad_id", [None, 0], ids=["sd1-pad-eot", "sd2-pad-0"])
def test_workers_tokenize_captions_to_the_ids_the_model_gives(tmp_path: Path, source: str, pad_id: int | None) -> None:
    tokenizer_dir = None
    if source == "tokenizer_dir":
        tokenizer_dir = str(tmp_path / "tokenizer")
        write_clip_tokenizer(tokenizer_dir)
    tokenizer = ClipBPETokenizer(tokenizer_dir, 77, pad_id=pad_id)
    dm = WebDataModule(caption_shard(tmp_path / "c.tar"), batch_size=5, num_workers=2, resolution=RES, shuffle_buffer=4)
    assert dm.tokenize_with(tokenizer)
    (batches,) = stream(dm, epochs=1)
    assert sum(len(b["caption"]) for b in batches) == 24
    for batch in batches:
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (len(batch["caption"]), 77)
        assert torch.equal(batch["input_ids"], tokenizer(batch["caption"]))
    every = torch.cat([b["input_ids"] for b in batches])
    assert len({tuple(row.tolist()) for row in every}) == len(CAPTIONS)  # distinct captions, distinct ids
    long_row = tokenizer([CAPTIONS[2]])[0]
    inner = long_row[1:-1]  # cut to 77: <sot>, 75 text tokens, <eot>, no padding
    assert long_row[0] == tokenizer.sot_id and long_row[-1] == tokenizer.eot_id
    assert (inner != tokenizer.eot_id).all() and (inner != tokenizer.pad_id).all()


def test_training_on_ids_from_the_workers_is_training_on_captions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three steps with caption dropout from web shards, tokenized in two workers and in the training
    process: the same weights and EMA, bit for bit."""
    shards = caption_shard(tmp_path / "c.tar")
    overrides = ["data=webdataset", f"data.train_shards={shards}", f"data.resolution={RES * 2}", "data.batch_size=4",
                 "data.num_workers=2", "data.shuffle_buffer=8", "trainer.max_steps=3", "model=tiny",
                 "module.caption_dropout=0.5", *BARE, *QUIET]
    seen: list[bool] = []
    from ldm.lightning.module import LatentDiffusion

    context = LatentDiffusion._text_context

    def recording(self: LatentDiffusion, batch: dict[str, Any], keep: Any) -> torch.Tensor:
        seen.append("input_ids" in batch)
        return context(self, batch, keep)

    monkeypatch.setattr(LatentDiffusion, "_text_context", recording)
    train(compose_train(tmp_path / "workers", overrides))
    in_workers = load_ckpt(run_dir(tmp_path / "workers") / "checkpoints" / "last.ckpt")["state_dict"]
    assert seen == [True] * 3
    seen.clear()
    monkeypatch.setattr(WebDataModule, "tokenize_with", lambda self, tokenizer: False)
    train(compose_train(tmp_path / "main", overrides))
    in_main = load_ckpt(run_dir(tmp_path / "main") / "checkpoints" / "last.ckpt")["state_dict"]
    assert seen == [False] * 3
    assert in_workers.keys() == in_main.keys()
    for key, value in in_main.items():
        assert torch.equal(in_workers[key], value), key
