"""ldm-cache-latents --workers, --precision and torchrun: the source shards decoded in DataLoader worker processes
write what one process writes (same members, same order, same skip counts), an interrupted run leaves no half
shard, the autoencoder's autocast is recorded (bf16 close to fp32, fp32 as before), and two ranks under torchrun
(gloo on the CPU) write what one process writes, with cache.json counting both ranks' samples.

Tiny random models at 16 px, five small shards (one with no usable sample, skips of two kinds)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import tiny_sd_file
from PIL import Image
from test_train import _one_thread  # noqa: F401 (autouse fixture: one thread)

from ldm.data import cache_latents as cl
from ldm.data.cache_latents import cache_latents, load_encoders, main
from ldm.data.webdataset import WebDataModule, _ShardStream

REPO = Path(__file__).resolve().parent.parent
RES = 16
SIZES = (5, 3, 6, 2, 4)  # samples per source shard; shard 3 holds none that decodes
FLAGS = ("--resolution", str(RES), "--batch-size", "2")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shards(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for s, n in enumerate(SIZES):
        with wds.TarWriter(str(folder / f"{s:06d}.tar"), encoder=False) as sink:
            for i in range(n):
                sample = {"__key__": f"s{s}_{i:02d}", "png": _png(rng.integers(0, 255, (RES, RES + 8, 3), dtype=np.uint8)),
                          "txt": f"caption {s} {i}".encode()}
                if s == 3 or (s + i) % 4 == 3:
                    sample["png"] = b"not a picture"
                if (s + i) % 5 == 4:
                    del sample["txt"]
                sink.write(sample)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """(checkpoint, image shards, and a cache of reference runs in one process: flags -> output folder)"""
    root = tmp_path_factory.mktemp("cache_workers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sd = tiny_sd_file(root / "sd.safetensors", seed=0)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "sd": sd, "images": _write_shards(root / "images"), "refs": {}}


def _args(data: dict[str, Any], out: Path, *flags: str) -> list[str]:
    return [str(data["sd"]), str(data["images"]), str(out), *FLAGS, *flags]


def _reference(data: dict[str, Any], *flags: str) -> Path:
    """The folder one process writes with `flags`, decoding in itself (--workers 0)."""
    if flags not in data["refs"]:
        out = data["root"] / f"ref{len(data['refs'])}"
        assert main([*_args(data, out, *flags), "--workers", "0"]) == 0
        data["refs"][flags] = out
    return data["refs"][flags]


def _shard(path: Path) -> list[tuple[str, bytes]]:
    """A tar's members in order, (name, bytes)."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _contents(folder: Path) -> dict[str, Any]:
    """Every file of a cache folder: each shard's members in order, cache.json as read, other files' bytes."""
    contents: dict[str, Any] = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".tar"):
            contents[path.name] = _shard(path)
        elif path.name == "cache.json":
            contents[path.name] = json.loads(path.read_text())
        else:
            contents[path.name] = path.read_bytes()
    return contents


def _record_decoding_pids(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Each decoded sample appends the id of the process that decoded it to `log` (forked workers inherit it)."""
    decode = _ShardStream._decode

    def recorded(self: _ShardStream, raw: dict[str, Any], rng: Any) -> dict[str, Any]:
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        return decode(self, raw, rng)

    monkeypatch.setattr(_ShardStream, "_decode", recorded)


@pytest.mark.parametrize("flags", [("--flip", "--text"), ("--buckets", "--bucket-step", "8")], ids=["flip_text", "buckets"])
def test_workers_write_what_one_process_writes(
    data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...]
) -> None:
    reference = _contents(_reference(data, *flags))
    info = reference["cache.json"]
    assert info["samples"] == 10 and info["skipped"] == {"not an image": 6, "no caption": 4}, info
    assert sorted(n for n in reference if n.endswith(".tar")) == [f"{s:06d}.tar" for s in range(len(SIZES))]
    assert reference["000003.tar"] == []  # a shard of no usable sample: an empty latent shard, as before

    log = tmp_path / "pids"
    _record_decoding_pids(monkeypatch, log)
    out = tmp_path / "latents"
    assert main([*_args(data, out, *flags), "--workers", "2"]) == 0
    decoders = set(log.read_text().split())
    assert len(decoders) == 2 and str(os.getpid()) not in decoders, decoders  # decoded in two other processes
    assert _contents(out) == reference  # the same files, the same members in the same order, the same counts


def test_default_workers_and_bad_settings_are_said_in_one_line(
    data: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert 1 <= cl.default_workers() <= 4
    for flags, message in [
        (("--workers", "-1"), "--workers: must be 0 (decode in this process) or more, got -1"),
        (("--workers", "two"), "--workers: must be a whole number, got 'two'"),
        (("--precision", "fp8"), "--precision: invalid choice: 'fp8'"),
    ]:
        with pytest.raises(SystemExit):
            main([*_args(data, tmp_path / "out", *flags)])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="--workers must be 0"):
        cache_latents(data["sd"], str(data["images"]), tmp_path / "out", workers=-2)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main([*_args(data, tmp_path / "out", "--device", "cuda")])
        assert "--device cuda: torch sees no CUDA GPU here; pass --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


class _Failure(Exception):
    pass


@pytest.mark.parametrize(("where", "workers"), [("encode", 0), ("encode", 2), ("decode", 2)])
def test_a_failed_run_leaves_whole_shards_only(
    data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, workers: int
) -> None:
    reference = _contents(_reference(data))
    out = tmp_path / "latents"
    seen: list[str] = []
    if where == "encode":  # in this process: the 4th batch's encode fails, shards 0 and 1 (2 workers) half written
        encode, calls = cl._encoded, []

        def failing(*args: Any) -> list[bytes]:
            calls.append(1)
            if len(calls) == 4:
                seen.extend(sorted(os.listdir(out)))  # the folder as a kill at this moment would leave it
                raise _Failure("encoder failed")
            return encode(*args)

        monkeypatch.setattr(cl, "_encoded", failing)
    else:  # in a worker: shard 2's 5th sample (after its first batch) fails with an error no skip catches
        decode = _ShardStream._decode

        def failing(self: _ShardStream, raw: dict[str, Any], rng: Any) -> dict[str, Any]:
            if raw["__key__"] == "s2_04":
                raise _Failure("decoder failed")
            return decode(self, raw, rng)

        monkeypatch.setattr(_ShardStream, "_decode", failing)
    with pytest.raises(Exception, match="encoder failed|decoder failed"):
        cache_latents(data["sd"], str(data["images"]), out, resolution=RES, batch_size=2, workers=workers)
    if where == "encode":  # a shard being written is under a temporary name only, so a kill leaves no half shard
        writing = [n for n in seen if n.startswith(".") and n.endswith(".tar.tmp")]
        assert writing and not {n[1:-len(".tmp")] for n in writing} & set(seen), seen
    left = _contents(out)
    # no temporary file, no cache.json: the marker of a cut-off cache (train.py refuses it), counts for --resume
    assert {n for n in left if not n.endswith(".tar")} == {"cache.incomplete.json"} | {f".{n}.counts.json" for n in left
                                                                                   if n.endswith(".tar")}, sorted(left)
    assert len([n for n in left if n.endswith(".tar")]) < len(SIZES) - 1, sorted(left)  # shards were being written
    for name, members in left.items():
        if name.endswith(".tar"):
            assert members == reference[name], name  # what is there is whole
    monkeypatch.undo()  # the run again, over the whole shards it left, completes the cache
    cache_latents(data["sd"], str(data["images"]), out, resolution=RES, batch_size=2, workers=workers, overwrite=True)
    assert _contents(out) == reference


def test_precision_is_recorded_bf16_is_close_to_fp32_and_fp32_is_as_before(
    data: dict[str, Any], tmp_path: Path
) -> None:
    fp32 = _contents(_reference(data))  # the default on the CPU
    assert fp32["cache.json"]["precision"] == "fp32" and fp32["cache.json"]["dtype"] == "fp32"
    assert main([*_args(data, tmp_path / "fp32", "--precision", "fp32", "--workers", "0")]) == 0
    assert _contents(tmp_path / "fp32") == fp32

    # fp32 as before this option: bit for bit the autoencoder's encode of the loader's batches, no autocast
    vae, _ = load_encoders(data["sd"])
    for shard in ("000000.tar", "000002.tar"):
        dm = WebDataModule(str(data["images"] / shard), batch_size=2, resolution=RES, shuffle_buffer=0)
        dm.setup("fit")
        loader = dm.train_dataloader()
        with torch.no_grad():
            expected = [torch.cat([(p := vae.encode(b["image"])).mean, p.logvar], dim=1) for b in loader]
        loader.close()
        stored = [np.load(io.BytesIO(v)) for n, v in fp32[shard] if n.endswith("moments.npy")]
        assert torch.equal(torch.from_numpy(np.stack(stored)), torch.cat(expected))

    for precision in ("bf16", "fp16"):
        out = tmp_path / precision
        assert main([*_args(data, out, "--precision", precision, "--workers", "0")]) == 0
        low = _contents(out)
        settings = {**fp32["cache.json"]["settings"], "precision": precision}  # what a --resume compares
        assert low["cache.json"] == {**fp32["cache.json"], "precision": precision, "settings": settings}
        for shard in fp32:
            if not shard.endswith(".tar"):
                continue
            assert [n for n, _ in low[shard]] == [n for n, _ in fp32[shard]]  # the same samples
            for (name, a), (_, b) in zip(low[shard], fp32[shard], strict=True):
                if name.endswith(".npy"):
                    ours, theirs = np.load(io.BytesIO(a)), np.load(io.BytesIO(b))
                    assert ours.dtype == np.float32  # --dtype stores them: float32 moments from any precision
                    scale = float(np.abs(theirs).max())
                    assert np.abs(ours - theirs).max() <= 0.05 * scale, (precision, name)
        differs = [a != b for s in fp32 if s.endswith(".tar") for (_, a), (_, b) in zip(low[s], fp32[s], strict=True)]
        assert any(differs), f"{precision} wrote fp32's bytes: autocast did not run"


def _rank(rank: int, port: int, argv: list[str], result: str) -> None:
    """One of two ranks, started as torchrun starts it: its place in the environment, then the tool's main."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    Path(f"{result}{rank}").write_text(str(main(argv)))


def test_two_ranks_write_what_one_process_writes(data: dict[str, Any], tmp_path: Path) -> None:
    """Two ranks forked from this process (no second import of torch, so seconds), gloo on the CPU."""
    flags = ("--flip", "--text")
    reference = _contents(_reference(data, *flags))
    out = tmp_path / "latents"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_rank, args=(port, _args(data, out, *flags), str(tmp_path / "rc")),
                                          nprocs=2, start_method="fork")
    assert [(tmp_path / f"rc{r}").read_text() for r in range(2)] == ["0", "0"]
    # the same shards, members and order; cache.json's counts are both ranks' (each rank's alone, or each rank
    # reading every shard, would give other totals)
    assert _contents(out) == reference


@pytest.mark.slow
def test_two_ranks_under_torchrun_write_what_one_process_writes(data: dict[str, Any], tmp_path: Path) -> None:
    """The documented command (about 20 s on 2 busy cores: three processes import torch, two Lightning)."""
    flags = ("--flip", "--text")
    reference = _contents(_reference(data, *flags))
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "ldm.data.cache_latents", *_args(data, out, *flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "cached 10 samples from 5 shard(s)" in result.stdout and "on 2 processes" in result.stdout, result.stdout
    assert result.stdout.count("cached ") == 1  # said once, by rank 0
    assert _contents(out) == reference
