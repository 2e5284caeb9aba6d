"""hydra/launcher=slurm end to end: submitit writes the sbatch script from our launcher config, SLURM
starts one task per device, and Lightning takes the ranks from SLURM's environment.

Without SLURM on the machine, tests/fake_slurm.py stands in for sbatch/srun/sacct; with
LDM_REAL_SLURM=1 the same test submits to the real commands (e.g. a one-node slurm-wlm cluster).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

import ldm.cli.train  # noqa: F401  (registers the resolvers the launcher config uses)

REPO = Path(__file__).resolve().parent.parent


def slurm_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if os.environ.get("LDM_REAL_SLURM"):
        return env
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("sbatch", "srun", "sacct", "scancel"):
        wrapper = bin_dir / command
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {REPO / "tests" / "fake_slurm.py"} {command} "$@"\n')
        wrapper.chmod(0o755)
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "FAKE_SLURM_STATE": str(tmp_path / "slurm")}


def test_slurm_launcher_runs_one_rank_per_task(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "hydra/launcher=slurm",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=null",
        "hydra.launcher.timeout_min=20",
        f"paths.root={tmp_path}/runs",
        f"data.root={tmp_path}/data",
        "data.num_samples=32",
        "data.samples_per_shard=8",
        "data.batch_size=2",
        "+data.epoch_length=4",
        "callbacks.sample_images.steps=2",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=slurm_env(tmp_path), capture_output=True, text=True, timeout=600)
    (job,) = [p for p in tmp_path.glob("runs/default/multirun-*/.submitit/*") if p.is_dir()]
    logs = "".join(p.read_text() for p in sorted(job.glob("*_log.*")))
    assert result.returncode == 0, result.stderr[-3000:] + logs[-3000:]

    (script,) = job.glob("*_submission.sh")
    sbatch = script.read_text()
    # one task per device on one node, and a CPU job asks for no GPUs
    assert "#SBATCH --nodes=1" in sbatch and "#SBATCH --ntasks-per-node=2" in sbatch
    assert "gpus" not in sbatch and "srun" in sbatch
    # Lightning found both ranks in SLURM's environment (it started no processes of its own)
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in logs, logs[-3000:]
    (last,) = tmp_path.glob("runs/default/multirun-*/0/checkpoints/last.ckpt")
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3 and len(saved["noise_generators"]) == 2


def test_slurm_launcher_asks_for_the_trainer_shape() -> None:
    """trainer=multinode on SLURM: 4 nodes, one task and one GPU per device."""
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=multinode"], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
        cpu = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp_cpu"], return_hydra_config=True)
        assert (cpu.hydra.launcher.nodes, cpu.hydra.launcher.gpus_per_node) == (1, None)
