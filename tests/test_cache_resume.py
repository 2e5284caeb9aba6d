"""ldm-cache-latents cut off (SIGKILL, SIGTERM, a failure) and run again with --resume: the whole shards it left
are kept, the missing ones encoded, and the folder ends as an uninterrupted run leaves it (the same shards, member
for member, cache.json counting every shard); a --resume with other settings is refused in one line naming them;
a --resume of a cache that had finished has nothing to do, and says so;
a cut-off cache is marked (cache.incomplete.json), so read_cache_info (train.py's check) refuses it, and a run
without --resume or --overwrite says how to finish it. Two ranks resume as one process does. The demo's shard
writer removes the shapes-*.tar.tmp-PID files a killed run left.

Real processes are killed where they would be (a shard whole, the next being written); tiny random models at 16 px."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_sd_file
from test_cache_workers import FLAGS, SIZES, _contents, _write_shards
from test_train import _one_thread  # noqa: F401 (autouse fixture: one thread)

from ldm.data import cache_latents as cl
from ldm.data.cache_latents import cache_latents, main
from ldm.data.synthetic import write_shapes_shards
from ldm.data.webdataset import CACHE_INCOMPLETE, CACHE_INFO, expand_shard_specs, read_cache_info

REPO = Path(__file__).resolve().parent.parent
EXTRA = ("--flip", "--text")  # the settings of every run here, unless a test changes one
# the tool, slowed where a kill is to land: once a shard is whole, the next one's first sample written, it waits
SLOW = """
import sys, time
from ldm.data import cache_latents as cl
write, commit, done = cl._ShardWriter.write, cl._ShardWriter.commit, []
def committed(self, *args, **kwargs):
    done.append(self.path.name)
    return commit(self, *args, **kwargs)
def slowed(self, sample):
    write(self, sample)
    if done:
        print("waiting", flush=True)
        time.sleep(300)
cl._ShardWriter.write, cl._ShardWriter.commit = slowed, committed
sys.exit(cl.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The checkpoint, the image shards, and the folder an uninterrupted run writes."""
    root = tmp_path_factory.mktemp("cache_resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sd = tiny_sd_file(root / "sd.safetensors", seed=0)
        data = {"root": root, "sd": sd, "images": _write_shards(root / "images")}
        data["reference"] = root / "reference"
        assert main([*_args(data, data["reference"]), "--workers", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    return data


def _args(data: dict[str, Any], out: Path, *flags: str, extra: tuple[str, ...] = EXTRA) -> list[str]:
    return [str(data["sd"]), str(data["images"]), str(out), *FLAGS, *extra, *flags]


def _stopped_process(data: dict[str, Any], tmp_path: Path, out: Path, signum: int) -> subprocess.CompletedProcess[str]:
    """The tool in its own process, sent `signum` once shard 000000 is whole and 000001 is being written."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, str(script), *_args(data, out, "--workers", "0")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "waiting": in shard 000001, after its first sample
        assert line.strip() == "waiting", (line, process.stderr.read() if process.poll() is not None else "")
        assert (out / "000000.tar").is_file() and (out / ".000001.tar.tmp").is_file(), sorted(os.listdir(out))
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, line + stdout, stderr)


def _inode(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_a_killed_run_resumes_to_what_an_uninterrupted_run_writes(
    data: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _contents(data["reference"])
    out = tmp_path / "latents"
    killed = _stopped_process(data, tmp_path, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    left = sorted(os.listdir(out))
    # a whole shard, the next one under its temporary name, the marker with the settings, no cache.json
    assert "000000.tar" in left and ".000001.tar.tmp" in left and CACHE_INCOMPLETE in left, left
    assert CACHE_INFO not in left and "000001.tar" not in left, left
    assert _contents(out)["000000.tar"] == reference["000000.tar"]  # what is visible is whole
    marker = json.loads((out / CACHE_INCOMPLETE).read_text())
    assert marker["settings"]["flip"] is True and marker["settings"]["resolution"] == 16, marker

    # training on it is refused (train.py's check_cached_latents reads cache.json through read_cache_info)
    with pytest.raises(ValueError, match="cut off.*run the same ldm-cache-latents command again with --resume"):
        read_cache_info(expand_shard_specs(str(out)))
    # a rerun without a flag says how to finish it
    with pytest.raises(SystemExit):
        main(_args(data, out))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage
    assert "was cut off" in err and "pass --resume" in err and "--overwrite" in err, err
    # other settings are refused, in one line naming them, before anything is touched
    for flags, extra, named in [
        ((), ("--text",), "--flip off (the cut-off run: on)"),
        (("--resolution", "24"), EXTRA, "--resolution 24 (the cut-off run: 16)"),
        (("--dtype", "fp16"), EXTRA, "--dtype fp16 (the cut-off run: fp32)"),
        (("--buckets", "--bucket-step", "8"), EXTRA, "--buckets/--bucket-step/--bucket-max-ratio"),
    ]:
        with pytest.raises(SystemExit):
            main([*_args(data, out, *flags, "--resume", extra=extra)])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after argparse's usage: one line, naming what differs
        assert last.startswith("ldm-cache-latents: error: --resume: ") and named in last, err
    assert sorted(os.listdir(out)) == left
    other = tiny_sd_file(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(SystemExit):
        main([str(other), *_args(data, out, "--resume")[1:]])
    assert "the autoencoder (checkpoint) differs from the cut-off run's" in capsys.readouterr().err

    kept = _inode(out / "000000.tar")
    written: list[str] = []
    writer = cl._ShardWriter.__init__

    def recorded(self: cl._ShardWriter, path: Path) -> None:
        written.append(path.name)
        writer(self, path)

    monkeypatch.setattr(cl._ShardWriter, "__init__", recorded)
    assert main([*_args(data, out, "--resume", "--workers", "0")]) == 0
    assert "cached 10 samples from 5 shard(s)" in capsys.readouterr().out
    assert written == [f"{s:06d}.tar" for s in range(1, len(SIZES))]  # the missing shards only
    assert _inode(out / "000000.tar") == kept  # the whole one kept as it was
    assert _contents(out) == reference  # no temporary file, no marker, no counts: what an uninterrupted run leaves
    assert read_cache_info(expand_shard_specs(str(out)))["samples"] == 10


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_removes_the_shard_in_flight_says_so_in_one_line_and_resumes(
    data: dict[str, Any], tmp_path: Path, signum: signal.Signals
) -> None:
    out = tmp_path / "latents"
    stopped = _stopped_process(data, tmp_path, out, signum)
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith(f"ldm-cache-latents: stopped by {signum.name}"), stopped.stderr
    assert "--resume" in stopped.stderr
    left = sorted(os.listdir(out))
    assert "000000.tar" in left and CACHE_INCOMPLETE in left and not [n for n in left if n.endswith(".tmp")], left
    assert main([*_args(data, out, "--resume")]) == 0
    assert _contents(out) == _contents(data["reference"])


def test_a_failed_run_and_a_kills_leftovers_are_cleaned_by_resume_or_overwrite(
    data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The folder a failure leaves (as a kill would: the marker, whole shards with their counts), plus what a SIGKILL
    leaves besides (a shard under its temporary name, atomic_write's temporary names), resumed or overwritten."""
    reference = _contents(data["reference"])
    for how in ("--resume", "--overwrite"):
        out = tmp_path / how.strip("-")
        def failing(*args: Any, encode: Any = cl._encoded, calls: list[int] = []) -> list[bytes]:  # noqa: B006
            calls.append(1)
            if len(calls) == 7:  # flip: two a batch; shards 0 and 1 whole, 2 not
                raise RuntimeError("cut off")
            return encode(*args)

        monkeypatch.setattr(cl, "_encoded", failing)
        with pytest.raises(RuntimeError, match="cut off"):
            cache_latents(data["sd"], str(data["images"]), out, resolution=16, batch_size=2, flip=True, text=True)
        monkeypatch.undo()
        left = sorted(os.listdir(out))
        assert {"000000.tar", "000001.tar", CACHE_INCOMPLETE} <= set(left) and "000002.tar" not in left, left
        for name in (".000003.tar.tmp", ".cache.abc123.json", "..000001.tar.counts.abc123.json"):
            (out / name).write_bytes(b"half")
        assert main([*_args(data, out, how)]) == 0
        assert _contents(out) == reference, how

    # --resume of a fresh folder is a first run; of a finished cache with the same settings, nothing to do (the
    # shards untouched); with other settings, or of an older version's cache (no settings recorded), refused
    out = tmp_path / "fresh"
    assert main([*_args(data, out, "--resume")]) == 0
    assert _contents(out) == reference
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main([*_args(data, out, "--resume")]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps and _contents(out) == reference
    with pytest.raises(SystemExit):
        main([a for a in _args(data, out, "--resume") if a != "--flip"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "finished cache, made with other settings" in err and "--flip" in err and "--overwrite" in err, err
    info = json.loads((out / CACHE_INFO).read_text())
    del info["settings"]
    (out / CACHE_INFO).write_text(json.dumps(info))
    with pytest.raises(SystemExit):
        main([*_args(data, out, "--resume")])
    assert f"no {CACHE_INCOMPLETE}" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        main([*_args(data, out, "--resume", "--overwrite")])
    assert "pass one" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):  # a finished cache, run again without a flag: --overwrite only, as before
        main(_args(data, out))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage
    assert "pass --overwrite" in err and "--resume" not in err, err


def _rank(rank: int, port: int, argv: list[str], result: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    Path(f"{result}{rank}").write_text(str(main(argv)))


def test_two_ranks_resume_what_one_process_left(data: dict[str, Any], tmp_path: Path) -> None:
    """A single process cut off after shard 1, resumed by two ranks (each its shards r::2, the missing ones only),
    rank 0 counting every shard in cache.json."""
    reference = _contents(data["reference"])
    out = tmp_path / "latents"
    killed = _stopped_process(data, tmp_path, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_rank, args=(port, _args(data, out, "--resume", "--workers", "0"),
                                                       str(tmp_path / "rc")), nprocs=2, start_method="fork")
    assert [(tmp_path / f"rc{r}").read_text() for r in range(2)] == ["0", "0"]
    assert _contents(out) == reference


def test_the_demo_shard_writer_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    out.mkdir()
    leftovers = ["shapes-000000.tar.tmp-12345", "shapes-000003.tar.tmp-999", "MANIFEST.json.tmp-12345"]
    for name in leftovers:
        (out / name).write_bytes(b"half")
    (out / "notes.txt").write_text("not ours")
    shards = write_shapes_shards(out, num_samples=4, samples_per_shard=2, resolution=8)
    assert sorted(os.listdir(out)) == sorted(["MANIFEST.json", "notes.txt", *(Path(s).name for s in shards)])


def test_train_refuses_a_cut_off_cache_in_one_line(
    data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.py's check_cached_latents turns read_cache_info's ValueError into its one-line ConfigError."""
    from types import SimpleNamespace

    from ldm.cli.train import ConfigError, check_cached_latents

    out = tmp_path / "latents"

    def failing(*args: Any, encode: Any = cl._encoded, calls: list[int] = []) -> list[bytes]:  # noqa: B006
        calls.append(1)
        if len(calls) == 3:  # shard 0 whole (two batches), shard 1 not
            raise RuntimeError("cut off")
        return encode(*args)

    monkeypatch.setattr(cl, "_encoded", failing)
    with pytest.raises(RuntimeError, match="cut off"):
        cache_latents(data["sd"], str(data["images"]), out, resolution=16, batch_size=2)
    assert (out / CACHE_INCOMPLETE).is_file() and not (out / CACHE_INFO).exists()
    datamodule = SimpleNamespace(latents=True, random_crop=False, train_shards=str(out))
    with pytest.raises(ConfigError, match="cut off.*with --resume"):
        check_cached_latents(datamodule, SimpleNamespace(first_stage_model=None))
