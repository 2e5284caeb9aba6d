"""The layout of the design card: Hydra's config tree at the top (`conf/`), the same files the wheel ships
inside the package (`ldm/conf/`), so a clone and an installed `ldm-train` read one config."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_top_level_conf_is_the_package_config_tree() -> None:
    conf = REPO / "conf"
    assert conf.is_dir() and conf.resolve() == (REPO / "ldm" / "conf").resolve()
    assert (conf / "train.yaml").is_file() and (conf / "experiment" / "demo.yaml").is_file()


def test_the_wheel_ships_every_config(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    top = {".venv", ".git", "outputs", "data", "build", "tests", "benchmarks", ".pytest_cache", ".ruff_cache"}

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if (Path(folder) == REPO and n in top) or n == "__pycache__" or n.endswith(".egg-info")]

    shutil.copytree(REPO, source, symlinks=True, ignore=ignore)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ldm-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("ldm/conf/") and n.endswith(".yaml")}
    expected = {f"ldm/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert expected and shipped == expected
