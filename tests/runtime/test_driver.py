"""End-to-end runtime tests on the session Ray cluster (fake GPUs) with the `still` baseline backend (real, no ML)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from farm.manifest import record_key
from farm.runtime.driver import run_job
from farm.storage import OutputLayout
from farm.table import read_results
from farm.video import read_metadata
from tests.helpers import ASTRONAUT, rows, still_job, write_manifest

pytestmark = pytest.mark.usefixtures("ray_cluster")

FAST = {"cpus_per_replica": 0.25}


def _records(output: str, storage_options: dict | None = None) -> dict[str, dict[str, Any]]:
    table = read_results(OutputLayout(output, storage_options))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    return {r["id"]: r for r in table.to_pylist()}


def _raw_record_count(output: str) -> int:
    return sum(pq.read_metadata(p).num_rows for p in OutputLayout(output).log_parts())


def test_bad_rows_become_records_and_good_rows_get_videos(tmp_path: Path) -> None:
    data = rows(3, lang="en") + [
        {"id": "dup", "portrait": ASTRONAUT, "prompt": "a", "lang": "x"},
        {"id": "dup", "portrait": ASTRONAUT, "prompt": "b", "lang": "y"},
        {"id": "bad id!", "portrait": ASTRONAUT, "prompt": "p", "lang": "x"},
        {"id": "empty", "portrait": ASTRONAUT, "prompt": " ", "lang": "x"},
        {"id": "range", "portrait": ASTRONAUT, "prompt": "p", "lang": "x", "num_frames": 10},
        {"id": "missing", "portrait": str(tmp_path / "nope.png"), "prompt": "p", "lang": "x"},
        {"id": "notimage", "portrait": str(tmp_path / "m.parquet"), "prompt": "p", "lang": "x"},
        {"id": "noface", "portrait": "pkg://skimage/data/coffee.png", "prompt": "p", "lang": "x"},
        {"id": "norights", "portrait": ASTRONAUT, "prompt": "p", "lang": "x", "rights_confirmed": False},
        {"id": None, "portrait": ASTRONAUT, "prompt": "p", "lang": "x"},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", data)
    out = str(tmp_path / "out")
    summary = run_job(still_job(manifest, out, resources={"replicas": 2, **FAST}), progress=False)
    recs = _records(out)
    bad_key, none_key = record_key(data[5]), record_key(data[12])
    assert bad_key.startswith("<bad id ") and none_key.startswith("<bad id ") and bad_key != none_key
    assert set(recs) == {
        "row-000",
        "row-001",
        "row-002",
        "dup",
        bad_key,
        "empty",
        "range",
        "missing",
        "notimage",
        "noface",
        "norights",
        none_key,
    }
    expect = {
        "dup": "duplicate_id",
        bad_key: "bad_id",
        "empty": "empty_prompt",
        "range": "bad_param",
        "missing": "portrait_unreadable",
        "notimage": "portrait_unreadable",
        "noface": "no_face",
        none_key: "bad_id",
        "norights": "rights_not_confirmed",
    }
    for row_id, code in expect.items():
        assert recs[row_id]["error_code"] == code, (row_id, recs[row_id])
        assert recs[row_id]["video"] is None
    assert recs["norights"]["status"] == "skipped"
    assert "num_frames=10" in recs["range"]["error_message"]
    for i in range(3):
        rec = recs[f"row-{i:03d}"]
        assert rec["status"] == "ok" and rec["lang"] == "en" and rec["attempts"] == 1
        assert (rec["num_frames"], rec["height"], rec["width"], rec["fps"]) == (5, 32, 48, 8)
        assert Path(rec["video"]).stat().st_size > 0
        assert rec["generate_s"] >= 0 and rec["total_s"] >= rec["generate_s"]
        assert "AI-generated" in read_metadata(rec["video"])["comment"]
    assert summary.counts["ok"] == 3
    assert summary.counts["skipped:rights_not_confirmed"] == 1 and "failed:rights_not_confirmed" not in summary.counts
    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert job["runs"][-1]["status"] == "finished" and job["model"]["backend"] == "still"
    # rerun: nothing left to do, still exactly one record per id
    again = run_job(still_job(manifest, out, resources={"replicas": 1, **FAST}), progress=False)
    assert again.already_committed == 13 and sum(again.counts.values()) == 0  # 13 rows, 12 ids
    assert _raw_record_count(out) == 12


def test_identity_scored_with_every_video(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    out = str(tmp_path / "out")
    job = still_job(
        manifest,
        out,
        identity={"enabled": True, "recognizer": "dlib", "frames": 3, "per_frame_json": True},
        defaults={"num_frames": 9, "height": 256, "width": 256},
        resources={"replicas": 1, **FAST},
    )
    run_job(job, progress=False)
    recs = _records(out)
    for rec in recs.values():
        assert rec["status"] == "ok", rec
        assert rec["frames_scored"] == 3 and rec["face_frames"] == 3 and rec["face_rate"] == 1.0
        assert rec["identity_mean"] > 0.9 and rec["identity_distance_mean"] < 0.6
        assert rec["identity_model"].startswith("dlib")
        metrics = json.loads((tmp_path / "out" / "metrics" / f"{rec['id']}.json").read_text())
        assert metrics["identity_mean"] == pytest.approx(rec["identity_mean"])


def test_replica_killed_mid_row_then_poison_row(tmp_path: Path) -> None:
    """An injected SIGKILL on a row's first dispatch: retried elsewhere; a row that always kills is `poison`."""
    manifest = write_manifest(tmp_path / "m.parquet", rows(8))
    out = str(tmp_path / "out")
    faults = {"crash": {"row-002": 1, "row-005": 99}}
    job = still_job(
        manifest, out, resources={"replicas": 2, **FAST}, runtime={"inject_faults": faults, "max_attempts": 2}
    )
    summary = run_job(job, progress=False)
    recs = _records(out)
    assert len(recs) == 8
    assert recs["row-002"]["status"] == "ok" and recs["row-002"]["attempts"] >= 2
    assert recs["row-005"]["status"] == "failed" and recs["row-005"]["error_code"] == "poison"
    assert all(recs[f"row-{i:03d}"]["status"] == "ok" for i in (0, 1, 3, 4, 6, 7))
    assert summary.replica_restarts >= 3
    assert _raw_record_count(out) == 8


def test_external_sigkill_of_a_replica(tmp_path: Path) -> None:
    import psutil

    manifest = write_manifest(tmp_path / "m.parquet", rows(10))
    out = str(tmp_path / "out")
    job = still_job(
        manifest,
        out,
        resources={"replicas": 2, **FAST},
        runtime={"inject_faults": {"delay": {f"row-{i:03d}": 0.4 for i in range(10)}}},
    )
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            pids = [
                p.pid
                for p in psutil.process_iter(["cmdline"])
                if any("ray::Replica" in part for part in (p.info["cmdline"] or []))
            ]
            if len(pids) == 2 and (tmp_path / "out" / "videos").exists():
                pid = pids[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run_job(job, progress=False)
    thread.join(5)
    assert killed, "the test never found a running replica to kill"
    recs = _records(out)
    assert len(recs) == 10 and all(r["status"] == "ok" for r in recs.values())
    assert summary.replica_restarts >= 1


def test_hang_becomes_retry_then_timeout(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows(4))
    out = str(tmp_path / "out")
    faults = {"hang": {"row-001": 1, "row-003": 99}, "oom": {"row-000": 1}}
    job = still_job(
        manifest,
        out,
        resources={"replicas": 2, "in_flight_per_replica": 1, **FAST},
        runtime={"inject_faults": faults, "max_attempts": 2, "row_timeout_s": 4},
    )
    run_job(job, progress=False)
    recs = _records(out)
    assert recs["row-000"]["status"] == "ok" and recs["row-000"]["attempts"] == 2  # OOM -> another replica
    assert recs["row-001"]["status"] == "ok" and recs["row-001"]["attempts"] >= 2
    assert recs["row-003"]["status"] == "failed" and recs["row-003"]["error_code"] == "timeout"
    assert recs["row-002"]["status"] == "ok"


def test_s3_end_to_end(s3_bucket: str, s3_endpoint: dict[str, Any], tmp_path: Path) -> None:
    import s3fs

    opts = s3_endpoint["storage_options"]
    fs = s3fs.S3FileSystem(**opts)
    fs.pipe(f"{s3_bucket}/in/portrait.png", Path(storage_path(ASTRONAUT)).read_bytes())
    data = rows(3, portrait=f"{s3_bucket}/in/portrait.png")
    with fs.open(f"{s3_bucket}/in/manifest.parquet", "wb") as fh:
        pq.write_table(__import__("pyarrow").Table.from_pylist(data), fh)
    out = f"{s3_bucket}/out"
    job = still_job(f"{s3_bucket}/in/manifest.parquet", out, storage_options=opts, resources={"replicas": 1, **FAST})
    run_job(job, progress=False)
    recs = _records(out, opts)
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs.values())
    assert all(fs.size(r["video"]) > 0 for r in recs.values())
    assert fs.exists(f"{s3_bucket}/out/_job.json")


def storage_path(uri: str) -> str:
    from farm.storage import resolve_pkg_uri

    return resolve_pkg_uri(uri)


def test_backend_that_cannot_load_aborts_naming_the_problem(tmp_path: Path) -> None:
    """A pack path that does not exist is found by the pre-flight: a spec error before any replica starts. One that
    exists but is no pack fails on the replicas: the job aborts with the loader's own message."""
    from farm.config import SpecError
    from farm.runtime.errors import JobAborted

    manifest = write_manifest(tmp_path / "m.parquet", rows(2))

    def job(pack: Path):
        options = {"recognizer": "insightface", "pack": str(pack)}
        return still_job(manifest, str(tmp_path / "out"), resources={"replicas": 1, **FAST}, model={"options": options})

    with pytest.raises(SpecError, match="no-such-pack"):
        run_job(job(tmp_path / "no-such-pack"), progress=False)
    assert not (tmp_path / "out" / "_job.json").exists()  # refused before any replica started
    empty = tmp_path / "empty-pack"
    empty.mkdir()
    with pytest.raises(JobAborted, match="empty-pack"):
        run_job(job(empty), progress=False)
    meta = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert meta["runs"][-1]["status"] == "aborted"


def test_replicas_that_cannot_be_placed_abort_with_the_resource_ask(tmp_path: Path) -> None:
    """More CPU per replica than the cluster has: nothing can start, the job says why instead of hanging."""
    from farm.runtime.errors import JobAborted

    job = still_job(
        write_manifest(tmp_path / "m.parquet", rows(1)),
        str(tmp_path / "out"),
        resources={"replicas": 1, "cpus_per_replica": 64},
        runtime={"start_timeout_s": 3},
    )
    with pytest.raises(JobAborted, match="64 CPU"):
        run_job(job, progress=False)


def test_cli_sweep_runs_jobs_in_turn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from farm.cli import main

    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    specs = []
    for name in ("a", "b"):
        spec = tmp_path / f"{name}.yaml"
        job = still_job(manifest, str(tmp_path / name), resources={"replicas": 1, **FAST})
        spec.write_text(yaml.safe_dump(job.model_dump(mode="json")))
        specs.append(str(spec))
    assert main(["run", *specs, "--output", str(tmp_path / "x")]) == 2  # a usage error, before anything runs
    assert "sweep" in capsys.readouterr().err
    assert main(["run", *specs, "--no-progress"]) == 0
    for name in ("a", "b"):
        assert len(_records(str(tmp_path / name))) == 2


def test_replica_death_at_the_end_of_the_job_still_records_every_row(tmp_path: Path) -> None:
    """2 replicas; `a` crashes its replica on its first try while `b` keeps the other busy and the stream is empty:
    the rerun of `a` must still be dispatched (it once aborted with 'no replica is running and rows remain')."""
    manifest = write_manifest(
        tmp_path / "m.parquet",
        [
            {"id": "a", "portrait": ASTRONAUT, "prompt": "p"},
            {"id": "b", "portrait": ASTRONAUT, "prompt": "p"},
        ],
    )
    out = str(tmp_path / "out")
    job = still_job(
        manifest,
        out,
        resources={"replicas": 2, "in_flight_per_replica": 1, **FAST},
        runtime={"inject_faults": {"crash": {"a": 1}, "delay": {"b": 6}}},
    )
    summary = run_job(job, progress=False)
    recs = _records(out)
    assert recs["a"]["status"] == "ok" and recs["a"]["attempts"] == 2
    assert recs["b"]["status"] == "ok" and summary.replica_restarts == 1


def test_cli_exit_codes_for_failed_rows_and_a_busy_output(tmp_path: Path) -> None:
    """Ray Jobs reads the exit code: too many failed rows -> 4 (FAILED); a second run on a leased output -> 5."""
    import yaml

    from farm.lease import OutputLease

    manifest = write_manifest(tmp_path / "m.parquet", rows(2, portrait=str(tmp_path / "missing.png")))
    spec = tmp_path / "job.yaml"
    job = still_job(manifest, str(tmp_path / "out"), resources={"replicas": 1, **FAST})
    spec.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "run", str(spec), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 4, proc.stderr
    assert "2 of 2 rows failed" in proc.stderr and "max_failed_fraction=0.5" in proc.stderr
    holder = OutputLease(str(tmp_path / "other"), run_id="run-elsewhere", ttl_s=300).acquire()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "farm.cli", "run", str(spec), "--no-progress", "--output", str(tmp_path / "other")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 5, proc.stderr
        assert "run-elsewhere" in proc.stderr and holder.host in proc.stderr
        assert not (tmp_path / "other" / "results").exists(), "the refused run wrote nothing"
    finally:
        holder.release()


def test_manifest_columns_named_like_internal_fields_are_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``retry`` / ``traceback`` are also the worker's internal flags: the manifest's values still reach the results,
    and the traceback of a retried row goes to the driver log (warning)."""
    data = [{**r, "retry": i, "traceback": f"tb-{i}"} for i, r in enumerate(rows(3))]
    manifest = write_manifest(tmp_path / "m.parquet", data)
    out = str(tmp_path / "out")
    job = still_job(
        manifest, out, resources={"replicas": 1, **FAST}, runtime={"inject_faults": {"oom": {"row-001": 1}}}
    )
    with caplog.at_level(logging.WARNING, logger="farm"):
        summary = run_job(job, progress=False)
    assert summary.counts["ok"] == 3
    recs = _records(out)
    assert {k: (r["retry"], r["traceback"]) for k, r in recs.items()} == {
        f"row-{i:03d}": (i, f"tb-{i}") for i in range(3)
    }
    assert recs["row-001"]["attempts"] == 2
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "row-001" in r.getMessage()]
    assert any("Traceback (most recent call last)" in r.getMessage() for r in warned)


def test_run_skips_a_damaged_results_part(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A foreign or truncated ``*.parquet`` in the log is skipped at start (warning naming it); the run finishes."""
    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    out = tmp_path / "out"
    (out / "_log").mkdir(parents=True)
    (out / "_log" / "notes.parquet").write_bytes(b"not parquet at all")
    with caplog.at_level(logging.WARNING, logger="farm"):
        summary = run_job(still_job(manifest, str(out), resources={"replicas": 1, **FAST}), progress=False)
    assert summary.counts["ok"] == 2
    assert set(_records(str(out))) == {"row-000", "row-001"}
    assert str(out / "_log" / "notes.parquet") in caplog.text


def test_a_results_part_that_storage_refuses_stays_buffered_and_is_committed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part refused even after storage's own retries does not abort the run: its records wait for the next commit."""
    from farm import results
    from farm.records import InfraError

    real, refusals = results.write_part, {"left": 2}

    def refusing(*args: Any, **kwargs: Any) -> str:
        if refusals["left"]:
            refusals["left"] -= 1
            raise InfraError("writing a results part failed after 3 attempts: 503 SlowDown")
        return real(*args, **kwargs)

    monkeypatch.setattr(results, "write_part", refusing)
    manifest = write_manifest(tmp_path / "m.parquet", rows(6))
    out = str(tmp_path / "out")
    timed_commits_only = {  # every commit goes through the loop's timed flush, the path that used to abort
        "commit_every_rows": 1000,
        "commit_every_s": 0.3,
        "inject_faults": {"delay": {f"row-{i:03d}": 0.3 for i in range(6)}},
    }
    job = still_job(manifest, out, resources={"replicas": 1, **FAST}, runtime=timed_commits_only)
    summary = run_job(job, progress=False)
    assert refusals["left"] == 0 and summary.counts["ok"] == 6
    assert sorted(_records(out)) == [f"row-{i:03d}" for i in range(6)] and _raw_record_count(out) == 6
