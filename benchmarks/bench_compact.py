"""Compaction benchmark (issue 9): ``farm.publish.publish`` on an output whose log holds 1,000,000 records.

The log is built directly with pyarrow (vectorized; building a million ``Record`` objects would only time the
builder) in the exact layout and schema ``farm.results.ResultWriter`` writes: every core and identity column of
``farm.results.result_schema`` with realistic values (prompts, portrait URIs, sha256 fingerprints, timings, ~8 %
failed rows with an error code and message), plus 3 carried manifest columns (``campaign`` text, ``priority`` int32,
``lang`` text). The records are spread over 4 runs and ``--parts`` parts; later runs retry earlier ids, so about 10 %
of the records are superseded (run 1: 60 % of the ids; run 2: 20 % new + retries; run 3: 10 % new + retries; run 4:
retries only).

Each measurement runs in a fresh Python process, which reports its wall time and its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) next to its RSS after the imports:

1. ``publish`` on the fresh log (it consolidates the log's many small parts first, then publishes);
2. ``publish`` again on the consolidated log (what each later run's end costs when few parts were added);
3. ``farm.open_results`` (the in-memory reader; for comparison).

The published file is then checked: one row per distinct id, sorted, each id's record from its newest run.

    nice python benchmarks/bench_compact.py --out benchmarks/results/compact_cpu.json \\
        --md benchmarks/results/compact_cpu.md                 # 1,000,000 records, 400 parts (a few minutes)
    python benchmarks/bench_compact.py --records 50000 --parts 80  # smoke check

The process exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from farm.results import result_schema
from farm.storage import OutputLayout

CARRIED = pa.schema([("campaign", pa.string()), ("priority", pa.int32()), ("lang", pa.string())])
# run -> (share of all ids that are new in it, share of all ids it retries from earlier runs)
RUNS = ((0.60, 0.00), (0.20, 0.05), (0.10, 0.03), (0.00, 0.02))
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def _hex(rng: np.random.Generator, n: int, nbytes: int = 32) -> pa.Array:
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    return pa.array([row.tobytes().hex() for row in raw], pa.string())


def _part(rng: np.random.Generator, ids: np.ndarray, run_seq: int, run_id: str, schema: pa.Schema) -> pa.Table:
    """One part's records, column by column, in the results schema."""
    n = len(ids)
    names = [f"row-{i:07d}" for i in ids]
    failed = rng.random(n) < 0.08
    ok = ~failed
    f64 = lambda lo, hi: pa.array(rng.uniform(lo, hi, n))  # noqa: E731 - a local shorthand
    okf = lambda arr: pa.array(np.where(ok, arr, np.nan), from_pandas=True)  # noqa: E731
    cols: dict[str, Any] = {
        "id": names,
        "status": np.where(failed, "failed", "ok"),
        "error_code": pa.array(np.where(failed, "no_face", None)),
        "error_message": pa.array(np.where(failed, "no face found in the portrait; give a frontal photo", None)),
        "video": pa.array([f"s3://bucket/out/videos/{x}.mp4" if k else None for x, k in zip(names, ok, strict=True)]),
        "portrait": [f"s3://bucket/portraits/{i % 50_000:05d}.jpg" for i in ids],
        "prompt": [f"a person walking on a beach at sunset, cinematic, take {i}" for i in ids],
        "negative_prompt": pa.nulls(n, pa.string()),
        "num_frames": pa.array(np.full(n, 121), pa.int32()),
        "height": pa.array(np.full(n, 480), pa.int32()),
        "width": pa.array(np.full(n, 832), pa.int32()),
        "num_inference_steps": pa.array(np.full(n, 50), pa.int32()),
        "guidance_scale": np.full(n, 5.0),
        "guidance_scale_i": np.full(n, 2.0),
        "ip_scale": np.full(n, 1.0),
        "ref_scale": np.full(n, 1.0),
        "fps": pa.array(np.full(n, 16), pa.int32()),
        "seed": pa.array(rng.integers(0, 2**62, n), pa.int64()),
        "rights_confirmed": np.ones(n, bool),
        "model": np.full(n, "lynx-full"),
        "queue_s": f64(0, 30),
        "prepare_s": f64(0.1, 2),
        "generate_s": okf(rng.uniform(60, 200, n)),
        "encode_s": okf(rng.uniform(0.5, 3, n)),
        "score_s": okf(rng.uniform(1, 5, n)),
        "total_s": f64(60, 240),
        "replica": [f"replica-{i % 8}" for i in ids],
        "node": [f"node-{i % 4}" for i in ids],
        "gpu_ids": [str(i % 8) for i in ids],
        "attempts": pa.array(np.ones(n), pa.int32()),
        "committed_at": pa.array([T0 + dt.timedelta(hours=run_seq)] * n, pa.timestamp("ms", tz="UTC")),
        "run_seq": pa.array(np.full(n, run_seq), pa.int64()),
        "run_id": np.full(n, run_id),
        "model_config": np.full(n, '{"backend": "lynx", "variant": "full"}'),
        "model_fingerprint": np.full(n, "9f" * 32),
        "portrait_sha256": _hex(rng, n),
        "portrait_stamp": [f"ETag={i:032x}" for i in ids],
        "request_fingerprint": _hex(rng, n),
        "video_fingerprint": _hex(rng, n),
        "metrics_config": np.full(n, '{"recognizer": "antelopev2"}'),
        "metrics_fingerprint": np.full(n, "3c" * 32),
        "identity_mean": okf(rng.uniform(0.3, 0.8, n)),
        "identity_min": okf(rng.uniform(0.1, 0.3, n)),
        "identity_max": okf(rng.uniform(0.8, 0.9, n)),
        "identity_std": okf(rng.uniform(0, 0.1, n)),
        "identity_distance_mean": okf(rng.uniform(0.5, 1, n)),
        "identity_distance_min": okf(rng.uniform(0.3, 0.5, n)),
        "identity_distance_max": okf(rng.uniform(1, 1.3, n)),
        "face_frames": pa.array(np.where(ok, 121, 0), pa.int32()),
        "frames_scored": pa.array(np.where(ok, 121, 0), pa.int32()),
        "face_rate": okf(np.ones(n)),
        "identity_model": np.full(n, "antelopev2"),
        "row_id": names,
        "identity_temporal_mean": okf(rng.uniform(0.8, 1, n)),
        "identity_temporal_min": okf(rng.uniform(0.6, 0.8, n)),
        "motion_mean": okf(rng.uniform(0, 4, n)),
        "motion_pairs": pa.array(np.where(ok, 16, 0), pa.int32()),
        "motion_model": np.full(n, "opencv-farneback-5.0.0@w256,static<0.5"),
        "campaign": [f"campaign-{i % 12}" for i in ids],
        "priority": pa.array(ids % 5, pa.int32()),
        "lang": pa.array(np.array(["en", "de", "fr", "es"])[ids % 4]),
    }
    # columns a real log would hold null here (no sweep config, metrics that did not run) stay null
    return pa.table({f.name: _column(cols.get(f.name), f.type, n) for f in schema}, schema=schema)


def _column(values: Any, kind: pa.DataType, n: int) -> pa.Array:
    return pa.nulls(n, kind) if values is None else pa.array(values, kind)


def build_log(root: Path, records: int, parts: int, seed: int = 0) -> dict[str, Any]:
    """The 4 runs' parts under ``root/_log/``; returns the counts the checks need."""
    rng = np.random.default_rng(seed)
    layout = OutputLayout(str(root))
    schema = result_schema(CARRIED)
    total = sum(a + b for a, b in RUNS)
    n_ids = int(records * sum(a for a, _ in RUNS) / total)
    newest = np.zeros(n_ids, np.int64)
    start, written, part_rows = 0, 0, max(1, records // parts)
    os.makedirs(layout.log_dir, exist_ok=True)
    for run_seq, (new, retry) in enumerate(RUNS, start=1):
        fresh = np.arange(start, start + int(records * new / total))
        again = rng.choice(start, size=int(records * retry / total), replace=False) if retry else fresh[:0]
        start += len(fresh)
        ids = np.concatenate([fresh, np.sort(again)])
        newest[ids] = run_seq
        run_id = f"2026110{run_seq}T000000-{run_seq:06x}"
        for n, lo in enumerate(range(0, len(ids), part_rows)):
            table = _part(rng, ids[lo : lo + part_rows], run_seq, run_id, schema)
            pq.write_table(table, layout.log_part(run_seq, run_id, n), compression="zstd")
            written += table.num_rows
    return {"records": written, "ids": int(start), "newest_run_seq": newest[:start].tolist()}


def measure(what: str, root: Path) -> dict[str, Any]:
    """``what`` (publish | open_results | read_results) in a fresh process: its wall time, peak RSS and RSS after the
    imports. ``open_results`` right after ``publish`` reads the published file; ``read_results`` always merges the
    log in memory (what ``open_results`` does when the published table is stale)."""
    code = (
        "import json, resource, sys, time\n"
        "import farm.publish as p, farm.table as t\n"
        "from farm.storage import OutputLayout\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        f"layout = OutputLayout({str(root)!r})\n"
        f"what = {what!r}\n"
        "if what == 'publish':\n"
        "    out = p.publish(layout)\n"
        "else:\n"
        "    read = t.open_results(layout.root) if what == 'open_results' else t.read_results(layout)\n"
        "    out = {'rows': read.num_rows}\n"
        "wall = time.perf_counter() - start\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'wall_s': wall, 'peak_rss_mib': peak / 1024, 'import_rss_mib': base / 1024, **out}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(root: Path, built: dict[str, Any]) -> list[str]:
    """One row per distinct id, sorted by id, each from its newest run."""
    layout = OutputLayout(str(root))
    table = pq.read_table(layout.published, columns=["id", "run_seq"])
    problems = []
    ids = table.column("id").to_pylist()
    if len(ids) != built["ids"] or len(set(ids)) != len(ids):
        problems.append(f"published {len(ids)} rows ({len(set(ids))} distinct) for {built['ids']} ids")
    if ids != sorted(ids):
        problems.append("published rows are not sorted by id")
    got = table.column("run_seq").to_numpy()
    want = np.array(built["newest_run_seq"])[[int(i.split("-")[1]) for i in ids]]
    if len(got) == len(want) and (got != want).any():
        problems.append(f"{int((got != want).sum())} ids published from an older run than their newest")
    logged = sum(pq.read_metadata(p).num_rows for p in layout.log_parts())
    if logged != built["records"]:
        problems.append(f"the log holds {logged} records after compaction, {built['records']} before")
    if os.listdir(layout.results_dir) != ["results.parquet"]:
        problems.append(f"results/ holds {os.listdir(layout.results_dir)}")
    return problems


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}, pyarrow {pa.__version__}"
    )


def report(res: dict[str, Any]) -> list[str]:
    b = res["build"]
    lines = [
        f"`{res['command']}`",
        "",
        f"# compaction benchmark: {b['records']:,} records, {b['ids']:,} ids, {b['parts']} parts in 4 runs",
        "",
        f"Machine: {res['machine']}. Other developers may have been running tests on this machine at the same "
        "time: wall times are indicative. Each step ran in a fresh process; peak RSS is the process's ru_maxrss "
        f"(the imports alone: about {res['first']['import_rss_mib']:.0f} MiB).",
        "",
        f"Log built in {b['build_s']:.1f} s: {b['log_mib']:.1f} MiB of zstd Parquet "
        f"({b['records'] - b['ids']:,} superseded records, {(b['records'] - b['ids']) / b['records']:.1%}).",
        "",
        "| step | wall s | peak RSS MiB | parts before -> after | published rows | published MiB |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in (("first", "publish (consolidates, then publishes)"), ("again", "publish again (log compact)")):
        r = res[key]
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['parts_before']} -> {r['parts_after']} "
            f"| {r['ids_published']:,} | {r['bytes'] / 2**20:.1f} |"
        )
    for key, name in (
        ("open_results", "open_results (published table current: reads it)"),
        ("read_results", "read_results (merges the log in memory; open_results when stale)"),
    ):
        r = res[key]
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | - | {r['rows']:,} | - |")
    lines += ["", f"Checks: {'all passed' if not res['problems'] else '; '.join(res['problems'])}."]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--parts", type=int, default=400)
    ap.add_argument("--out", help="write the raw numbers as JSON here")
    ap.add_argument("--md", help="write the Markdown report here")
    ap.add_argument("--keep", help="build the output in this folder and keep it")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"command": "python " + shlex.join(sys.argv), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="bench-compact-") as tmp:
        root = Path(args.keep or tmp) / "out"
        start = time.perf_counter()
        built = build_log(root, args.records, args.parts)
        log_bytes = sum(p.stat().st_size for p in (root / "_log").iterdir())
        nparts = len(list((root / "_log").iterdir()))
        res["build"] = {"records": built["records"], "ids": built["ids"], "parts": nparts}
        res["build"].update(build_s=time.perf_counter() - start, log_mib=log_bytes / 2**20)
        print(f"built {built['records']:,} records in {nparts} parts; publishing ...", flush=True)
        res["first"] = measure("publish", root)
        res["problems"] = check(root, built)
        res["again"] = measure("publish", root)
        res["open_results"] = measure("open_results", root)
        res["read_results"] = measure("read_results", root)
        res["problems"] += check(root, built)
    lines = report(res)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
