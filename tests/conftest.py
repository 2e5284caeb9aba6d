import os
import tempfile

import pytest
import torch

# Checkpoint hashes (ldm.pnginfo) are cached on disk; the suite, and the processes it starts, keep theirs
# in a folder of its own instead of the user's ~/.cache/ldm.
os.environ.setdefault("LDM_CACHE_DIR", tempfile.mkdtemp(prefix="ldm-test-cache-"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
