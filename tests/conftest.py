import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Checkpoint hashes (ldm.pnginfo) are cached on disk; the suite, and the processes it starts, keep theirs
# in a folder of its own instead of the user's ~/.cache/ldm.
if "LDM_CACHE_DIR" not in os.environ:
    os.environ["LDM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ldm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LDM_CACHE_DIR"], ignore_errors=True)


# `make test` runs two test processes on a 2-core machine: a second torch thread in each would oversubscribe
# the cores (about 10x slower); processes the tests start get OMP_NUM_THREADS=1 from here too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _logging_restored():
    """Tests that run a CLI's main() in this process leave no Hydra log handler behind for later tests."""
    from helpers import logging_as_it_was

    with logging_as_it_was():
        yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# The longest files first: `make test` hands whole files to its two processes in collection order, so a
# long file collected last would leave one process idle while the other finishes it. Measured on a 2-core
# machine, longest first (seconds); other files keep their order after these.
LONGEST_FIRST = [
    "test_readme.py",  # ~580: every README command, each a process
    "test_style_demo_learning.py",  # ~220, make test-all only: three trainings, two fine-tunes, the scoring
    "test_demo_ci.py",  # ~370: the reduced demo and its shuffled-caption control
    "test_midepoch_resume.py",  # ~135
    "test_finetune_correctness.py",  # ~130
    "test_interrupt.py",  # ~125
    "test_checkpoint_retention.py",  # ~110
    "test_cli.py",  # ~110
    "test_eval_callback.py",  # ~100
    "test_permissions.py",  # ~90
    "test_evaluate.py",  # ~80
    "test_grad_equivalence.py",  # ~70
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: in-file order kept
