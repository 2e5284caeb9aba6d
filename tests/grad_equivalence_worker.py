"""One rank of tests/test_grad_equivalence.py: trains each run of SPEC (JSON: the test module's import name and
a list of train.py override lists) in turn through ldm.cli.train.train, in this one process, so one start
(imports, the gloo group) serves them all.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=... MASTER_PORT=... python tests/grad_equivalence_worker.py SPEC
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # the test module as pytest named it: with or without `tests.`


def main() -> None:
    faulthandler.enable()  # an abort (SIGABRT from C++) leaves every thread's Python stack in the log
    import torch

    torch.set_num_threads(1)
    from ldm.cli.train import release_process_group, train

    spec = json.loads(Path(sys.argv[1]).read_text())
    compose_run = importlib.import_module(spec["module"]).compose_run
    for overrides in spec["runs"]:
        train(compose_run(overrides))
    release_process_group()  # as train.py does at its end


if __name__ == "__main__":
    main()
