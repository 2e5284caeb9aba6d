"""Input pipeline throughput: images/s per DataLoader worker, raw shards and cached latents, beside a bare
decode-and-resize loop over the same files (issue 10, item 5).

    python benchmarks/data_throughput.py                         # 512 and 256 px, 1 and 2 workers
    python benchmarks/data_throughput.py --sizes 256 --images 64 --workers 1   # a quick look

The shards hold photograph-sized JPEGs (`--source` px on the long side, 4:3, smooth colour fields with
noise: JPEG sizes like photographs', not like flat synthetic shapes) written once to a temporary folder;
cached-latent shards hold float16 moments of the matching latent size (plain and mirrored), as
`ldm-cache-latents --dtype fp16 --flip` writes them. Rows:

- `bare PIL`: one process, each JPEG decoded with PIL and cover-resized and centre-cropped to the size by
  the project's own transform (`plan_crop`/`apply_crop`): what a worker cannot go faster than with PIL.
- `bare PIL draft`: the same with `Image.draft` (libjpeg decodes at 1/2, 1/4 or 1/8 scale straight from
  the DCT when the picture is at least twice the target): how much a reduced-size decode would win.
- `bare torchvision.io`: torchvision's libjpeg-turbo `decode_jpeg` and an antialiased tensor resize.
- `loader raw`: WebDataModule's training loader (tar reading, shuffle buffer, decode, crop, flip,
  collation) with N workers; images/s per worker and its share of `bare PIL` per core.
- `loader raw (pil_draft)`, `loader raw (torchvision)`: the same loader with `data.decoder=pil_draft` or
  `data.decoder=torchvision` (the latter only where torchvision is installed).
- `loader cached`: the same loader over cached-latent shards (no image decode at all).

The issue's target: the loader delivers at least 90% of the bare decode-and-resize rate per core.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.data.transforms import apply_crop, plan_crop, to_tensor
from ldm.data.webdataset import MOMENTS_FLIP_KEY, MOMENTS_KEY, WebDataModule


def photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG of a smooth random colour field with grain, at quality 90."""
    coarse = rng.random((height // 32 + 2, width // 32 + 2, 3)).astype(np.float32)
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    grain = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(field + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, images: int, source: int, per_shard: int) -> tuple[list[Path], list[bytes]]:
    rng = np.random.default_rng(0)
    jpegs = [photo_like(rng, source, source * 3 // 4) for _ in range(images)]
    paths = []
    for start in range(0, images, per_shard):
        path = folder / f"raw-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, images)):
                _add(tar, f"{i:08d}.jpg", jpegs[i])
                _add(tar, f"{i:08d}.txt", f"picture {i}".encode())
        paths.append(path)
    return paths, jpegs


def write_latent_shards(folder: Path, images: int, size: int, per_shard: int) -> list[Path]:
    rng = np.random.default_rng(1)
    paths = []
    for start in range(0, images, per_shard):
        path = folder / f"latents{size}-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, images)):
                for key in (MOMENTS_KEY, MOMENTS_FLIP_KEY):  # the loader flips: as `ldm-cache-latents --flip` writes
                    buffer = io.BytesIO()
                    np.save(buffer, rng.standard_normal((8, size // 8, size // 8)).astype(np.float16))
                    _add(tar, f"{i:08d}.{key}", buffer.getvalue())
                _add(tar, f"{i:08d}.txt", f"picture {i}".encode())
        paths.append(path)
    return paths


def bare_pil(jpegs: list[bytes], size: int, draft: bool) -> float:
    rng = __import__("random").Random(0)
    start = time.perf_counter()
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            if draft:
                image.draft("RGB", (size, size))  # the smallest DCT scale still >= size on both sides
            rgb = image.convert("RGB")
        to_tensor(apply_crop(rgb, plan_crop(rgb.size, size, False, True, rng)))
    return len(jpegs) / (time.perf_counter() - start)


def bare_torchvision(jpegs: list[bytes], size: int) -> float | None:
    try:
        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2 import functional as F
    except ImportError:
        return None
    start = time.perf_counter()
    for data in jpegs:
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        height, width = image.shape[1:]
        scale = size / min(height, width)
        resized = F.resize(image, [round(height * scale), round(width * scale)], antialias=True)
        F.center_crop(resized, [size, size]).float().div(127.5).sub(1)
    return len(jpegs) / (time.perf_counter() - start)


def loader_rate(shards: list[Path], size: int, workers: int, batch: int, latents: bool, decoder: str = "pil") -> float:
    dm = WebDataModule([str(p) for p in shards], batch_size=batch, num_workers=workers, resolution=size,
                       random_flip=True, shuffle_buffer=100, latents=latents, decoder=decoder)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen, start = 0, None
    for i, item in enumerate(loader):  # the first batch waits for the workers to start: not timed
        if i == 0:
            start = time.perf_counter()
            continue
        seen += len(item["caption"])
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    return seen / elapsed if seen else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=256, help="pictures in the shards (each size reads them all)")
    parser.add_argument("--source", type=int, default=800, help="the pictures' long side in px (4:3)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per row: the per-worker figures compare with the bare loop's
    print(f"# {args.images} JPEGs of {args.source}x{args.source * 3 // 4}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards, jpegs = write_shards(folder, args.images, args.source, per_shard=64)
        mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
        print(f"# mean JPEG size {mean_kb:.0f} KiB")
        for size in args.sizes:
            base = bare_pil(jpegs, size, draft=False)
            rows.append(("bare PIL", size, 1, base, base, 1.0))
            rate = bare_pil(jpegs, size, draft=True)
            rows.append(("bare PIL draft", size, 1, rate, rate, rate / base))
            tv = bare_torchvision(jpegs, size)
            if tv is not None:
                rows.append(("bare torchvision.io", size, 1, tv, tv, tv / base))
            for decoder in ("pil", "pil_draft") + (("torchvision",) if tv is not None else ()):
                name = "loader raw" if decoder == "pil" else f"loader raw ({decoder})"
                for workers in args.workers:
                    rate = loader_rate(shards, size, workers, args.batch, latents=False, decoder=decoder)
                    per = rate / max(workers, 1)  # 0 workers: the main process reads
                    rows.append((name, size, workers, rate, per, per / base))
            cached = write_latent_shards(folder, args.images, size, per_shard=64)
            for workers in args.workers:
                rate = loader_rate(cached, size, workers, args.batch, latents=True)
                per = rate / max(workers, 1)
                rows.append(("loader cached", size, workers, rate, per, per / base))
    print(f"{'path':<26} {'px':>5} {'workers':>7} {'images/s':>10} {'per worker':>11} {'vs bare PIL':>12}")
    for name, size, workers, rate, per, ratio in rows:
        print(f"{name:<26} {size:>5} {workers:>7} {rate:>10.1f} {per:>11.1f} {ratio:>11.2f}x")


if __name__ == "__main__":
    main()
