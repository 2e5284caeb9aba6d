"""Loggers that continue a run's history when it resumes in its own folder.

Lightning's CSVLogger deletes an existing `metrics.csv` (and numbers a new `version_N` folder per start);
this one keeps the rows and appends, dropping only rows at or past the first step the resumed run logs
again (steps trained after the checkpoint, before the interruption, which the resumed run redoes). The
step column stays one unbroken, increasing sequence however often the run was stopped.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ResumingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        self._previous: list[dict[str, str]] | None = None
        super().__init__(log_dir)
        keys: list[str] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._previous = list(reader)
                keys = list(reader.fieldnames or [])
        self.metrics_keys = sorted(keys)

    def _check_log_dir_exists(self) -> None:
        pass  # the parent deletes an existing metrics.csv here: a resumed run continues it instead

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._previous is not None and step is not None:
            self._truncate_from(step)
        super().log_metrics(metrics_dict, step)

    def _truncate_from(self, step: int) -> None:
        """Keep the earlier run's rows before `step`, the first step logged again."""
        kept = [row for row in self._previous or [] if _step(row) < step]
        if len(kept) != len(self._previous or []):
            with open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        self._previous = None


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger, appending to the run's `metrics.csv` when the run resumes (see the module)."""

    def __init__(self, save_dir: str, name: str = "csv", version: int | str | None = 0, **kwargs: Any):
        super().__init__(save_dir, name=name, version=version, **kwargs)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment
