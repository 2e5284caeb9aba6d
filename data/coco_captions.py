"""COCO captions as a JSONL of `{"path", "caption"}` that `ldm-shards` packs, and a prompt list for evaluation.

    python data/coco_captions.py annotations/captions_val2017.json val2017/ coco/val2017.jsonl \
        --prompts coco/prompts.txt --one-per-image

ANNOTATIONS is COCO's `captions_*.json` ({"images": [{"id", "file_name"}], "annotations": [{"image_id",
"caption"}]}); IMAGES the folder of its pictures. Paths in the JSONL are relative to its own folder, as
ldm-shards reads them. `--one-per-image` keeps each picture's first caption (the usual FID/CLIP-score
set: 5000 pictures, 5000 prompts for val2017); without it every caption is a sample of its own.
`--limit N` keeps the first N pictures (by id). Pictures that are missing on disk are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def coco_pairs(annotations: Path, images: Path, one_per_image: bool, limit: int | None) -> tuple[list[tuple[Path, str]], int]:
    data = json.loads(annotations.read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    captions: dict[int, list[str]] = {}
    for ann in sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
        captions.setdefault(ann["image_id"], []).append(" ".join(ann["caption"].split()))
    pairs, missing = [], 0
    for image_id in sorted(captions)[:limit]:
        path = images / files[image_id]
        if not path.is_file():
            missing += 1
            continue
        for caption in captions[image_id][:1] if one_per_image else captions[image_id]:
            pairs.append((path, caption))
    return pairs, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("annotations", type=Path, help="COCO captions_*.json")
    parser.add_argument("images", type=Path, help="the folder of COCO pictures (e.g. val2017/)")
    parser.add_argument("out", type=Path, help="the JSONL to write (path,caption per line)")
    parser.add_argument("--prompts", type=Path, help="also write the captions, one per line (prompt_file=)")
    parser.add_argument("--one-per-image", action="store_true", help="each picture's first caption only")
    parser.add_argument("--limit", type=int, default=None, help="the first N pictures only")
    args = parser.parse_args(argv)
    for given, what in ((args.annotations, "annotations file"), (args.images, "images folder")):
        if not given.exists():
            print(f"coco_captions: error: {what} {given} does not exist", file=sys.stderr)
            return 2
    pairs, missing = coco_pairs(args.annotations, args.images, args.one_per_image, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for path, caption in pairs:
            rel = os.path.relpath(path.resolve(), args.out.parent.resolve())
            f.write(json.dumps({"path": rel, "caption": caption}, ensure_ascii=False) + "\n")
    if args.prompts:
        args.prompts.parent.mkdir(parents=True, exist_ok=True)
        args.prompts.write_text("".join(caption + "\n" for _, caption in pairs))
    print(f"wrote {len(pairs)} pairs to {args.out}" + (f"; {missing} pictures missing on disk, skipped" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
