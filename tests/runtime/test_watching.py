"""Watching a run: plain progress lines off a terminal, a live heartbeat in ``_job.json``, and the farm's metrics
read back from Ray's metrics endpoint (issue 12)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from farm.runtime.driver import run_job
from farm.runtime.progress import ProgressReporter, Snapshot, describe
from tests.helpers import rows, still_job, write_manifest


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_interval_and_at_each_phase_change(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    reporter = ProgressReporter(10, enabled=True, every_s=30, stream=io.StringIO(), clock=clock)
    assert reporter.bar is None and reporter.plain  # StringIO is no terminal
    snap = Snapshot(total=10, replicas_wanted=2, phase="waiting for replicas")
    with caplog.at_level(logging.INFO, logger="farm"):
        reporter.show(snap)  # first line at once
        clock.now += 5
        snap.phase = "running"
        reporter.show(snap)  # phase change: a line
        clock.now += 5
        reporter.show(snap)  # nothing new, 5 s later: no line
        snap.counts = Counter({"ok": 3, "failed": 2, "failed:no_face": 2})
        clock.now += 30
        reporter.show(snap)  # 30 s: a line
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 3
    assert "waiting for replicas" in lines[0] and lines[1].endswith("running")
    assert "rows 5/10 (50.0%)" in lines[2] and "failed 2 (no_face 2)" in lines[2] and "replicas 0/2" in lines[2]


def test_rate_and_eta() -> None:
    snap = Snapshot(total=100, already_committed=20, counts=Counter({"ok": 40}), phase="running")
    text = describe(snap, elapsed_s=20.0)
    assert "rows 60/100 (60.0%)" in text and "2.00 rows/s" in text and "ETA 0m20s" in text


def _metric_lines(name: str, run_id: str) -> list[str]:
    import ray

    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return [line for line in body.splitlines() if line.startswith(name) and f'run="{run_id}"' in line]


@pytest.mark.usefixtures("ray_cluster")
def test_live_heartbeat_then_metrics_read_back(tmp_path: Path) -> None:
    """While a run works, ``_job.json`` says it is running with rows done, rate and replicas (refreshed every
    ``heartbeat_s``); its rows are counted in ``ray_farm_rows_total`` on Ray's metrics endpoint, by status."""
    manifest = write_manifest(tmp_path / "m.parquet", rows(8) + [{"id": "bad id", "portrait": "x", "prompt": "p"}])
    out = tmp_path / "out"
    delays = {f"row-{i:03d}": 0.5 for i in range(8)}
    job = still_job(
        manifest,
        str(out),
        resources={"replicas": 1, "cpus_per_replica": 0.25},
        runtime={"heartbeat_s": 0.3, "progress_every_s": 0.3, "inject_faults": {"delay": delays}},
    )
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(summary=run_job(job, progress=True)))
    worker.start()
    live = _wait_for_live_heartbeat(out / "_job.json", worker)
    worker.join(120)
    assert live["status"] == "running" and live["progress"]["rows_total"] == 9
    assert 0 < live["progress"]["rows_done"] < 9 and live["progress"]["replicas"]["wanted"] == 1
    assert live["heartbeat_every_s"] == 0.3 and live["heartbeat_at"]
    final = json.loads((out / "_job.json").read_text())["runs"][-1]
    assert final["status"] == "finished" and final["progress"]["rows_done"] == 9
    run_id = result["summary"].run_id
    deadline = time.monotonic() + 60
    counted: dict[str, float] = {}
    while time.monotonic() < deadline and sum(counted.values()) < 9:
        counted = {
            line.split('status="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in _metric_lines("ray_farm_rows_total", run_id)
        }
        time.sleep(1)
    assert counted == {"ok": 8.0, "failed": 1.0}


def _wait_for_live_heartbeat(path: Path, worker: threading.Thread) -> dict[str, Any]:
    while worker.is_alive():
        try:
            run = json.loads(path.read_text())["runs"][-1]
        except (FileNotFoundError, ValueError, KeyError, IndexError):
            run = {}
        if run.get("status") == "running" and run.get("progress", {}).get("rows_done", 0) > 0:
            return run
        time.sleep(0.05)
    raise AssertionError("the run finished before a live heartbeat with rows done was seen")


@pytest.mark.usefixtures("ray_cluster")
def test_status_json_of_a_live_run_then_of_a_killed_driver(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``farm status OUT --json`` describes a run in progress from its heartbeat; after its driver is killed the
    heartbeat goes stale and status says so (and how to resume), instead of showing a run that looks alive."""
    import os
    import signal

    import ray
    import yaml

    from farm.cli import main
    from tests.helpers import farm_run_process

    manifest = write_manifest(tmp_path / "m.parquet", rows(40))
    out = tmp_path / "out"
    delays = {f"row-{i:03d}": 0.4 for i in range(40)}
    job = still_job(
        manifest,
        str(out),
        name="watched",
        resources={"replicas": 1, "cpus_per_replica": 0.25},
        runtime={
            "heartbeat_s": 0.5,
            "progress_every_s": 0.5,
            "commit_every_rows": 2,
            "inject_faults": {"delay": delays},
        },
    )
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    driver = farm_run_process(spec, ray.get_runtime_context().gcs_address, progress=True)
    try:
        live = _poll_status(out, capsys, lambda run: run.get("progress", {}).get("rows_done", 0) > 0, driver)
        assert live["status"] == "running" and live["stale"] is False and live["progress"]["rows_total"] == 40
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
        # at once: the lease's holder is a process of this host that is gone (no wait for the heartbeat to age)
        dead = _poll_status(out, capsys, lambda run: run.get("stale"), None)
        assert dead["status"] == "running" and "no longer holds the output lease" in dead["stale_reason"]
        assert main(["status", str(out)]) == 0
        assert "its driver is gone" in capsys.readouterr().out
        time.sleep(1.6)  # and later the heartbeat says it too
        assert main(["status", str(out), "--json"]) == 0
        assert "heartbeat stopped" in json.loads(capsys.readouterr().out)["runs"][-1]["stale_reason"]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        output = driver.stdout.read() if driver.stdout else ""
    assert "progress: rows" in output  # the plain lines a non-terminal stderr gets
    assert "(Replica pid=" in output and "\x1b[" not in output, "replica lines without colour codes"

    # the rerun resumes and finishes: the killed run is no longer shown as one to resume
    resumed = farm_run_process(spec, ray.get_runtime_context().gcs_address)
    assert resumed.wait(180) == 0, resumed.stdout.read() if resumed.stdout else ""
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rerun the same command" not in text and ": finished" in text, text
    assert "interrupted: its driver stopped without a final update; run #2 took over the output" in text, text


def _poll_status(out: Path, capsys: pytest.CaptureFixture[str], ready: Any, proc: Any) -> dict[str, Any]:
    from farm.cli import main

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if (out / "_job.json").exists():
            assert main(["status", str(out), "--json"]) == 0
            runs = json.loads(capsys.readouterr().out)["runs"]
            if runs and runs[-1]["status"] == "running" and ready(runs[-1]):
                return runs[-1]
        assert proc is None or proc.poll() is None, "the run ended before the state was seen"
        time.sleep(0.2)
    raise AssertionError("status never showed the expected state")
