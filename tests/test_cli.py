"""The ``farm`` CLI without Ray: validate, score (resumable), status, results, schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from farm.cli import main
from farm.storage import OutputLayout, read_image
from farm.table import read_results
from farm.video import encode_mp4
from tests.helpers import ASTRONAUT, SIX_FACES, TOM_HANKS, rows, write_manifest


def _job(tmp_path: Path, manifest: str, **extra) -> Path:
    spec = {
        "manifest": manifest,
        "output": str(tmp_path / "out"),
        "model": {"backend": "still"},
        "identity": {"enabled": False},
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_validate_counts_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = rows(3) + [
        {"id": "row-000", "portrait": ASTRONAUT, "prompt": "dup"},
        {"id": "bad/id", "portrait": ASTRONAUT, "prompt": "p"},
        {"id": "e1", "portrait": ASTRONAUT, "prompt": ""},
        {"id": "e2", "portrait": ASTRONAUT, "prompt": None},
        {"id": "big", "portrait": ASTRONAUT, "prompt": "p", "height": 4096},
        {"id": "gone", "portrait": str(tmp_path / "gone.png"), "prompt": "p"},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", data)
    assert main(["validate", str(_job(tmp_path, manifest))]) == 1
    out = capsys.readouterr().out
    assert "rows: 9  valid: 3  invalid: 6" in out
    for code, n in (("duplicate_id", 1), ("bad_id", 1), ("empty_prompt", 2), ("bad_param", 1)):
        assert any(line.split() == [code, str(n)] for line in out.splitlines()), (code, out)
    assert main(["validate", str(_job(tmp_path, manifest)), "--check-portraits"]) == 1
    out = capsys.readouterr().out
    assert any(line.split() == ["portrait_unreadable", "1"] for line in out.splitlines()), out
    good = write_manifest(tmp_path / "good.parquet", rows(2))
    assert main(["validate", str(_job(tmp_path, manifest)), "--manifest", good]) == 0


def test_validate_reports_spec_and_schema_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    assert main(["validate", str(_job(tmp_path, manifest))]) == 2
    assert "lacks required column(s) ['portrait']" in capsys.readouterr().err
    assert main(["validate", str(_job(tmp_path, manifest, defaults={"guidance_scale": -2}))]) == 2
    assert "guidance_scale=-2.0 is out of range" in capsys.readouterr().err


def _still_video(path: Path, portrait: str, frames: int = 8) -> str:
    img = read_image(portrait)
    path.write_bytes(encode_mp4(np.repeat(img[None], frames, axis=0), 8))
    return str(path)


def test_score_is_resumable_and_scores_real_faces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(encode_mp4(rng.integers(0, 255, (8, 128, 128, 3), dtype=np.uint8), 8))
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(read_image(ASTRONAUT)).save(frames_dir / f"f{i}.png")
    data = [
        {"id": "same", "portrait": ASTRONAUT, "video": _still_video(tmp_path / "a.mp4", ASTRONAUT), "gen": "x"},
        {"id": "other", "portrait": TOM_HANKS, "video": str(tmp_path / "a.mp4"), "gen": "x"},
        {"id": "noise", "portrait": ASTRONAUT, "video": str(noise), "gen": "y"},
        {"id": "dir", "portrait": ASTRONAUT, "video": str(frames_dir), "gen": "z"},
        {"id": "missing", "portrait": ASTRONAUT, "video": str(tmp_path / "none.mp4"), "gen": "z"},
    ]
    manifest = write_manifest(tmp_path / "score.parquet", data[:3])
    out = str(tmp_path / "scores")
    assert main(["score", manifest, "--output", out, "--frames", "4", "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    first = {r["id"]: r for r in read_results(OutputLayout(out)).to_pylist()}
    assert first["same"]["identity_mean"] > 0.9 and first["same"]["identity_distance_mean"] < 0.6
    assert first["other"]["identity_distance_mean"] > 0.6
    assert first["same"]["identity_mean"] > first["other"]["identity_mean"]
    assert first["noise"]["identity_mean"] is None and first["noise"]["face_rate"] == 0.0
    assert first["same"]["gen"] == "x"
    # rerun with more rows: only the new ones are scored
    manifest = write_manifest(tmp_path / "score.parquet", data)
    assert main(["score", manifest, "--output", out, "--frames", "4", "--workers", "1", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"already_committed": 3, "ok": 1, "failed": 1}
    final = {r["id"]: r for r in read_results(OutputLayout(out)).to_pylist()}
    assert set(final) == {"same", "other", "noise", "dir", "missing"}
    assert final["dir"]["face_frames"] == 3
    assert final["missing"]["error_code"] == "video_unreadable"
    assert sum(pq.read_metadata(p).num_rows for p in OutputLayout(out).log_parts()) == 5


def test_status_and_results_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = [{"id": "a", "portrait": SIX_FACES, "video": str(tmp_path / "none.mp4")}]
    out = str(tmp_path / "scores")
    assert (
        main(
            ["score", write_manifest(tmp_path / "m.parquet", data), "--output", out, "--no-progress", "--workers", "1"]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    assert "records: 1" in text and "video_unreadable" in text
    assert main(["results", out, "--format", "jsonl"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("}\n") and all(json.loads(x) for x in printed.split("\n")[:-1]), "JSON lines, no blank"
    line = json.loads(printed.strip())
    assert line["id"] == "a" and line["status"] == "failed"
    target = tmp_path / "export.parquet"
    assert main(["results", out, "--format", "parquet", "--to", str(target)]) == 0
    assert pq.read_table(target).num_rows == 1
    assert main(["results", out]) == 0
    assert "video_unreadable" in capsys.readouterr().out


def test_schemas_command_writes_files(tmp_path: Path) -> None:
    assert main(["schemas", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "job.schema.json",
        "manifest.schema.json",
        "result.schema.json",
    ]


def test_status_and_exports_survive_nested_and_extreme_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scored-only outputs (no generate_s), nested carried columns and a timestamp past year 9999."""
    import datetime as dt

    import pyarrow as pa

    from farm.results import result_schema

    schema = result_schema(pa.schema([("tags", pa.list_(pa.string())), ("far", pa.timestamp("ms"))]))
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    table = pa.Table.from_pylist(
        [
            {"id": "a", "status": "ok", "committed_at": now, "tags": ["x", "y"]},
            {"id": "b", "status": "ok", "committed_at": now},
        ],
        schema=schema,
    )
    far = pa.array([300_000_000_000_000, None], pa.timestamp("ms"))  # beyond datetime's range
    table = table.set_column(schema.get_field_index("far"), "far", far)
    layout = OutputLayout(str(tmp_path / "out"))
    Path(layout.log_dir).mkdir(parents=True)
    pq.write_table(table, layout.log_part(0, "r", 0))
    assert main(["status", layout.root]) == 0
    assert "generate_s mean: -" in capsys.readouterr().out
    assert main(["results", layout.root, "--format", "csv"]) == 0
    assert '"[""x"", ""y""]"' in capsys.readouterr().out
    assert main(["results", layout.root, "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["tags"] == ["x", "y"] and lines[0]["far"] is not None and lines[1]["far"] is None


def test_compare_joins_outputs_by_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import datetime as dt

    from farm.records import Record
    from farm.results import result_schema, write_part

    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    lynx, still = OutputLayout(str(tmp_path / "lynx")), OutputLayout(str(tmp_path / "still"))
    write_part(
        lynx,
        1,
        "r",
        0,
        [
            Record.from_row({"id": "a", "status": "ok", "identity_mean": 0.6, "face_rate": 1.0, "committed_at": now}),
            Record.from_row({"id": "b", "status": "ok", "identity_mean": None, "face_rate": 0.0, "committed_at": now}),
            Record.from_row({"id": "c", "status": "failed", "error_code": "no_face", "committed_at": now}),
        ],
        result_schema(),
    )
    write_part(
        still,
        1,
        "r",
        0,
        [
            Record.from_row({"id": "a", "status": "ok", "identity_mean": 0.8, "face_rate": 1.0, "committed_at": now}),
            Record.from_row({"id": "b", "status": "ok", "identity_mean": 0.9, "face_rate": 1.0, "committed_at": now}),
        ],
        result_schema(),
    )
    target = tmp_path / "cmp.csv"
    assert main(["compare", lynx.root, still.root, "--to", str(target)]) == 0
    out = capsys.readouterr().out
    assert "mean lynx/still over rows scored in both: 0.7500" in out
    summary = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:3]}
    assert summary["lynx"] == ["3", "2", "0.6000", "0.5000"] and summary["still"] == ["2", "2", "0.8500", "1.0000"]
    rows = target.read_text().splitlines()
    assert rows[0] == '"row","lynx","still","lynx/still"' and len(rows) == 4


def _running_output(tmp_path: Path, runs: list[dict]) -> str:
    """An output with one committed record and a ``_job.json`` holding ``runs`` (no fingerprint yet)."""
    import datetime as dt

    from farm.records import Record
    from farm.results import result_schema, write_part

    layout = OutputLayout(str(tmp_path / "out"))
    now = dt.datetime.now(dt.timezone.utc)
    write_part(layout, 1, "r", 0, [Record.from_row({"id": "a", "status": "ok", "committed_at": now})], result_schema())
    for run in runs:
        run.setdefault("heartbeat_at", now.isoformat())
    model = {"backend": "still", "description": "still baseline", "fingerprint": None}
    layout.write_json(layout.job_json, {"name": "demo", "model": model, "runs": runs})
    return layout.root


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


RUNNING = {
    "run_id": "run-1",
    "run_seq": 1,
    "status": "running",
    "heartbeat_every_s": 30,
    "last_commit_at": None,
    "progress": {"rows_done": 0, "rows_total": 40, "rows_per_s": None, "eta_s": None},
}


def test_status_of_a_starting_run_prints_plain_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing known yet (no fingerprint, rate, commit): ``-``; replicas in words, never a Python dict or None."""
    from farm.lease import OutputLease

    progress = {**RUNNING["progress"], "replicas": {"pending": 1, "ready": 0, "wanted": 1}}
    out = _running_output(tmp_path, [{**RUNNING, "progress": progress}])
    lease = OutputLease(out, run_id="run-1", ttl_s=300).acquire()
    try:
        assert main(["status", out]) == 0
    finally:
        lease.release()
    text = capsys.readouterr().out
    assert "None" not in text and "{" not in text, text
    assert "fingerprint: -" in text and "rate: - rows/s" in text and "last commit: -" in text, text
    assert "rows: 0/40" in text and "replicas: 0/1 ready (+1 loading or waiting)" in text, text
    assert "lease: run run-1 on host" in text and "(in " in text, text


@pytest.mark.parametrize("how", ["killed", "expired"])
def test_status_says_a_dead_runs_lease_is_not_held(tmp_path: Path, how: str) -> None:
    """A SIGKILLed driver (its pid is gone on this host) or an expired lease: the lease line must not read as live."""
    import time

    from farm.lease import OutputLease
    from farm.report import status_dict, status_text

    out = _running_output(tmp_path, [dict(RUNNING)])
    if how == "killed":
        lease = OutputLease(out, run_id="run-1", ttl_s=300)
        lease.pid = _dead_pid()
    else:
        lease = OutputLease(out, run_id="run-1", ttl_s=60, clock=lambda: time.time() - 600)
    lease.acquire()
    text = status_text(out)
    assert "run run-1 (#1): running but its driver is gone" in text and "no longer holds the output lease" in text
    lease_line = next(line for line in text.splitlines() if line.startswith("lease:"))
    assert lease_line.startswith("lease: run run-1 on host") and "(in " not in lease_line, lease_line
    assert "not held" in lease_line and "the next run takes the output over" in lease_line, lease_line
    assert re.search("its process is gone" if how == "killed" else r"expired 54[01] s ago", lease_line), lease_line
    assert status_dict(out)["lease"]["live"] is False


@pytest.mark.parametrize(("rows_done", "shown"), [(0, None), (None, None), (7, "(rows done by then: 7)")])
def test_interrupted_run_shows_rows_done_only_when_known(tmp_path: Path, rows_done: int | None, shown: str) -> None:
    from farm.report import status_text

    ended = "interrupted: its driver stopped without a final update; run #2 took over the output"
    run = {**RUNNING, "status": "interrupted", "ended_by": ended, "progress": {"rows_done": rows_done}}
    line = next(li for li in status_text(_running_output(tmp_path, [run])).splitlines() if li.startswith("run "))
    assert line == f"run run-1 (#1): interrupted: {ended}" + (f" {shown}" if shown else ""), line


def test_results_to_a_file_writes_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--to`` writes whatever the format (the text table too); without --format the extension picks it."""
    import pyarrow.csv as pacsv

    out = _running_output(tmp_path, [])
    assert main(["results", out, "--to", str(tmp_path / "r.txt")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 1 records to {tmp_path / 'r.txt'}"
    assert (tmp_path / "r.txt").read_text().splitlines()[0].split()[:2] == ["id", "status"]
    assert main(["results", out, "--to", str(tmp_path / "r.csv")]) == 0
    assert pacsv.read_csv(tmp_path / "r.csv").column("id").to_pylist() == ["a"]
    assert main(["results", out, "--to", str(tmp_path / "r.parquet")]) == 0
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 1
    assert main(["results", out, "--format", "jsonl", "--to", str(tmp_path / "r.jsonl")]) == 0
    assert json.loads((tmp_path / "r.jsonl").read_text())["id"] == "a"
    assert main(["results", out, "--format", "table", "--to", str(tmp_path / "plain")]) == 0
    assert "status" in (tmp_path / "plain").read_text()
    assert main(["compare", out, out, "--to", str(tmp_path / "cmp.parquet")]) == 0
    assert pq.read_table(tmp_path / "cmp.parquet").num_rows == 1
