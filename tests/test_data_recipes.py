"""data/README.md's commands, run as printed on small stand-ins for the user's files: a folder of
captioned photos, a CSV, and COCO's caption annotations with their pictures (one of them missing)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from test_readme import readme_commands

REPO = Path(__file__).resolve().parent.parent


def _photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


def _samples(folder: Path) -> dict[str, str]:
    """Caption by sample key, over every shard in `folder`."""
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    out[member.name[: -len(".txt")]] = tar.extractfile(member).read().decode()
    return out


def test_data_readme_commands_run_as_printed(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "data").symlink_to(REPO / "data")
    for i in range(3):
        _photo(tmp_path / "photos" / "sub" / f"p{i}.jpg", i)
        (tmp_path / "photos" / "sub" / f"p{i}.txt").write_text(f"a photo, number {i}")
    (tmp_path / "pics").mkdir()
    rows = ["path,caption"]
    for i in range(2):
        _photo(tmp_path / "pics" / f"c{i}.png", 10 + i)
        rows.append(f'pics/c{i}.png,"a picture, with a comma {i}"')
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    images = [{"id": 7, "file_name": "000007.jpg"}, {"id": 3, "file_name": "000003.jpg"}, {"id": 9, "file_name": "gone.jpg"}]
    annotations = [
        {"id": 1, "image_id": 7, "caption": "A dog  on a\\nbeach."},
        {"id": 2, "image_id": 3, "caption": "Two cats sleeping."},
        {"id": 3, "image_id": 3, "caption": "Cats on a sofa."},
        {"id": 4, "image_id": 9, "caption": "A missing picture."},
    ]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    for image in images[:2]:
        _photo(tmp_path / "val2017" / image["file_name"], image["id"])

    commands = readme_commands(REPO / "data" / "README.md")
    assert len(commands) >= 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for number, command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"data/README.md:{number}: {command}\n{result.stderr[-2000:]}"

    assert sorted(_samples(tmp_path / "shards").values()) == [f"a photo, number {i}" for i in range(3)]
    assert sorted(_samples(tmp_path / "csv-shards").values()) == [f"a picture, with a comma {i}" for i in range(2)]
    # COCO: first caption per picture, by id; the missing picture skipped
    assert (tmp_path / "coco" / "prompts.txt").read_text().splitlines() == ["Two cats sleeping.", "A dog on a\\nbeach."]
    assert sorted(_samples(tmp_path / "coco" / "shards").values()) == ["A dog on a\\nbeach.", "Two cats sleeping."]
