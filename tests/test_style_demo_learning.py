"""The style demo learns its style (issue 11, item 5), in make test-all: what `make style-demo` runs, through
train.py and `python -m ldm.style_demo` as typed. Stage one that also sees stripes (experiment=
autoencoder_style_demo), the base on plain shapes (experiment=style_demo_base: the CI demo's recipe), then the
striped DreamBooth fine-tune with prior preservation (experiment=style_demo) and without it. On the 18 plain
captions x 2 seeds, every model sampled with the same seeds:

- with the trigger, the fine-tune's stripe score is far above the base's;
- without it, the prior-preserved fine-tune's score rises less than a quarter as much, and
- without prior preservation the no-trigger images drift further from the base's (stripe score and pixels).

Measured on 2 CPU cores (the whole test 222 s, 475 s under other work; the same numbers in a scratch run):
stripe score with the trigger 0.527 (base 0.110); without it 0.100 (base 0.076); without prior preservation
0.343; pixel drift from the base without the trigger 0.122 with prior preservation, 0.193 without. With seeds
1 and 2 (seed=) the no-trigger score was 0.108 and 0.138 (trigger 0.501, 0.492): a rise of 8% and 16% of the
trigger's, against the quarter asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run_py(cwd: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def train_py(root: Path, *overrides: str) -> str:
    return run_py(root, str(ROOT / "train.py"), f"paths.root={root / 'outputs'}", "trainer.enable_progress_bar=false",
                  *overrides)


def test_the_fine_tune_draws_stripes_with_its_trigger_and_prior_preservation_keeps_the_rest(tmp_path: Path) -> None:
    train_py(tmp_path, "experiment=autoencoder_style_demo", f"data.root={tmp_path / 'data'}")
    train_py(tmp_path, "experiment=style_demo_base", f"data.root={tmp_path / 'data'}")
    pictures = f"data.instance_dir={tmp_path / 'style'}"
    train_py(tmp_path, "experiment=style_demo", pictures)
    train_py(tmp_path, "experiment=style_demo", pictures, "data.class_prompt=", "module.prior_loss_weight=0",
             "run_name=style_demo_no_prior")
    stdout = run_py(tmp_path, "-m", "ldm.style_demo", f"root={tmp_path / 'outputs'}", f"out_dir={tmp_path / 'compare'}")
    print(stdout)
    scores = json.loads((tmp_path / "compare" / "grid-00000-scores.json").read_text())
    row = {(r["model"], bool(r["trigger"])): r for r in scores["table"]}
    assert len(row) == 6 and all(r["images"] == 36 for r in row.values())
    base_t, base_p = row["base", True]["stripe_score"], row["base", False]["stripe_score"]
    style_t, style_p = row["style", True]["stripe_score"], row["style", False]["stripe_score"]
    free_p = row["style_no_prior", False]["stripe_score"]
    drift, free_drift = row["style", False]["drift_from_base"], row["style_no_prior", False]["drift_from_base"]
    table = f"\n{stdout}"
    # with the trigger: the style (measured 0.527 against the base's 0.110)
    assert style_t >= base_t + 0.2 and style_t >= 2 * base_t, f"stripe score with trigger {style_t} vs base {base_t}{table}"
    # without it: close to the base (measured a rise of 0.024, against 0.417 with the trigger)
    assert style_p - base_p <= 0.25 * (style_t - base_t), (
        f"without trigger the stripe score rose from {base_p} to {style_p}, with it from {base_t} to {style_t}{table}")
    # without prior preservation: further from the base (measured 0.343 vs 0.100 stripe score, 0.193 vs 0.122 drift)
    assert free_p >= style_p + 0.03, f"no-prior stripe score without trigger {free_p} vs prior {style_p}{table}"
    assert free_drift >= drift + 0.02, f"no-prior pixel drift without trigger {free_drift} vs prior {drift}{table}"
    assert (tmp_path / "compare" / "grid-00000.png").is_file() and (tmp_path / "compare" / "grid-00000-x4.png").is_file()
