"""Storage that refuses every portrait (expired credentials, a store down): the rows are not at fault. The job stops
after ``runtime.infra_abort_after`` rows in a row failed on it, instead of recording the whole manifest as failed,
and a plain rerun redoes those rows (no ``--retry-failed`` needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from farm.runtime.driver import run_job
from farm.runtime.errors import JobAborted
from farm.storage import OutputLayout
from farm.table import read_results
from tests.fakeservers import Reply, scripted_http_server
from tests.helpers import rows, still_job, write_manifest

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _astronaut_png() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "PNG")
    return buf.getvalue()


def _records(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read_results(OutputLayout(str(out))).to_pylist()}


def test_a_streak_of_infra_failures_stops_the_job_and_a_plain_rerun_redoes_them(tmp_path: Path) -> None:
    png = _astronaut_png()
    refusing = {"on": True}

    def answer(method: str, path: str, n: int) -> Reply:
        if refusing["on"]:
            return Reply(403, b"<Error><Code>ExpiredToken</Code></Error>")
        return Reply(200, png, {"Content-Type": "image/png"})

    with scripted_http_server(answer) as server:
        manifest = write_manifest(tmp_path / "m.parquet", rows(20, portrait=f"{server.url}/portraits/a.png"))
        out = tmp_path / "out"
        job = still_job(
            manifest,
            str(out),
            resources={"replicas": 1, "cpus_per_replica": 0.25, "in_flight_per_replica": 1},
            runtime={"max_attempts": 2, "infra_abort_after": 3},
            identity={"enabled": False},
        )
        with pytest.raises(JobAborted, match=r"3 rows in a row failed on infrastructure faults .*\(403\)") as info:
            run_job(job, progress=False)
        assert "rerun the same command" in str(info.value)
        failed = _records(out)
        assert len(failed) == 3, "stopped at the streak, not after the whole manifest"
        assert {(r["status"], r["error_code"]) for r in failed.values()} == {("failed", "infra_error")}

        refusing["on"] = False  # credentials fixed
        summary = run_job(job, progress=False)
    recs = _records(out)
    assert len(recs) == 20 and {r["status"] for r in recs.values()} == {"ok"}
    assert summary.counts["ok"] == 20, "the infra_error rows were redone by a plain rerun"
