"""Farm runtime benchmark on fake GPUs with the benchmark-only ``simulated`` backend (it sleeps a fixed "GPU time").

Measures, side by side in one run:
  1. farm efficiency = measured throughput / ideal (rows x gpu_time / replicas), vs Ray Data ``map_batches`` with an
     actor pool on the same backend and per-row work, and vs a naive per-row loop that reloads the model every row;
  2. GPU-busy fraction when every row also carries CPU pre/post work of half the GPU time;
  3. a 1,000,000-row manifest: driver peak RSS and time to first dispatch.

    python benchmarks/bench_runtime.py                      # all three (about 10 minutes on 2 cores)
    python benchmarks/bench_runtime.py --only efficiency --rows 1000 --gpu-time 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from farm import storage
from farm.config import parse_job
from farm.manifest import RowDefaults, resolve_row
from farm.models.simulated import SimulatedBackend
from farm.types import ModelSpec
from farm.video import encode_mp4

PORTRAIT = "pkg://skimage/data/astronaut.png"
REPLICAS = 8


def write_manifest(path: Path, n: int, distinct_portraits: bool = False) -> str:
    portraits = [PORTRAIT] * n
    if distinct_portraits:
        src = Path(storage.resolve_pkg_uri(PORTRAIT)).read_bytes()
        folder = path.parent / "portraits"
        folder.mkdir(exist_ok=True)
        for i in range(n):
            (folder / f"p{i}.png").write_bytes(src)
        portraits = [str(folder / f"p{i}.png") for i in range(n)]
    table = pa.table(
        {
            "id": [f"row-{i:07d}" for i in range(n)],
            "portrait": portraits,
            "prompt": [f"a person, take {i}" for i in range(n)],
        }
    )
    pq.write_table(table, path, row_group_size=65536)
    return str(path)


def sim_job(manifest: str, output: str, options: dict[str, float], replicas: int = REPLICAS) -> Any:
    return parse_job(
        {
            "name": "bench",
            "manifest": manifest,
            "output": output,
            "model": {"backend": "simulated", "options": options},
            "identity": {"enabled": False},
            "resources": {
                "replicas": replicas,
                "gpus_per_replica": 1,
                "cpus_per_replica": 0.01,
                "in_flight_per_replica": 3,
            },
            "runtime": {"commit_every_rows": 256, "commit_every_s": 5},
        }
    )


def bench_farm(manifest: str, out: str, options: dict[str, float]) -> dict[str, Any]:
    from farm.runtime.driver import run_job

    t0 = time.perf_counter()
    summary = run_job(sim_job(manifest, out, options), progress=False)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "busy_fraction": summary.busy_fraction,
        "ok": summary.counts["ok"],
        "first_dispatch_s": summary.first_dispatch_s,
        "steady_s": summary.elapsed_s - summary.first_dispatch_s,
    }


class _RayDataReplica:
    """Ray Data's actor-pool UDF doing the same per-row work as a farm replica (generate, encode, write)."""

    def __init__(self, options: dict[str, float], out: str) -> None:
        self.first_call: float | None = None
        self.backend = SimulatedBackend(ModelSpec(backend="simulated", options=options))
        self.backend.setup("cpu")
        self.out = out
        self.defaults = RowDefaults(self.backend.default_params(), "", 42)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.first_call is None:  # for the steady-state window: the earliest first call over all actors
            self.first_call = time.time()
            Path(self.out).mkdir(parents=True, exist_ok=True)
            Path(self.out, f"first-call-{os.getpid()}").write_text(repr(self.first_call))
        ids = []
        for i in range(len(batch["id"])):
            row = {k: batch[k][i] for k in ("id", "portrait", "prompt")}
            request = resolve_row(row, self.defaults)
            image = storage.read_image(row["portrait"])
            subject = self.backend.prepare_subject(image)
            frames = self.backend.postprocess(self.backend.generate(subject, request), request)
            storage.write_bytes_atomic(f"{self.out}/videos/{request.id}.mp4", encode_mp4(frames, 8))
            ids.append(request.id)
        return {"id": ids, "status": ["ok"] * len(ids)}


def bench_ray_data(manifest: str, out: str, options: dict[str, float]) -> dict[str, Any]:
    import ray.data

    rows = pq.read_metadata(manifest).num_rows
    t0 = time.perf_counter()
    ds = (
        ray.data.read_parquet(manifest)
        .repartition(rows)
        .map_batches(
            _RayDataReplica,
            fn_constructor_kwargs={"options": options, "out": out},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=REPLICAS),
            num_gpus=1,
            num_cpus=0.01,
        )
    )
    ds.write_parquet(f"{out}/results")
    wall = time.perf_counter() - t0
    end = time.time()
    first = min(float(p.read_text()) for p in Path(out).glob("first-call-*"))
    done = pq.read_table(f"{out}/results").num_rows
    return {"wall_s": wall, "ok": done, "steady_s": end - first}


def bench_naive(manifest: str, out: str, options: dict[str, float], rows: int) -> dict[str, Any]:
    """Each row is a task that loads the model, generates, encodes, writes (8 at a time on 8 GPUs)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0.01)
    def one_row(row: dict[str, Any]) -> str:
        return _RayDataReplica(options, out)({k: [v] for k, v in row.items()})["id"][0]

    table = pq.read_table(manifest).slice(0, rows).to_pylist()
    t0 = time.perf_counter()
    done = ray.get([one_row.remote(r) for r in table])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ok": len(done), "steady_s": wall}


def efficiency(rows: int, wall: float, gpu_time: float) -> float:
    return rows * gpu_time / REPLICAS / wall


def section_efficiency(tmp: Path, rows: int, gpu_time: float, load_time: float, naive_rows: int) -> list[list[Any]]:
    manifest = write_manifest(tmp / "eff.parquet", rows)
    options = {"gpu_time_s": gpu_time, "load_time_s": load_time}
    farm = bench_farm(manifest, str(tmp / "farm-out"), options)
    rd = bench_ray_data(manifest, str(tmp / "raydata-out"), options)
    naive = bench_naive(manifest, str(tmp / "naive-out"), options, naive_rows)
    out = []
    for name, res in (
        ("farm (this repo)", farm),
        ("Ray Data map_batches + ActorPool", rd),
        ("naive per-row loop (reload each row)", naive),
    ):
        out.append(
            [
                name,
                res["ok"],
                f"{res['wall_s']:.1f}",
                f"{efficiency(res['ok'], res['wall_s'], gpu_time):.3f}",
                f"{efficiency(res['ok'], res['steady_s'], gpu_time):.3f}",
            ]
        )
    return out


def section_busy(tmp: Path, rows: int, gpu_time: float) -> dict[str, Any]:
    manifest = write_manifest(tmp / "busy.parquet", rows, distinct_portraits=True)
    options = {"gpu_time_s": gpu_time, "prep_time_s": gpu_time / 4, "post_time_s": gpu_time / 4}
    return bench_farm(manifest, str(tmp / "busy-out"), options)


def section_scale(tmp: Path, rows: int, watch_s: float, address: str) -> dict[str, Any]:
    import psutil

    t0 = time.perf_counter()
    manifest = write_manifest(tmp / "million.parquet", rows)
    made = time.perf_counter() - t0
    spec = tmp / "million.yaml"
    job = sim_job(manifest, str(tmp / "million-out"), {"gpu_time_s": 0.05}).model_dump(mode="json")
    spec.write_text(json.dumps(job))
    env = {**os.environ, "RAY_ADDRESS": address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "run", str(spec), "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    handle = psutil.Process(proc.pid)
    peak = 0
    end = time.time() + watch_s
    while time.time() < end and proc.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    meta = json.loads((tmp / "million-out" / "_job.json").read_text())
    run = meta["runs"][-1]
    return {
        "rows": rows,
        "manifest_write_s": made,
        "peak_rss_mib": peak / 2**20,
        "first_dispatch_s": run.get("first_dispatch_s"),
        "rows_done_in_window": run.get("counts", {}).get("ok"),
        "watch_s": watch_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["efficiency", "busy", "scale"], action="append")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--gpu-time", type=float, default=1.0, help="simulated GPU seconds per row")
    parser.add_argument("--load-time", type=float, default=3.0, help="simulated model load seconds")
    parser.add_argument("--naive-rows", type=int, default=48, help="rows for the naive loop (it is slow)")
    parser.add_argument("--busy-rows", type=int, default=400)
    parser.add_argument("--scale-rows", type=int, default=1_000_000)
    parser.add_argument("--scale-watch", type=float, default=45.0, help="seconds to watch the 1M-row driver")
    args = parser.parse_args()
    sections = args.only or ["efficiency", "busy", "scale"]

    import ray

    ray.init(num_cpus=2, num_gpus=REPLICAS, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    print(f"# farm runtime benchmark: {REPLICAS} fake GPUs, 2 CPU cores, simulated backend")
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if "efficiency" in sections:
            table = section_efficiency(tmp, args.rows, args.gpu_time, args.load_time, args.naive_rows)
            print(
                f"\n## efficiency: {args.rows} rows, gpu_time {args.gpu_time}s/row, load {args.load_time}s, "
                f"ideal {args.rows * args.gpu_time / REPLICAS:.1f}s (wall includes replica start-up)"
            )
            print("| scheduler | rows | wall s | efficiency (wall) | efficiency (steady state) |")
            print("|---|---|---|---|---|")
            for row in table:
                print("| " + " | ".join(str(c) for c in row) + " |")
        if "busy" in sections:
            busy = section_busy(tmp, args.busy_rows, args.gpu_time)
            print(
                f"\n## GPU-busy fraction with CPU pre+post work = 0.5 x gpu_time ({args.busy_rows} rows, distinct "
                f"portraits): {busy['busy_fraction']:.3f} (wall {busy['wall_s']:.1f}s, ok {busy['ok']})"
            )
        if "scale" in sections:
            scale = section_scale(tmp, args.scale_rows, args.scale_watch, ray.get_runtime_context().gcs_address)
            print(
                f"\n## {scale['rows']:,}-row manifest: driver peak RSS {scale['peak_rss_mib']:.0f} MiB, "
                f"first dispatch {scale['first_dispatch_s']:.2f}s, {scale['rows_done_in_window']} rows done in the "
                f"{scale['watch_s']:.0f}s window (manifest written in {scale['manifest_write_s']:.1f}s)"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
