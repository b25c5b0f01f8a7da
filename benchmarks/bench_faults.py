"""Fault-injection benchmark: the farm on a storage where a share of the calls fail or stall (issue 8).

The manifest, the portraits and the output live on ``flaky://`` (``benchmarks/flakyfs.py``): a local folder seen
through an fsspec filesystem that, for ``--rate`` of the calls (default 10 %) of every operation the farm uses (open,
cat, pipe, info, exists, ls, mv, rm, makedirs, ...), either raises a transient fault of a realistic kind (a reset
connection, a timeout, S3 503 SlowDown / 500 InternalError / 403 ExpiredToken as s3fs raises them, ...) or stalls
for 0.2-2 s and then succeeds. A share of the faults of writes and deletes happen after the change landed (a lost
acknowledgement). The wrapper is registered in the driver (this process) and in every Ray worker
(``runtime_env`` ``worker_process_setup_hook``); each process counts what it injected.

One Ray session (``ray.init(num_gpus=N)``: fake GPUs, 2 CPUs) runs the same job twice in this process with
``farm.runtime.driver.run_job`` on the benchmark-only ``simulated`` backend: a fault-free baseline (``flaky://``
with rate 0), then the faulty run. If a run raises, it is rerun (resumed, as an operator would) up to ``--max-runs``
times; every run's outcome is reported. Afterwards the results are read directly from the local folder (no
wrapper) and checked: rows lost (manifest ids without a record), duplicates (raw result-part rows minus distinct
ids), rows wrongly failed (any status but ok: every portrait is good) must be 0, and every run must finish.

    python benchmarks/bench_faults.py --out faults.json     # 1,000 rows, 8 fake GPUs (a few minutes on 2 cores)
    python benchmarks/bench_faults.py --quick               # smoke check: 200 rows, 4 fake GPUs
    python benchmarks/bench_faults.py --kinds all --quick   # also faults farm.faults does not take for transient

The process exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import flakyfs  # noqa: E402 - the benchmark folder is put on the path just above

from farm import storage  # noqa: E402
from farm.config import parse_job  # noqa: E402
from farm.faults import classify  # noqa: E402
from farm.storage import OutputLayout  # noqa: E402
from farm.table import read_results  # noqa: E402

PORTRAIT = "pkg://skimage/data/astronaut.png"
RETRY_RE = re.compile(r"^row (\S+): (.*) on (replica-\d+) \(attempt (\d+)\)")


# ------------------------------------------------------------------ setup
def write_inputs(data: Path, rows: int, portraits: int) -> tuple[str, list[str]]:
    """``portraits`` copies of the astronaut and a manifest of ``rows`` rows over them, written directly (no faults);
    returns the manifest's flaky:// URI and the ids."""
    src = Path(storage.resolve_pkg_uri(PORTRAIT)).read_bytes()
    folder = data / "portraits"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(portraits):
        (folder / f"p{i:03d}.png").write_bytes(src)
    ids = [f"row-{i:06d}" for i in range(rows)]
    table = pa.table(
        {
            "id": ids,
            "portrait": [f"flaky://{folder}/p{i % portraits:03d}.png" for i in range(rows)],
            "prompt": [f"a person, take {i}" for i in range(rows)],
        }
    )
    pq.write_table(table, data / "manifest.parquet")
    return f"flaky://{data / 'manifest.parquet'}", ids


def make_job(manifest: str, output: str, args: argparse.Namespace) -> Any:
    return parse_job(
        {
            "name": "bench-faults",
            "manifest": manifest,
            "output": output,
            "model": {"backend": "simulated", "options": {"gpu_time_s": args.gpu_time}},
            "identity": {"enabled": False},
            "resources": {
                "replicas": args.gpus,
                "gpus_per_replica": 1,
                "cpus_per_replica": 0.01,
                "in_flight_per_replica": 3,
            },
            "runtime": {"commit_every_rows": args.commit_rows, "commit_every_s": 2.0},
        }
    )


def set_control(path: Path, **settings: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings))
    os.replace(tmp, path)
    time.sleep(0.01)  # a new mtime for processes that compare it


class LogTally(logging.Handler):
    """Warnings and errors the farm logs in this process (the driver), by logger, with a few examples."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.by_logger: Counter[str] = Counter()
        self.row_retries: list[dict[str, Any]] = []
        self.examples: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must not break the benchmark
            message = str(record.msg)
        self.by_logger[f"{record.name} {record.levelname}"] += 1
        first = message.splitlines()[0] if message else ""
        m = RETRY_RE.match(first)
        if m:
            self.row_retries.append({"id": m.group(1), "error": m.group(2)[:300], "replica": m.group(3)})
        examples = self.examples.setdefault(record.name, [])
        if len(examples) < 4:
            examples.append(first[:400])


class Watchdog:
    """SIGINT to this process after ``seconds`` (the driver then commits what it has and stops): a hang ends."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


def run_once(job: Any, timeout_s: float) -> dict[str, Any]:
    from farm.runtime.driver import run_job

    t0 = time.perf_counter()
    out: dict[str, Any] = {"exception": None}
    watchdog = Watchdog(timeout_s)
    try:
        with watchdog:
            summary = run_job(job, progress=False)
        out["summary"] = summary.as_dict()
        out["outcome"] = "finished"
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt from the watchdog included; reported
        out["outcome"] = "hung (interrupted by the watchdog)" if watchdog.fired else "raised"
        out["exception"] = f"{type(exc).__name__}: {exc}"[:1500]
        out["where"] = farm_frames(exc)
        out["traceback"] = traceback.format_exc(limit=12)[-4000:]
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def farm_frames(exc: BaseException) -> str:
    """Where in the farm an exception came from: its farm/ frames, innermost first (``file:line function``)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/farm/" in f.filename]
    return " <- ".join(f"{f.filename.split('/farm/', 1)[1]}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))


def wait_for_own_stale_lease(out_dir: Path) -> float:
    """A run of this process that raised may have left its lease (``_lease.json``) behind: its pid is this live
    process, so the next run is refused (LeaseHeld) until the lease expires. Wait for that, as an operator would
    (a ``farm run`` rerun from a new process on this host would not wait: the holder's pid would be gone)."""
    try:
        lease = json.loads((out_dir / "_lease.json").read_text())
    except (OSError, ValueError):
        return 0.0
    if lease.get("pid") != os.getpid() or not isinstance(lease.get("expires_at"), (int, float)):
        return 0.0
    wait = max(0.0, min(float(lease["expires_at"]) - time.time() + 1.0, float(lease.get("ttl_s", 120)) + 5.0))
    print(f"  a raised run left its lease behind: waiting {wait:.0f} s for it to expire", flush=True)
    time.sleep(wait)
    return round(wait, 1)


def run_until_done(job: Any, out_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for _ in range(args.max_runs):
        waited = wait_for_own_stale_lease(out_dir) if runs else 0.0
        res = run_once(job, args.run_timeout)
        res["waited_for_stale_lease_s"] = waited
        runs.append(res)
        where = f" at {res['where']}" if res.get("where") else ""
        print(f"  run {len(runs)}: {res['outcome']} in {res['wall_s']} s {res['exception'] or ''}{where}", flush=True)
        if res["outcome"] == "finished":
            break
    return runs


# ------------------------------------------------------------------ checks (no wrapper: the local folder)
def check_output(out_dir: Path, ids: list[str]) -> dict[str, Any]:
    layout = OutputLayout(str(out_dir))
    parts = layout.log_parts()
    table = read_results(layout, ["status", "error_code", "error_message", "attempts", "video"])
    records = table.to_pylist()
    got = {r["id"] for r in records}
    wanted = set(ids)
    raw = 0
    unreadable = []
    for part in parts:
        try:
            raw += pq.read_metadata(part).num_rows
        except Exception as exc:  # noqa: BLE001 - reported
            unreadable.append(f"{part}: {type(exc).__name__}: {exc}")
    failed = [r for r in records if r["status"] != "ok"]
    no_video = [
        r["id"]
        for r in records
        if r["status"] == "ok"
        and not (r.get("video") and os.path.isfile(str(r["video"]).removeprefix(f"{flakyfs.PROTOCOL}://")))
    ]
    leftovers = sorted(p.name for p in out_dir.rglob("*") if ".flaky-tmp-" in p.name or ".tmp-" in p.name)
    return {
        "records": len(records),
        "result_parts": len(parts),
        "raw_part_rows": raw,
        "rows_lost": len(wanted - got),
        "lost_examples": sorted(wanted - got)[:10],
        "duplicates": raw - len(got),
        "records_not_in_manifest": len(got - wanted),
        "rows_wrongly_failed": len(failed),
        "failed_by_code": dict(Counter(str(r["error_code"]) for r in failed)),
        "failed_examples": [
            {"id": r["id"], "code": r["error_code"], "message": (r["error_message"] or "")[:300]} for r in failed[:5]
        ],
        "ok_without_video_file": len(no_video),
        "rows_retried": sum(1 for r in records if (r.get("attempts") or 0) > 1),
        "attempts_histogram": dict(sorted(Counter(int(r.get("attempts") or 0) for r in records).items())),
        "unreadable_parts": unreadable,
        "temp_files_left": leftovers[:20],
        "temp_files_left_count": len(leftovers),
        "lease_left": (out_dir / "_lease.json").exists(),
    }


def tally_counts(counts_dir: Path, phase: str) -> dict[str, Any]:
    by_role: dict[str, dict[str, Any]] = {}
    for proc in flakyfs.read_counts(str(counts_dir)):
        data = proc["phases"].get(phase)
        if not data:
            continue
        role = by_role.setdefault(
            proc["role"],
            {
                "processes": 0,
                "calls": 0,
                "stalls": 0,
                "stall_s": 0.0,
                "faults": Counter(),
                "faults_by_op": Counter(),
                "calls_by_op": Counter(),
                "ack_lost": 0,
                "ack_lost_by_op": Counter(),
            },
        )
        role["processes"] += 1
        for key in ("calls", "stalls", "stall_s", "ack_lost"):
            role[key] += data.get(key, 0)
        for key in ("faults", "faults_by_op", "calls_by_op", "ack_lost_by_op"):
            role[key].update(data.get(key, {}))
    for role in by_role.values():
        role["stall_s"] = round(role["stall_s"], 1)
        role["faults_total"] = sum(role["faults"].values())
        for key in ("faults", "faults_by_op", "calls_by_op", "ack_lost_by_op"):
            role[key] = dict(role[key].most_common())
    return by_role


def classification_table() -> list[dict[str, Any]]:
    out = []
    for name, (make, what) in flakyfs.KINDS.items():
        exc = make("info")
        out.append(
            {
                "kind": name,
                "exception": f"{type(exc).__name__}: {exc}"[:120],
                "stands_for": what,
                "farm.faults.classify": classify(exc, local=False).value,
                "in_default_run": name in flakyfs.DEFAULT_KINDS,
            }
        )
    return out


# ------------------------------------------------------------------ report
def table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def fmt_counter(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def report(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = [f"`{res['command']}`", ""]
    lines.append(
        f"# fault-injection benchmark: {res['rows']} rows, {res['portraits']} distinct portraits, simulated backend "
        f"{args.gpu_time:g} s/row, {args.gpus} fake GPUs (replicas), {res['cpus']} CPU cores, Ray "
        f"{res['ray_version']}; flaky:// = a local folder where {args.rate:.0%} of storage calls fail "
        f"({1 - args.stall_share:.0%} of those) or stall {args.stall_min:g}-{args.stall_max:g} s "
        f"({args.stall_share:.0%}); {args.ack_lost_share:.0%} of write/delete faults land before they fail; "
        f"seed {args.seed}; kinds: {', '.join(res['kinds'])}"
    )
    lines.append("")
    lines.append(
        "Other developers may have been running tests on this machine at the same time: wall times are indicative."
    )
    base, faulty = res.get("baseline"), res["faulty"]
    lines += [
        "",
        "## runs (a run that raised is rerun: resumed into the same output)",
        "",
        "| run | outcome | wall s | waited for its stale lease s | exception "
        "| raised at (farm frames, innermost first) |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in (("baseline (rate 0)", base["runs"] if base else []), ("faulty", faulty["runs"])):
        for i, r in enumerate(runs, 1):
            exc = (r["exception"] or "-").replace("|", "/").replace("\n", " ")[:240]
            lines.append(
                f"| {name} #{i} | {r['outcome']} | {r['wall_s']} | {r['waited_for_stale_lease_s']} | {exc} | "
                f"{r.get('where') or '-'} |"
            )
    chk = faulty["check"]
    inj = faulty["injected"]
    lines += ["", "## faulty run: results read back without the wrapper", ""]
    rows: list[tuple[str, Any]] = [
        ("manifest rows", res["rows"]),
        ("records", chk["records"]),
        ("**rows lost**", f"**{chk['rows_lost']}**"),
        ("**duplicates** (raw part rows - distinct ids)", f"**{chk['duplicates']}**"),
        ("**rows wrongly failed** (status != ok)", f"**{chk['rows_wrongly_failed']}**"),
        ("failed rows by error code", fmt_counter(chk["failed_by_code"])),
        ("ok rows without their video file", chk["ok_without_video_file"]),
        ("records not in the manifest", chk["records_not_in_manifest"]),
        ("rows retried (attempts > 1)", chk["rows_retried"]),
        ("attempts histogram", fmt_counter(chk["attempts_histogram"])),
        ("result parts (raw rows)", f"{chk['result_parts']} ({chk['raw_part_rows']})"),
        ("temp files left in the output", chk["temp_files_left_count"]),
        ("runs needed", len(faulty["runs"])),
    ]
    if base and base["runs"][-1]["outcome"] == "finished" and faulty["runs"][-1]["outcome"] == "finished":
        fw = sum(r["wall_s"] for r in faulty["runs"])
        ratio = f"{fw:.1f} / {base['wall_s']:.1f} = {fw / base['wall_s']:.2f}"
        rows.append(("wall s: faulty (all runs) / baseline = ratio", ratio))
    lines += table(rows)
    lines += [
        "",
        "## injected (counted by each process)",
        "",
        "| process | processes | storage calls | faults | stalls (s) | lost acks | faults by kind "
        "| faults by operation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for role, d in sorted(inj.items()):
        lines.append(
            f"| {role} | {d['processes']} | {d['calls']} | {d['faults_total']} | {d['stalls']} ({d['stall_s']}) | "
            f"{d['ack_lost']} | {fmt_counter(d['faults'])} | {fmt_counter(d['faults_by_op'])} |"
        )
    tally = faulty["driver_log"]
    lines += [
        "",
        f"driver log: {fmt_counter(tally['by_logger'])}; row faults reported back by replicas and retried: "
        f"{tally['row_retries']} ({fmt_counter(tally['row_retry_errors'])})",
    ]
    lines += [
        "",
        "## how farm.faults classifies each fault kind (a remote protocol)",
        "",
        "| kind | exception | stands for | classify | in the default run |",
        "|---|---|---|---|---|",
    ]
    for c in res["classification"]:
        lines.append(
            f"| {c['kind']} | {c['exception'].replace('|', '/')} | {c['stands_for']} | {c['farm.faults.classify']} | "
            f"{'yes' if c['in_default_run'] else 'no'} |"
        )
    lines += [""] + [f"note: {n}" for n in res["notes"]]
    lines += [f"checks: {'PASS' if res['pass'] else 'FAIL'}" + "".join(f"; {p}" for p in res["problems"])]
    return lines


# ------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke check: 200 rows, 4 fake GPUs")
    parser.add_argument("--rows", type=int, default=None, help="manifest rows (default 1000; quick 200)")
    parser.add_argument("--gpus", type=int, default=None, help="fake GPUs = replicas (default 8; quick 4)")
    parser.add_argument("--portraits", type=int, default=50, help="distinct portrait files")
    parser.add_argument("--gpu-time", type=float, default=0.05, help="simulated GPU seconds per row")
    parser.add_argument("--rate", type=float, default=0.10, help="share of storage calls that fail or stall")
    parser.add_argument("--stall-share", type=float, default=0.5, help="share of the hit calls that stall")
    parser.add_argument("--stall-min", type=float, default=0.2, help="shortest stall, s")
    parser.add_argument("--stall-max", type=float, default=2.0, help="longest stall, s")
    parser.add_argument("--ack-lost-share", type=float, default=0.3, help="write/delete faults after the change")
    parser.add_argument(
        "--kinds",
        default="default",
        help="comma-separated fault kinds, 'default' (what farm.faults takes for transient) or 'all'; "
        f"known: {', '.join(flakyfs.KINDS)}",
    )
    parser.add_argument("--commit-rows", type=int, default=50, help="runtime.commit_every_rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-runs", type=int, default=3, help="reruns (resume) of a faulty run that raised")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="a run longer than this is interrupted")
    parser.add_argument("--no-baseline", action="store_true", help="skip the fault-free run")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--keep", help="keep inputs, outputs and counters in this folder (default: a tmp folder)")
    args = parser.parse_args()
    args.rows = args.rows or (200 if args.quick else 1000)
    args.gpus = args.gpus or (4 if args.quick else 8)
    kinds = (
        list(flakyfs.DEFAULT_KINDS)
        if args.kinds == "default"
        else list(flakyfs.KINDS)
        if args.kinds == "all"
        else [k.strip() for k in args.kinds.split(",") if k.strip()]
    )
    unknown = [k for k in kinds if k not in flakyfs.KINDS]
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; known: {list(flakyfs.KINDS)}")
    command = shlex.join(["python", "benchmarks/bench_faults.py", *sys.argv[1:]])
    print(f"`{command}`", flush=True)

    import ray

    res: dict[str, Any] = {
        "command": command,
        "rows": args.rows,
        "portraits": args.portraits,
        "kinds": kinds,
        "ray_version": ray.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "args": vars(args),
        "problems": [],
        "notes": [],
        "classification": classification_table(),
    }
    t_start = time.time()
    tally = LogTally()
    logging.getLogger("farm").addHandler(tally)
    with tempfile.TemporaryDirectory(prefix="farm-faults-") as tmpdir:
        tmp = Path(args.keep or tmpdir).resolve()
        if args.keep and tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        counts = tmp / "counts"
        control = tmp / "control.json"
        common = {
            "seed": args.seed,
            "root": str(tmp),
            "counts_dir": str(counts),
            "kinds": kinds,
            "stall_share": args.stall_share,
            "stall_min_s": args.stall_min,
            "stall_max_s": args.stall_max,
            "ack_lost_share": args.ack_lost_share,
        }
        set_control(control, phase="setup", rate=0.0, **common)
        os.environ[flakyfs.ENV_CONTROL] = str(control)
        flakyfs.register("driver")
        manifest, ids = write_inputs(tmp / "data", args.rows, args.portraits)
        pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address="local",  # a new cluster of our own, even when another one runs on this machine (a test session)
            num_cpus=2,
            num_gpus=args.gpus,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            runtime_env={
                "worker_process_setup_hook": "flakyfs.register",
                "env_vars": {
                    "PYTHONPATH": pythonpath,
                    flakyfs.ENV_CONTROL: str(control),
                    flakyfs.ENV_ROLE: "replica",
                },
            },
        )
        try:
            if not args.no_baseline:
                print("baseline (no faults) ...", flush=True)
                set_control(control, phase="baseline", rate=0.0, **common)
                out_dir = tmp / "out-baseline"
                runs = run_until_done(make_job(manifest, f"flaky://{out_dir}", args), out_dir, args)
                base = res["baseline"] = {"runs": runs, "wall_s": sum(r["wall_s"] for r in runs)}
                base["check"] = check_output(tmp / "out-baseline", ids)
                base["storage_calls"] = tally_counts(counts, "baseline")
                if runs[-1]["outcome"] != "finished" or base["check"]["rows_wrongly_failed"]:
                    res["problems"].append(f"the baseline run did not succeed: {runs[-1]['exception']}")
            print(f"faulty run ({args.rate:.0%} of storage calls) ...", flush=True)
            tally.by_logger.clear()
            tally.row_retries.clear()
            set_control(control, phase="faults", rate=args.rate, **common)
            out_dir = tmp / "out-faults"
            runs = run_until_done(make_job(manifest, f"flaky://{out_dir}", args), out_dir, args)
            set_control(control, phase="after", rate=0.0, **common)
            flakyfs.flush()
        finally:
            ray.shutdown()
        faulty = res["faulty"] = {"runs": runs, "check": check_output(tmp / "out-faults", ids)}
        faulty["injected"] = tally_counts(counts, "faults")
        faulty["driver_log"] = {
            "by_logger": dict(tally.by_logger.most_common()),
            "row_retries": len(tally.row_retries),
            "row_retry_errors": dict(Counter(r["error"].split(":")[0] for r in tally.row_retries).most_common()),
            "row_retry_examples": tally.row_retries[:5],
            "examples": tally.examples,
        }
    chk = faulty["check"]
    for key in ("rows_lost", "duplicates", "rows_wrongly_failed", "ok_without_video_file", "records_not_in_manifest"):
        if chk[key]:
            res["problems"].append(f"{key} = {chk[key]}")
    if chk["unreadable_parts"]:
        res["problems"].append(f"unreadable result parts: {chk['unreadable_parts'][:3]}")
    failed_runs = [r for r in runs if r["outcome"] != "finished"]
    if failed_runs:
        res["problems"].append(
            f"{len(failed_runs)} of {len(runs)} faulty run(s) did not finish: "
            + "; ".join(str(r["exception"])[:200] for r in failed_runs)
        )
    injected = faulty["injected"]
    if not injected.get("replica", {}).get("faults_total"):
        res["problems"].append("no fault was injected in the replica processes: the benchmark proves nothing")
    if not injected.get("driver", {}).get("faults_total"):
        res["notes"].append("no fault was drawn in the driver process with this seed (it makes few storage calls)")
    res["wall_s"] = round(time.time() - t_start, 1)
    res["pass"] = not res["problems"]
    print("\n".join(report(res, args)))
    print(f"\n(total wall {res['wall_s']} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
