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
def _deterministic():
    torch.manual_seed(0)
    yield
