"""Sweeps (issue 10): a job's ``sweep:`` grid runs with every manifest row, one record per (row, config), resumable;
configs that change the model run as separate model groups, one after the other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm import open_results
from farm.cli import main
from farm.config import SpecError
from farm.runtime.driver import run_job
from farm.summary import summarize
from farm.sweep import expand, label, model_groups
from tests.helpers import rows, still_job, write_manifest

FAST = {"replicas": 1, "cpus_per_replica": 0.25}


def test_config_ids_are_stable_readable_and_distinct() -> None:
    configs = expand({"guidance_scale": [3.0, 5.0], "ip_scale": [1.0], "seed": [42, 43]})
    assert [c.id.rsplit("-", 1)[0] for c in configs] == [
        "g3.0-ip1.0-s42",
        "g3.0-ip1.0-s43",
        "g5.0-ip1.0-s42",
        "g5.0-ip1.0-s43",
    ]
    assert [c.id for c in configs] == [
        c.id for c in expand({"guidance_scale": [3.0, 5.0], "ip_scale": [1.0], "seed": [42, 43]})
    ]
    assert len({c.id for c in configs}) == 4
    assert label({"options.step_cache": {"every": 2}}).startswith("stepcache")
    assert expand({}) == []


def test_model_values_split_configs_into_groups() -> None:
    configs = expand({"variant": ["full", "lite"], "guidance_scale": [3.0, 5.0]})
    groups = model_groups(configs)
    assert [[c.values["variant"] for c in g] for g in groups] == [["full", "full"], ["lite", "lite"]]
    assert groups[0][0].row_values() == {"guidance_scale": 3.0} and groups[1][0].model_values() == {"variant": "lite"}


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"guidence_scale": [3.0]}, "did you mean 'guidance_scale'"),
        ({"num_frames": [6]}, r"sweep.num_frames: num_frames=6 must be 4k\+1"),
        ({"seed": []}, "non-empty list"),
        ({"step_cache": [None]}, "options.<name>"),
    ],
)
def test_a_bad_grid_is_a_spec_error(tmp_path: Path, sweep: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        still_job(str(tmp_path / "m.parquet"), str(tmp_path / "out"), sweep=sweep)


@pytest.mark.usefixtures("ray_cluster")
def test_a_grid_runs_every_row_in_every_config_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    out = str(tmp_path / "out")
    sweep = {"guidance_scale": [3.0, 5.0], "seed": [1, 2], "options.zoom": [1.0, 1.05]}
    job = still_job(manifest, out, resources=FAST, sweep=sweep)
    summary = run_job(job, progress=False)
    assert summary.counts["ok"] == 16
    assert summary.rows_seen == 16, "rows x configs, as recorded"
    assert summary.busy_fraction is not None and summary.first_dispatch_s is not None
    table = open_results(out)
    recs = table.to_pylist()
    assert len(recs) == 16 and len({r["id"] for r in recs}) == 16
    for rec in recs:
        assert rec["id"] == f"{rec['row_id']}__{rec['config_id']}" and rec["row_id"] in ("row-000", "row-001")
        assert Path(rec["video"]).name == f"{rec['id']}.mp4" and Path(rec["video"]).is_file()
        config = next(c for c in job.configs() if c.id == rec["config_id"])
        assert rec["guidance_scale"] == config.values["guidance_scale"] and rec["seed"] == config.values["seed"]
        assert json.loads(rec["model_config"])["options"]["zoom"] == config.values["options.zoom"]
    runs = json.loads((Path(out) / "_job.json").read_text())["runs"]
    assert len(runs) == 2  # two model groups (zoom 1.0 and 1.05), one after the other
    assert sorted(r["spec"]["model"]["options"]["zoom"] for r in runs) == [1.0, 1.05]
    per_config = summarize(table)
    assert per_config.num_rows == 8 and set(per_config.column("ok").to_pylist()) == {2}

    again = run_job(job, progress=False)
    assert again.already_committed == 16 and sum(again.counts.values()) == 0

    assert main(["compare", out]) == 0  # one sweep output: its configs side by side, joined by row
    compared = capsys.readouterr().out
    assert all(c.id in compared for c in job.configs()) and "row-001" in compared

    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(job.model_dump(mode="json")))
    assert main(["validate", str(spec)]) == 0
    assert "sweep: 8 configs x 2 rows = 16 videos" in capsys.readouterr().out


def test_every_model_group_of_a_sweep_runs_on_the_ray_the_farm_started(tmp_path: Path) -> None:
    """`farm run` with no cluster starts its own Ray, where replicas asking for a GPU fall back to the CPU; the second
    model group found that Ray already up, took it for a cluster someone chose, and waited for GPUs forever."""
    import os
    import subprocess
    import sys

    import yaml

    spec = {
        "manifest": write_manifest(tmp_path / "m.parquet", rows(2)),
        "output": str(tmp_path / "out"),
        "model": {"backend": "simulated"},
        "resources": {"replicas": 1, "gpus_per_replica": 1, "cpus_per_replica": 0.25},
        "identity": {"enabled": False},
        "sweep": {"options.gpu_time_s": [0.0, 0.01]},  # two model groups
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "farm.cli", "run", str(path), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(done.stdout)["counts"]["ok"] == 4
