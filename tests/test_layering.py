"""Arrows between layers point one way: only farm.runtime imports Ray; torch stays in models (and identity)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "module",
    [
        "farm.config",
        "farm.manifest",
        "farm.storage",
        "farm.video",
        "farm.results",
        "farm.validate",
        "farm.worker",
        "farm.scoring",
        "farm.report",
        "farm.cli",
        "farm.identity.recognizer",
        "farm.models.still",
        "farm.lease",
        "farm.runtime.scheduler",
        "farm.table",
        "farm.publish",
        "farm.export",
        "farm.summary",
        "farm.htmlreport",
        "farm.metrics",
        "farm.resume",
        "farm.recording",
        "farm.preflight",
        "farm.runtime.progress",
    ],
)
def test_no_ray_outside_runtime(module: str) -> None:
    assert "ray" not in _imported_after(module)


@pytest.mark.parametrize(
    "module", ["farm.config", "farm.manifest", "farm.storage", "farm.video", "farm.results", "farm.cli", "farm.worker"]
)
def test_no_torch_below_models(module: str) -> None:
    assert "torch" not in _imported_after(module)
