"""Metric plug-ins in a real run (issue 10): the job's ``metrics:`` are scored on every video by the replicas, their
columns and model names land in the records and the published table, and a change to them is a metrics-only
change that ``--rescore-changed`` scores again without generating."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from farm import open_results
from farm.config import SpecError
from farm.metrics.tiny_clip import write_tiny_clip
from farm.resume import ChangedRows
from farm.runtime.driver import run_job
from tests.helpers import still_job, write_manifest

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _job(manifest: str, out: str, metrics: list[dict]) -> object:
    return still_job(
        manifest,
        out,
        resources={"replicas": 1, "cpus_per_replica": 0.25},
        defaults={"num_frames": 9, "height": 128, "width": 128},
        identity={"enabled": True, "recognizer": "dlib", "frames": 3},
        metrics=metrics,
    )


def test_metrics_scored_in_a_run_then_rescored_when_they_change(tmp_path: Path) -> None:
    clip = write_tiny_clip(tmp_path / "clip")
    rows = [
        {"id": "a", "portrait": "pkg://skimage/data/astronaut.png", "prompt": "an astronaut smiling"},
        {"id": "b", "portrait": "pkg://skimage/data/astronaut.png", "prompt": "a person on a beach"},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = str(tmp_path / "out")
    metrics = [{"name": "motion", "frame_pairs": 4}, {"name": "clip", "weights": str(clip), "frames": 2}]
    assert run_job(_job(manifest, out, metrics), progress=False).counts["ok"] == 2
    recs = {r["id"]: r for r in open_results(out).to_pylist()}
    for rec in recs.values():
        assert rec["motion_mean"] is not None and rec["motion_mean"] >= 0 and rec["motion_pairs"] == 4
        assert isinstance(rec["motion_static"], bool) and rec["motion_model"].startswith("opencv-farneback")
        assert rec["clip_score"] is not None and 0 <= rec["clip_score"] <= 100 and rec["clip_model"]
        assert rec["identity_temporal_mean"] is not None and rec["identity_mean"] > 0.9  # the still baseline
        assert rec["identity_facexlib_mean"] is None  # not configured: null, never 0
    published = pq.read_table(Path(out) / "results" / "results.parquet")
    assert {"motion_mean", "clip_score", "identity_temporal_min"} <= set(published.column_names)

    changed = [{"name": "motion", "frame_pairs": 2}, metrics[1]]
    with pytest.raises(ChangedRows, match="--rescore-changed"):
        run_job(_job(manifest, out, changed), progress=False)
    assert run_job(_job(manifest, out, changed), progress=False, rescore_changed=True).counts["ok"] == 2
    again = {r["id"]: r for r in open_results(out).to_pylist()}
    assert {r["motion_pairs"] for r in again.values()} == {2}
    assert {r["video_fingerprint"] for r in again.values()} == {r["video_fingerprint"] for r in recs.values()}


def test_an_unknown_metric_is_a_spec_error_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="motion"):
        _job(str(tmp_path / "m.parquet"), str(tmp_path / "out"), [{"name": "motoin"}])
