"""Export throughput benchmark: ``farm export`` of a local output to local disk, for each format (issue 9 point 6).

The output is built once: ``--clips`` distinct real H.264 clips made with ``farm.video.encode_mp4`` (a moving
gradient with noise, ``--frames`` frames of ``--size`` pixels) written as ``--rows`` videos under ``<out>/videos/``
(clip ``i % clips`` for row ``i``: every file is a real mp4, and encoding 2,000 of them would time ffmpeg, not the
export), one Parquet log part of ``ok`` records, and a ``_job.json``. Then, for each format, a fresh export into an
empty destination (timed), and a rerun into the same destination (every shard complete: it measures the resume check).

    python benchmarks/bench_export.py --out export.json      # 2,000 videos, shards of 500
    python benchmarks/bench_export.py --quick                # 200 videos

Throughput is videos and video megabytes (10^6 bytes, the mp4 bytes read from the output) per second of wall time,
page cache warm (the output was just written). The process exits 1 if an export did not hold every row.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from farm import __version__, storage
from farm.export import export_output
from farm.results import result_schema
from farm.storage import OutputLayout
from farm.video import encode_mp4

FORMATS = ("webdataset", "hf", "parquet")
RUN_ID = "20261126T000000-bench0"


def make_clips(n: int, frames: int, size: int) -> list[bytes]:
    """``n`` distinct short clips: a gradient sliding over the frames, plus a little noise (so they do not shrink to
    nothing, like generated video)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    clips = []
    for i in range(n):
        video = np.empty((frames, size, size, 3), np.float32)
        for f in range(frames):
            shift = np.roll(ramp, 4 * f + 7 * i)
            video[f] = shift[None, :, None] * np.array([1.0, 0.6, 0.3]) + rng.normal(0, 12, (size, size, 3))
        clips.append(encode_mp4(np.clip(video, 0, 255).astype(np.uint8), 8, {"comment": "AI-generated video"}))
    return clips


def make_output(root: Path, rows: int, clips: list[bytes]) -> tuple[OutputLayout, int]:
    """An output of ``rows`` ok records and their videos; returns it and the total video bytes."""
    layout = OutputLayout(str(root))
    records, total = [], 0
    for i in range(rows):
        row_id = f"clip-{i:06d}"
        data = clips[i % len(clips)]
        video = layout.video(row_id)
        storage.write_bytes_atomic(video, data)
        total += len(data)
        records.append(
            {
                "id": row_id,
                "status": "ok",
                "video": video,
                "portrait": "pkg://skimage/data/astronaut.png",
                "prompt": f"a person turns to the camera and smiles, take {i}",
                "fps": 8,
                "seed": i,
                "model": "simulated",
                "identity_mean": 0.4 + (i % 50) / 100,
                "face_rate": 1.0,
                "run_seq": 1,
                "run_id": RUN_ID,
            }
        )
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, result_schema()), buf)
    storage.write_bytes_atomic(layout.log_part(1, RUN_ID, 0), buf.getvalue())
    job = {"name": "bench-export", "farm_version": __version__, "spec": {}, "runs": []}
    job["model"] = {"backend": "simulated", "variant": None, "description": "simulated", "fingerprint": "bench"}
    layout.write_json(layout.job_json, job)
    return layout, total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_format(layout: OutputLayout, fmt: str, dest: Path, args: argparse.Namespace, video_bytes: int) -> dict:
    start = time.perf_counter()
    summary = export_output(layout.root, fmt, str(dest), shard_size=args.shard_size)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    rerun = export_output(layout.root, fmt, str(dest), shard_size=args.shard_size)
    rerun_wall = time.perf_counter() - start
    exported = summary["counts"]["exported"]
    return {
        "format": fmt,
        "exported": exported,
        "shards": summary["shards"],
        "wall_s": round(wall, 3),
        "videos_per_s": round(exported / wall, 1),
        "video_mb_per_s": round(video_bytes / 1e6 / wall, 1),
        "dest_mb": round(dir_bytes(dest) / 1e6, 1),
        "rerun_wall_s": round(rerun_wall, 3),
        "rerun_skipped": rerun["shards_skipped"],
        "ok": exported == args.rows and rerun["shards_skipped"] == summary["shards"],
    }


def report(res: dict[str, Any]) -> list[str]:
    lines = [
        f"`{res['command']}`",
        "",
        f"# export benchmark: {res['rows']} videos ({res['clips']} distinct real H.264 clips, {res['frames']} frames "
        f"{res['size']}x{res['size']}, {res['video_mb']:.1f} MB in all, {res['video_kb_mean']:.1f} kB each), "
        f"shards of {res['shard_size']}, local disk to local disk",
        "",
        f"machine: {res['machine']}, {res['cpus']} CPU cores, Python {res['python']}, farm {res['farm_version']}. "
        "Other developers may have been running tests on this machine at the same time: wall times are indicative.",
        "",
        "| format | exported | shards | wall s | videos/s | MB/s (video bytes) | destination MB "
        "| rerun (all shards complete) s | rerun skipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["formats"]:
        lines.append(
            f"| {r['format']} | {r['exported']} | {r['shards']} | {r['wall_s']} | {r['videos_per_s']} "
            f"| {r['video_mb_per_s']} | {r['dest_mb']} | {r['rerun_wall_s']} | {r['rerun_skipped']} |"
        )
    lines += ["", f"checks: {'PASS' if all(r['ok'] for r in res['formats']) else 'FAIL'}", ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke check: 200 videos")
    parser.add_argument("--rows", type=int, default=None, help="videos in the output (default 2000; quick 200)")
    parser.add_argument("--clips", type=int, default=50, help="distinct clips encoded")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--size", type=int, default=128, help="clip width = height, pixels")
    parser.add_argument("--shard-size", type=int, default=500, help="rows per shard")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--md", help="write the markdown report here")
    parser.add_argument("--keep", help="keep the output and exports in this folder (default: a tmp folder)")
    args = parser.parse_args()
    args.rows = args.rows or (200 if args.quick else 2000)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-export-"))
    try:
        clips = make_clips(args.clips, args.frames, args.size)
        layout, video_bytes = make_output(work / "out", args.rows, clips)
        results = []
        for fmt in args.formats.split(","):
            print(f"{fmt} ...", flush=True)
            results.append(bench_format(layout, fmt, work / f"export-{fmt}", args, video_bytes))
            print(f"  {results[-1]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res = {
        "command": shlex.join(["python", "benchmarks/bench_export.py", *sys.argv[1:]]),
        "rows": args.rows,
        "clips": args.clips,
        "frames": args.frames,
        "size": args.size,
        "shard_size": args.shard_size,
        "video_mb": video_bytes / 1e6,
        "video_kb_mean": video_bytes / 1e3 / args.rows,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "farm_version": __version__,
        "formats": results,
    }
    text = "\n".join(report(res))
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    if args.md:
        Path(args.md).write_text(text)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
