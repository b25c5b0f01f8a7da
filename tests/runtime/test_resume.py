"""Kill the driver process mid-run, rerun the same command: exactly one record per id, committed videos kept."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from farm.storage import OutputLayout
from farm.table import read_results
from tests.helpers import farm_run_process, rows, still_job, write_manifest

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _spec(tmp_path: Path, manifest: str, out: str, delay: float) -> Path:
    job = still_job(
        manifest,
        out,
        name="resume",
        resources={"replicas": 2, "cpus_per_replica": 0.25},
        runtime={"commit_every_rows": 2, "inject_faults": {"delay": {f"row-{i:03d}": delay for i in range(40)}}},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    return path


def test_driver_killed_then_rerun(tmp_path: Path) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    manifest = write_manifest(tmp_path / "m.parquet", rows(16))
    out = str(tmp_path / "out")
    spec = _spec(tmp_path, manifest, out, delay=0.3)
    layout = OutputLayout(out)
    proc = farm_run_process(spec, address)
    deadline = time.time() + 120
    while time.time() < deadline and len(layout.log_parts()) < 2:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = read_results(layout)
    committed = set(first.column("id").to_pylist())
    assert 0 < len(committed) < 16, "the driver should die mid-run"
    stamps = {i: os.stat(tmp_path / "out" / "videos" / f"{i}.mp4").st_mtime_ns for i in committed}

    rerun = farm_run_process(spec, address)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output
    final = read_results(layout)
    ids = final.column("id").to_pylist()
    assert sorted(ids) == [f"row-{i:03d}" for i in range(16)]
    assert set(final.column("status").to_pylist()) == {"ok"}
    raw = sum(pq.read_metadata(p).num_rows for p in layout.log_parts())
    assert raw == 16, "no id may be committed twice"
    for row_id, stamp in stamps.items():
        assert os.stat(tmp_path / "out" / "videos" / f"{row_id}.mp4").st_mtime_ns == stamp, f"{row_id} regenerated"


def test_sigterm_commits_buffered_records_and_marks_the_run_interrupted(tmp_path: Path) -> None:
    """`ray job stop` / a scheduler's SIGTERM: records still in the buffer are committed before the driver exits."""
    import json

    import ray

    manifest = write_manifest(tmp_path / "m.parquet", rows(12))
    out = str(tmp_path / "out")
    spec = _spec(tmp_path, manifest, out, delay=0.3)
    data = yaml.safe_load(spec.read_text())
    data["runtime"].update(commit_every_rows=1000, commit_every_s=3600)  # nothing is committed until the end
    data["runtime"]["heartbeat_s"] = 0.2  # the driver says how many records it holds
    spec.write_text(yaml.safe_dump(data))
    proc = farm_run_process(spec, ray.get_runtime_context().gcs_address)
    deadline = time.time() + 120
    # wait for 3 records in the driver's buffer (a video on disk alone may still be on its way back to the driver)
    while time.time() < deadline and _rows_held(tmp_path / "out" / "_job.json") < 3:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    assert OutputLayout(out).log_parts() == []
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    committed = read_results(OutputLayout(out))
    assert committed.num_rows >= 3 and set(committed.column("status").to_pylist()) == {"ok"}
    meta = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert meta["runs"][-1]["status"] == "interrupted"


def _rows_held(job_json: Path) -> int:
    """Rows the running driver has records for (its heartbeat in ``_job.json``), 0 before the first one."""
    import json

    try:
        run = json.loads(job_json.read_text())["runs"][-1]
    except (FileNotFoundError, ValueError, KeyError, IndexError):
        return 0
    return int(run.get("progress", {}).get("rows_done") or 0) if run.get("status") == "running" else 0
