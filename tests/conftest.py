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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
