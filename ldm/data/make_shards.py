"""Pack image-caption pairs into WebDataset tar shards.

    python -m ldm.data.make_shards photos/ data/shards --samples-per-shard 1000   # or: ldm-shards ...

SRC is either a folder of images (jpg/jpeg/png/webp, bmp/gif/tif/tiff/ppm; searched recursively) each with a `.txt`
caption beside it (same stem), or a `.csv` (header `path,caption`) / `.jsonl` (`{"path": ...,
"caption": ...}` per line) whose paths are relative to that file's folder. Image bytes are stored
as they are (no re-encoding) under their own extension, the caption as `.txt` (or `--caption-key`).
Each shard is written under a temporary name and renamed when complete, so a crash never leaves a
truncated `shards-*.tar` behind; Ctrl-C, SIGTERM or SIGHUP stop it with one line, the shard being written
removed and the whole ones kept (a kill's leftover is removed by the next run). Pairs that cannot be used are
skipped and counted by reason.

Image conditioning travels in the same sample. In a folder, `NAME.cond.<ext>` beside `NAME.<ext>` is
its conditioning image (e.g. InstructPix2Pix's "before" picture), stored as `cond.<ext>`, and
`NAME.seg.png` its segmentation map (a single-channel PNG of class indices), stored as `seg.png`; these
are sidecars, not samples of their own (unless no `NAME.<ext>` exists). A CSV/JSONL gives them in
optional `cond_path` / `seg_path` columns/fields (empty: none). A sample without sidecars is written
without them; one whose sidecar is listed but missing, of another type or undecodable is skipped.
Read them with `WebDataModule(cond_image_key="cond.png", seg_key="seg.png")`: the report lists the
keys written, and a folder is best kept to one conditioning format, as the loader reads one key.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import webdataset as wds
from PIL import Image

from ldm.data.transforms import decode_label_map, decode_text, exif_orientation, open_picture, upright_size

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")  # what the loader reads (IMAGE_KEYS)
SHARD_PREFIX = "shards"
COND_SIDECAR, SEG_SIDECAR = "cond", "seg"  # NAME.cond.<ext>, NAME.seg.png
# what reading a seg map may raise; a picture's check catches any Exception (PIL's plugins raise struct.error,
# EOFError, IndexError... on malformed files): the pair is skipped, ldm-shards goes on
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ShardSink:
    """Writes samples into numbered tar shards `{prefix}-000000.tar`, ... of `samples_per_shard` each.

    A shard only gets its final name once it is complete; on an exception the partial one is
    deleted. Samples are dicts of `__key__` and extension -> bytes.
    """

    def __init__(self, out_dir: str | Path, prefix: str, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[str] = []
        self._writer: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._count = 0

    def write(self, sample: dict[str, str | bytes]) -> None:
        if self._writer is None:
            self._open_next()
        assert self._writer is not None
        self._writer.write(sample)
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish_current()

    def _open_next(self) -> None:
        final = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp_path = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        self._writer = wds.TarWriter(str(self._tmp_path), encoder=False)
        self._count = 0

    def _finish_current(self) -> None:
        assert self._writer is not None and self._tmp_path is not None
        self._writer.close()
        final = self._tmp_path.with_name(self._tmp_path.name.rsplit(".tmp-", 1)[0])
        os.replace(self._tmp_path, final)
        self.shards.append(str(final))
        self._writer, self._tmp_path = None, None

    def close(self) -> list[str]:
        """Finish the last (possibly short) shard; returns all shard paths in order."""
        if self._writer is not None:
            self._finish_current()
        return self.shards

    def abort(self) -> None:
        if self._writer is not None and self._tmp_path is not None:
            self._writer.close()
            self._tmp_path.unlink(missing_ok=True)
            self._writer, self._tmp_path = None, None

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class ShardSummary:
    """What `make_shards` did: samples written, shard paths, skipped pairs counted by reason."""

    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    sidecars: Counter[str] = field(default_factory=Counter)  # e.g. "cond.png" -> samples holding one

    def report(self) -> str:
        lines = [f"wrote {self.written} samples in {len(self.shards)} shards"]
        if self.shards:
            lines.append(f"  shards: {_brace_pattern(self.shards)}")
        if self.sidecars:
            lines.append("  with " + ", ".join(f"{key}: {n}" for key, n in sorted(self.sidecars.items())))
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            lines.append(f"skipped {sum(self.skipped.values())} ({reasons})")
        else:
            lines.append("skipped 0")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Pair:
    image_path: Path
    caption: str | None
    cond_path: Path | None = None
    seg_path: Path | None = None
    unusable: str | None = None  # why the pair is skipped, when known as it is listed ("unreadable caption")


class _Unusable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _brace_pattern(shards: Sequence[str]) -> str:
    """The spec to paste into `data.train_shards`, e.g. `out/shards-{000000..000003}.tar`."""
    if len(shards) == 1:
        return shards[0]
    first, last = Path(shards[0]), Path(shards[-1])
    start, end = first.stem.rsplit("-", 1)[1], last.stem.rsplit("-", 1)[1]
    return str(first.parent / f"{SHARD_PREFIX}-{{{start}..{end}}}.tar")


def _read_caption(path: Path) -> str | None:
    """The caption file's text, stripped (None: no file, or only whitespace); _Unusable("unreadable caption")
    for one that is not UTF-8 (or UTF-16 with a byte-order mark: transforms.decode_text)."""
    if not path.is_file():
        return None
    try:
        return decode_text(path.read_bytes()).strip() or None
    except UnicodeDecodeError as exc:
        raise _Unusable("unreadable caption") from exc


def _sidecar_of(path: Path, stems: set[Path]) -> tuple[Path, str] | None:
    """(stem of the image it belongs to, role) if `path` is `NAME.cond.<ext>` or `NAME.seg.png` of an image."""
    owner, _, role = path.stem.rpartition(".")
    role = role.lower()
    is_role = role == COND_SIDECAR or (role == SEG_SIDECAR and path.suffix.lower() == ".png")
    if owner and is_role and path.parent / owner in stems:
        return path.parent / owner, role
    return None


def _pairs_from_folder(src: Path) -> Iterator[_Pair]:
    files = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    stems = {p.with_suffix("") for p in files}
    sidecars: dict[tuple[Path, str], Path] = {}
    images = []
    for path in files:
        sidecar = _sidecar_of(path, stems)
        if sidecar is None:
            images.append(path)
        else:
            sidecars.setdefault(sidecar, path)  # of several formats, the first in sorted order
    for image in images:
        stem = image.with_suffix("")
        caption, unusable = None, None
        try:
            caption = _read_caption(image.with_suffix(".txt"))
        except _Unusable as exc:
            unusable = exc.reason  # counted where the pair would be written
        yield _Pair(image, caption, sidecars.get((stem, COND_SIDECAR)), sidecars.get((stem, SEG_SIDECAR)), unusable)


def _rows_from_csv(src: Path) -> Iterator[dict[str, str]]:
    with src.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ValueError(
                f"{src}: needs a header row with columns path,caption; found {reader.fieldnames}"
            )
        yield from reader


def _rows_from_jsonl(src: Path) -> Iterator[dict[str, str]]:
    with src.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{src}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or "path" not in row:
                raise ValueError(f'{src}:{number}: expected an object with "path" and "caption"')
            yield row


def _pairs_from_table(src: Path) -> Iterator[_Pair]:
    rows = _rows_from_csv(src) if src.suffix.lower() == ".csv" else _rows_from_jsonl(src)
    for row in rows:
        caption = row.get("caption")
        caption = caption.strip() if isinstance(caption, str) else None
        cond, seg = (row.get(column) for column in ("cond_path", "seg_path"))
        yield _Pair(
            src.parent / (row.get("path") or ""),
            caption or None,
            src.parent / str(cond) if cond else None,
            src.parent / str(seg) if seg else None,
        )


def iter_pairs(src: str | Path) -> Iterator[_Pair]:
    """Image paths and captions (None when missing) from a folder, CSV or JSONL file.

    Fails before yielding anything when `src` is missing, of an unknown type, or lists no images.
    """
    src = Path(src)
    if src.is_dir():
        pairs = _pairs_from_folder(src)
        empty = f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {src}"
    elif not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    elif src.suffix.lower() in (".csv", ".jsonl"):
        pairs = _pairs_from_table(src)
        empty = f"{src} lists no images"
    else:
        raise ValueError(
            f"source {src}: unknown type {src.suffix!r}; give a folder of images, a .csv or a .jsonl file"
        )
    first = next(pairs, None)
    if first is None:
        raise ValueError(empty)
    return itertools.chain([first], pairs)


def _read_file(path: Path, kind: str, extensions: Sequence[str]) -> tuple[bytes, str]:
    """(bytes, lower-case extension) of a file of one of `extensions`, or _Unusable naming why not."""
    extension = path.suffix.lower().lstrip(".")
    if extension not in extensions:
        raise _Unusable(f"unsupported {kind} type")
    if not path.is_file():
        raise _Unusable(f"missing {kind}")
    return path.read_bytes(), extension


def _decoded_size(data: bytes) -> tuple[int, int]:
    """The picture's upright size (EXIF orientation), once decoded whole, as the loader reads it (a picture
    type and size transforms.open_picture takes)."""
    with open_picture(data) as image:
        image.load()  # a full decode is the only reliable test for truncated files
        return upright_size(image.size, exif_orientation(image))


def _image_entry(path: Path, min_size: int) -> dict[str, bytes]:
    data, extension = _read_file(path, "image", IMAGE_EXTENSIONS)
    try:
        size = _decoded_size(data)
    except Exception as exc:  # noqa: BLE001 - truncated, not a picture, a decompression bomb, a malformed file
        raise _Unusable("unreadable image") from exc
    if min(size) < min_size:
        raise _Unusable("too small")
    return {extension: data}


def _cond_entry(path: Path) -> dict[str, bytes]:
    data, extension = _read_file(path, "conditioning image", IMAGE_EXTENSIONS)
    try:
        _decoded_size(data)
    except Exception as exc:  # noqa: BLE001 - as for the image
        raise _Unusable("unreadable conditioning image") from exc
    return {f"{COND_SIDECAR}.{extension}": data}


def _seg_entry(path: Path) -> dict[str, bytes]:
    # PNG only: a lossy format would blur class indices into other classes
    data, _ = _read_file(path, "segmentation map", ("png",))
    try:
        decode_label_map(data)  # rejects colour maps too: the loader reads indices only
    except _DECODE_ERRORS as exc:
        raise _Unusable("unreadable segmentation map") from exc
    return {f"{SEG_SIDECAR}.png": data}


def _entries(pair: _Pair, min_size: int, caption_key: str) -> dict[str, bytes]:
    """A sample's extension -> bytes (without its key), or _Unusable with the reason to skip it."""
    if pair.unusable is not None:
        raise _Unusable(pair.unusable)
    if pair.caption is None:
        raise _Unusable("no caption")
    entries = {**_image_entry(pair.image_path, min_size), caption_key: pair.caption.encode()}
    if pair.cond_path is not None:
        entries.update(_cond_entry(pair.cond_path))
    if pair.seg_path is not None:
        entries.update(_seg_entry(pair.seg_path))
    return entries


def _leftovers(out_dir: Path) -> list[Path]:
    """Shards a killed ldm-shards left under their temporary name (`shards-NNNNNN.tar.tmp-PID`, the PID no
    longer running): never whole, never read by the loader."""
    found = []
    for path in out_dir.glob(f"{SHARD_PREFIX}-*.tar.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _running(int(pid)):
            found.append(path)
    return found


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


class _Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where the process is, so the shard being written is removed as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def _stopped(out: str, signum: int) -> int:
    """One line for a run stopped by a signal (the shard in progress already removed), and 128+N."""
    import signal

    whole = sorted(Path(out).glob(f"{SHARD_PREFIX}-*.tar")) if Path(out).is_dir() else []
    kept = f"the {len(whole)} whole shard(s) in {out} are kept" if whole else f"no whole shard was written in {out}"
    again = "run the same command again with --overwrite to pack the whole source" if whole else "run it again"
    print(f"ldm-shards: stopped by {signal.Signals(signum).name}: {kept}, the one being written was removed; {again}",
          file=sys.stderr)
    return 128 + signum


def make_shards(
    src: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    caption_key: str = "txt",
    min_size: int = 0,
    overwrite: bool = False,
) -> ShardSummary:
    """Write the usable pairs of `src` into `out_dir/shards-NNNNNN.tar`; see the module docstring."""
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if not re.fullmatch(r"[a-z0-9_]+", caption_key):
        raise ValueError(f"caption_key must be a plain extension like 'txt', got {caption_key!r}")
    out_dir = Path(out_dir)
    pairs = iter_pairs(src)
    existing = sorted(out_dir.glob(f"{SHARD_PREFIX}-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(existing)} shards; pass --overwrite to replace them"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in existing:
        old.unlink()
    for leftover in _leftovers(out_dir):
        leftover.unlink(missing_ok=True)
    summary = ShardSummary()
    with ShardSink(out_dir, SHARD_PREFIX, samples_per_shard) as sink:
        for pair in pairs:
            try:
                entries = _entries(pair, min_size, caption_key)
            except _Unusable as unusable:
                summary.skipped[unusable.reason] += 1
                continue
            sink.write({"__key__": f"{summary.written:09d}", **entries})
            summary.written += 1
            summary.sidecars.update(
                k for k in entries if k.startswith((f"{COND_SIDECAR}.", f"{SEG_SIDECAR}."))
            )
    summary.shards = sink.shards
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-shards", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "src",
        help="folder of images with .txt captions (and optional NAME.cond.<ext> / NAME.seg.png sidecars), "
        "or a .csv/.jsonl of path,caption (and optional cond_path, seg_path)",
    )
    parser.add_argument("out", help="output folder for shards-NNNNNN.tar")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--caption-key", default="txt", help="extension the caption is stored under")
    parser.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    args = parser.parse_args(argv)
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    stops = [signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else [])
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in stops} if main_thread else {}
    try:
        summary = make_shards(
            args.src, args.out, args.samples_per_shard, args.caption_key, args.min_size, args.overwrite
        )
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    except _Stopped as stop:
        return _stopped(args.out, stop.signum)
    except KeyboardInterrupt:
        return _stopped(args.out, signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(summary.report())
    if summary.written == 0:
        print("ldm-shards: error: no usable samples; nothing written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
