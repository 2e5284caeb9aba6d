"""A one-node stand-in for SLURM's `sbatch`, `srun` and `sacct`, enough for submitit on a machine without SLURM.

`sbatch SCRIPT` reads the `#SBATCH` lines, prints "Submitted batch job N" and runs the script in the
background; the script's `srun ... CMD` starts `--ntasks-per-node` copies of CMD. Each process gets
the environment a real one-node job has (the variables below were read off `srun` in slurm-wlm 22.05:
SLURM_JOB_ID, SLURM_NTASKS, SLURM_NTASKS_PER_NODE, SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID,
SLURM_NODELIST, ...), which is what submitit and Lightning's SLURMEnvironment read. `sacct` answers as
SLURM does with accounting disabled, so submitit watches its result files instead.

Used by tests/test_slurm.py through small wrappers on PATH: `python fake_slurm.py sbatch ARGS...`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_STATE", "/tmp/fake-slurm"))


def sbatch_options(script: Path) -> dict[str, str]:
    options = {}
    for line in script.read_text().splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(.*))?", line)
        if match:
            options[match.group(1)] = (match.group(2) or "").strip()
    return options


def job_env(job_id: int, options: dict[str, str]) -> dict[str, str]:
    nodes = int(options.get("nodes", "1"))
    if nodes != 1:
        raise SystemExit(f"sbatch: error: fake SLURM has one node, the job asks for --nodes={nodes}")
    per_node = options.get("ntasks-per-node", "1")
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOBID": str(job_id),
        "SLURM_JOB_NAME": options.get("job-name", Path(sys.argv[-1]).name),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": per_node,
        "SLURM_NPROCS": per_node,
        "SLURM_NTASKS_PER_NODE": per_node,
        "SLURM_TASKS_PER_NODE": per_node,
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_SUBMIT_DIR": os.getcwd(),
    }


def sbatch(args: list[str]) -> int:
    script = Path(args[-1])
    options = sbatch_options(script)
    STATE.mkdir(parents=True, exist_ok=True)
    counter = STATE / "last_job_id"
    job_id = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(job_id))
    (STATE / f"{job_id}.options").write_text(repr(options))
    env = {**os.environ, **job_env(job_id, options)}
    out = options.get("output", f"slurm-{job_id}.out").replace("%j", str(job_id))
    err = options.get("error", out).replace("%j", str(job_id))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as stdout, open(err, "a") as stderr:
        subprocess.Popen(["bash", str(script)], env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    print(f"Submitted batch job {job_id}")
    return 0


def srun(args: list[str]) -> int:
    output = error = None
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            value = args.pop(0)
            output, error = (value, error) if flag == "--output" else (output, value)
    ntasks = int(os.environ["SLURM_NTASKS_PER_NODE"])
    job_id = os.environ["SLURM_JOB_ID"]
    procs = []
    for task in range(ntasks):
        env = {**os.environ, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_STEP_ID": "0"}
        files = [
            open(p.replace("%j", job_id).replace("%t", str(task)), "a") if p else None for p in (output, error)
        ]
        procs.append((subprocess.Popen(args, env=env, stdout=files[0], stderr=files[1]), files))
    codes = []
    for proc, files in procs:
        codes.append(proc.wait())
        for f in files:
            if f:
                f.close()
    return max(codes)


def sacct(args: list[str]) -> int:
    print("Slurm accounting storage is disabled", file=sys.stderr)
    return 1


def scancel(args: list[str]) -> int:
    return 0


if __name__ == "__main__":
    command = {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scancel": scancel}[sys.argv[1]]
    raise SystemExit(command(sys.argv[2:]))
