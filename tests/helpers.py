"""Small builders shared by tests (manifests, job specs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from farm.config import JobSpec, parse_job

ASTRONAUT = "pkg://skimage/data/astronaut.png"
TOM_HANKS = "pkg://insightface/data/images/Tom_Hanks_54745.png"
SIX_FACES = "pkg://insightface/data/images/t1.jpg"


def write_manifest(path: str | Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist alone would keep the first row's keys
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows], schema=schema)
    pq.write_table(table, str(path))
    return str(path)


def rows(n: int, portrait: str = ASTRONAUT, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": f"row-{i:03d}", "portrait": portrait, "prompt": f"a person, take {i}", **extra} for i in range(n)]


def still_job(manifest: str, output: str, **sections: Any) -> JobSpec:
    """A job on the `still` baseline (real, no ML): tiny frames so runtime tests stay fast."""
    data: dict[str, Any] = {
        "name": "test",
        "manifest": manifest,
        "output": output,
        "model": {"backend": "still"},
        "defaults": {"num_frames": 5, "height": 32, "width": 48, "fps": 8},
        "identity": {"enabled": False},
        "runtime": {"commit_every_rows": 4, "commit_every_s": 0.5},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_job(data)


def farm_run_process(spec: str | Path, address: str, progress: bool = False) -> subprocess.Popen:
    """`farm run SPEC` as its own process joined to the Ray cluster at ``address`` (as under ``ray job submit``);
    stdout and stderr together, as text (not a terminal: with ``progress``, plain progress lines)."""
    env = {**os.environ, "RAY_ADDRESS": address}
    return subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "run", str(spec), *([] if progress else ["--no-progress"])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
