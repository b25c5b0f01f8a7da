"""Elastic farm benchmark on a real multi-node Ray on one machine (``ray.cluster_utils.Cluster``, fake GPUs).

A real ``farm run`` process joins the cluster (``--address``) with the benchmark-only ``simulated`` backend (a fixed
"GPU time" per row), ``resources.replicas: all`` (one replica per GPU present), ``gpus_per_replica: 1`` and a shared
local output. The head node has no GPU, so every replica runs on a GPU worker node. Measured:

  1. scale-up: rows/s with the starting GPU nodes; then GPU nodes are added one at a time, and for each: seconds from
     the node joining (``add_node`` returning) to its replica being ready and to the first row it takes and finishes,
     then rows/s with the larger cluster;
  2. chaos: a second job, sized from the measured rate to keep the replicas busy for the whole chaos run, while every
     ``--period`` seconds a random GPU node is killed without a graceful drain (as a spot preemption) and a new one
     joins. Afterwards, against the committed results: rows lost (manifest ids without a record), duplicate records
     (raw result-part rows minus distinct ids) and rows charged as poison must all be 0; node losses and crashes as the
     driver classified them, rows rerun, and the join-to-first-row latency of the replacement nodes are reported.

Per-row times come from the results and the videos: a row's end is its video's mtime (written by the replica just
before it returns), its dispatch is that minus the record's ``total_s``, and its start on the replica is the dispatch
plus ``queue_s``; the record's ``node`` says which node ran it. One machine, so one clock.

    python benchmarks/bench_elastic.py --out elastic.json     # default: about 6 minutes on 2 cores
    python benchmarks/bench_elastic.py --quick                # smoke check, about 1.5-2 minutes
    python benchmarks/bench_elastic.py --chaos-seconds 120 --period 20 --gpu-time 0.5

Node death is noticed by Ray's health check (by default about 15 s after the node stops answering); ``--fast-health``
shortens it to about 2 s. The process exits 1 if a check fails (a row lost, a duplicate record, a row charged as
poison, the farm not exiting 0 after the chaos run, or an added node never taking a row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from farm.storage import OutputLayout
from farm.table import read_results

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = "pkg://skimage/data/astronaut.png"
JOIN_TIMEOUT_S = 120.0
# Ray notices a dead node after health_check_period_ms x health_check_failure_threshold (defaults: 3000 ms x 5).
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 500}
READY_RE = re.compile(r"(replica-\d+) ready on \S+:([0-9a-f]{8})")
LOST_RE = re.compile(r"(replica-\d+) lost \((\w+)\): (.*); (\d+) row\(s\) in flight")


# ------------------------------------------------------------------ job and driver process
def write_manifest(path: Path, n: int, prefix: str) -> str:
    table = pa.table(
        {
            "id": [f"{prefix}-{i:06d}" for i in range(n)],
            "portrait": [PORTRAIT] * n,
            "prompt": [f"a person, take {i}" for i in range(n)],
        }
    )
    pq.write_table(table, path)
    return str(path)


def write_spec(path: Path, manifest: str, output: Path, gpu_time: float, load_time: float) -> Path:
    spec = {
        "name": path.stem,
        "manifest": manifest,
        "output": str(output),
        "output_shared": True,  # one machine: every "node" sees the same tmp folder
        "model": {"backend": "simulated", "options": {"gpu_time_s": gpu_time, "load_time_s": load_time}},
        "identity": {"enabled": False},
        "resources": {"replicas": "all", "gpus_per_replica": 1, "cpus_per_replica": 0.25},
        "runtime": {"commit_every_rows": 8, "commit_every_s": 1.0},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Farm:
    """A ``farm run`` subprocess joined to the cluster; its output lines are kept with the time they were read."""

    def __init__(self, spec: Path, address: str, log_path: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        self.command = [sys.executable, "-m", "farm.cli", "run", str(spec), "--no-progress", "--address", address]
        self.started = time.time()
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._log = log_path.open("w")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            self.lines.append((now, line.rstrip("\n")))
            self._log.write(f"{now - self.started:9.3f} {line}")
            self._log.flush()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float) -> int | None:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(timeout=10)
        return code

    def interrupt(self, timeout_s: float = 90.0) -> int | None:
        """SIGINT, as Ctrl-C: the farm commits what it has and exits (130); killed if it does not."""
        if self.alive:
            self.proc.send_signal(signal.SIGINT)
        code = self.wait(timeout_s)
        if code is None:
            self.kill()
        return code

    def kill(self) -> None:
        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: this process and nothing else
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        self._log.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def ready_at(self) -> dict[str, float]:
        """Node id prefix -> when a replica on it first reported ready."""
        out: dict[str, float] = {}
        for t, line in self.lines:
            m = READY_RE.search(line)
            if m:
                out.setdefault(m.group(2), t)
        return out

    def losses(self) -> list[dict[str, Any]]:
        out = []
        for t, line in self.lines:
            m = LOST_RE.search(line)
            if m:
                out.append(
                    {
                        "t": t,
                        "replica": m.group(1),
                        "loss": m.group(2),
                        "message": m.group(3)[:300],
                        "in_flight": int(m.group(4)),
                    }
                )
        return out


class PartWatcher:
    """Committed records as they land (new result parts only), per node id prefix."""

    def __init__(self, output: Path) -> None:
        self.layout = OutputLayout(str(output))
        self.seen: set[str] = set()
        self.rows = 0
        self.nodes: Counter[str] = Counter()

    def poll(self) -> None:
        for part in self.layout.log_parts():
            if part in self.seen:
                continue
            try:
                table = pq.read_table(part, columns=["node"])
            except Exception:  # noqa: BLE001 - not readable yet: next poll
                continue
            self.seen.add(part)
            self.rows += table.num_rows
            self.nodes.update(n.split(":")[-1] for n in table.column("node").to_pylist() if n)


def wait_until(predicate: Any, farm: Farm, timeout_s: float, poll_s: float = 0.25) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        if not farm.alive:
            return False
        time.sleep(poll_s)
    return predicate()


# ------------------------------------------------------------------ results
def row_times(output: Path) -> list[dict[str, Any]]:
    """Every committed record with its node and, for ok rows, dispatch / start / end wall-clock times."""
    table = read_results(
        OutputLayout(str(output)), ["status", "error_code", "node", "video", "total_s", "queue_s", "attempts"]
    )
    out = []
    for rec in table.to_pylist():
        rec["node_id"] = (rec.get("node") or "").split(":")[-1]
        video = rec.get("video")
        if rec["status"] == "ok" and video and os.path.exists(video):
            rec["end"] = os.stat(video).st_mtime
            rec["dispatched"] = rec["end"] - (rec.get("total_s") or 0.0)
            rec["start"] = rec["dispatched"] + (rec.get("queue_s") or 0.0)
        out.append(rec)
    return out


def rate(rows: list[dict[str, Any]], t0: float, t1: float) -> float | None:
    if t1 <= t0:
        return None
    return sum(1 for r in rows if "end" in r and t0 <= r["end"] < t1) / (t1 - t0)


def first_on(rows: list[dict[str, Any]], node_id: str, key: str) -> float | None:
    times = [r[key] for r in rows if r["node_id"] == node_id and key in r]
    return min(times) if times else None


def since(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 2)


# ------------------------------------------------------------------ the cluster
@contextmanager
def local_cluster(fast_health: bool) -> Any:
    """A head with no GPU (replicas never land there). Always shut down; Ray's "current cluster" file is left as it
    was, so a plain ``ray.init()`` elsewhere on the machine (a test session) does not join this cluster."""
    from ray.cluster_utils import Cluster

    head: dict[str, Any] = {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}
    if fast_health:
        head["_system_config"] = FAST_HEALTH
    saved = _address_file_state()
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head)
        _restore_address_file(saved)
        yield cluster
    finally:
        saved_now = _address_file_state()
        if cluster is not None:
            try:
                cluster.shutdown()
            finally:
                _restore_address_file(saved_now)


def _address_file() -> Path:
    import ray._private.utils as ray_utils

    return Path(ray_utils.get_ray_address_file(None))


def _address_file_state() -> str | None:
    try:
        return _address_file().read_text()
    except OSError:
        return None


def _restore_address_file(content: str | None) -> None:
    path = _address_file()
    try:
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(content)
    except OSError:
        pass


def add_gpu_node(cluster: Any) -> tuple[Any, float, float]:
    t0 = time.time()
    node = cluster.add_node(num_cpus=1, num_gpus=1)
    return node, t0, time.time()


# ------------------------------------------------------------------ phase 1: scale-up
def phase_scale_up(cluster: Any, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    nodes = [add_gpu_node(cluster)[0] for _ in range(args.start_nodes)]
    per_replica = 1.0 / args.gpu_time
    expected_rows = per_replica * (args.start_nodes + args.add_nodes) * (args.measure_s + 30) * (args.add_nodes + 1)
    manifest = write_manifest(tmp / "scale.parquet", int(expected_rows) + 500, "scale")
    out = tmp / "scale-out"
    farm = Farm(
        write_spec(tmp / "scale.yaml", manifest, out, args.gpu_time, args.load_time),
        cluster.address,
        tmp / "scale-farm.log",
    )
    watch = PartWatcher(out)
    result: dict[str, Any] = {"farm_command": shlex.join(farm.command), "joins": [], "ok": True}
    try:
        if not wait_until(lambda: (watch.poll(), watch.rows >= args.warm_rows)[1], farm, JOIN_TIMEOUT_S):
            raise RuntimeError(f"no rows committed by the first replicas:\n{farm.tail()}")
        windows = [{"gpu_nodes": len(nodes), "t0": time.time()}]
        time.sleep(args.measure_s)
        for _ in range(args.add_nodes):
            node, t_add, t_joined = add_gpu_node(cluster)
            windows[-1]["t1"] = t_add
            nodes.append(node)
            nid = node.node_id[:8]
            took = wait_until(lambda nid=nid: (watch.poll(), watch.nodes[nid] > 0)[1], farm, JOIN_TIMEOUT_S)
            join = {"node": nid, "add_node_s": round(t_joined - t_add, 2), "t_joined": t_joined}
            result["joins"].append(join)
            if not took:
                result["ok"] = False
                join["error"] = f"no row from the new node within {JOIN_TIMEOUT_S:g}s"
                break
            windows.append({"gpu_nodes": len(nodes), "t0": time.time()})
            time.sleep(args.measure_s)
        windows[-1].setdefault("t1", time.time())
    finally:
        code = farm.interrupt()
        farm.kill()
    result["farm_exit"] = code
    rows = row_times(out)
    ready = farm.ready_at()
    for join in result["joins"]:
        t = join.pop("t_joined")
        join["join_to_replica_ready_s"] = since(ready.get(join["node"]), t)
        join["join_to_first_row_dispatched_s"] = since(first_on(rows, join["node"], "dispatched"), t)
        join["join_to_first_row_started_s"] = since(first_on(rows, join["node"], "start"), t)
        join["join_to_first_row_done_s"] = since(first_on(rows, join["node"], "end"), t)
    for w in windows:
        r = rate(rows, w["t0"], w["t1"])
        w["rows_per_s"] = None if r is None else round(r, 3)
        w["ideal_rows_per_s"] = round(w["gpu_nodes"] * per_replica, 3)
        w["seconds"] = round(w.pop("t1") - w.pop("t0"), 1)
    result["windows"] = windows
    result["rows_recorded"] = len(rows)
    result["losses"] = farm.losses()
    return result


# ------------------------------------------------------------------ phase 2: chaos
def phase_chaos(cluster: Any, tmp: Path, args: argparse.Namespace, rows_per_s: float) -> dict[str, Any]:
    n_rows = args.chaos_rows or max(40, math.ceil(rows_per_s * args.chaos_seconds))
    manifest = write_manifest(tmp / "chaos.parquet", n_rows, "chaos")
    out = tmp / "chaos-out"
    farm = Farm(
        write_spec(tmp / "chaos.yaml", manifest, out, args.gpu_time, args.load_time),
        cluster.address,
        tmp / "chaos-farm.log",
    )
    watch = PartWatcher(out)
    rng = random.Random(args.seed)
    events: list[dict[str, Any]] = []
    result: dict[str, Any] = {"manifest_rows": n_rows, "farm_command": shlex.join(farm.command)}
    code: int | None = None
    try:
        if not wait_until(lambda: (watch.poll(), watch.rows >= 1)[1], farm, JOIN_TIMEOUT_S):
            raise RuntimeError(f"the chaos job committed no row:\n{farm.tail()}")
        t_start = time.time()
        next_kill = t_start + args.period
        while next_kill <= t_start + args.chaos_seconds and farm.alive:
            if farm.wait(max(0.0, next_kill - time.time())) is not None:
                break
            victim = rng.choice(sorted(cluster.worker_nodes, key=lambda n: n.node_id))
            t_kill = time.time()
            cluster.remove_node(victim, allow_graceful=False)
            t_removed = time.time()
            node, _, t_joined = add_gpu_node(cluster)
            events.append(
                {
                    "t_kill": t_kill,
                    "killed": victim.node_id[:8],
                    "remove_s": round(t_removed - t_kill, 2),
                    "added": node.node_id[:8],
                    "t_joined": t_joined,
                }
            )
            next_kill += args.period
        t_chaos_end = time.time()
        code = farm.wait(args.chaos_seconds * 3 + 300)
        if code is None:
            result["error"] = "the chaos job did not finish in time: interrupted"
            code = farm.interrupt()
    finally:
        farm.kill()
    t_done = time.time()
    result["farm_exit"] = code
    result["chaos_s"] = round(t_chaos_end - t_start, 1)
    result["job_s"] = round(t_done - farm.started, 1)
    result["tail_after_chaos_s"] = round(t_done - t_chaos_end, 1)

    layout = OutputLayout(str(out))
    rows = row_times(out)
    ids = {r["id"] for r in rows}
    wanted = set(pq.read_table(manifest, columns=["id"]).column("id").to_pylist())
    raw = sum(pq.read_metadata(p).num_rows for p in layout.log_parts())
    losses = farm.losses()
    run = (layout.read_json(layout.job_json).get("runs") or [{}])[-1]
    ready = farm.ready_at()
    for e in events:
        t = e.pop("t_joined")
        e["join_to_replica_ready_s"] = since(ready.get(e["added"]), t)
        e["join_to_first_row_started_s"] = since(first_on(rows, e["added"], "start"), t)
        e["t_kill"] = round(e["t_kill"] - t_start, 1)
    result.update(
        {
            "node_kills": len(events),
            "rows_lost": len(wanted - ids),
            "duplicate_records": raw - len(ids),
            "records_not_in_manifest": len(ids - wanted),
            "poison_rows": sum(1 for r in rows if r.get("error_code") == "poison"),
            "statuses": dict(Counter(r["status"] for r in rows)),
            "failed_codes": dict(Counter(r["error_code"] for r in rows if r["status"] != "ok")),
            "rows_rerun": sum(1 for r in rows if (r.get("attempts") or 0) > 1),
            "losses_by_kind": dict(Counter(x["loss"] for x in losses)),
            "rows_in_flight_on_lost_replicas": sum(x["in_flight"] for x in losses),
            # no fault is injected: every loss here is a killed node, so a loss taken for a crash is misclassified;
            # a crash with one row in flight charges that row (max_attempts charges make it poison), with several
            # it charges none but makes them suspects (rerun alone)
            "losses_taken_for_crashes": sum(1 for x in losses if x["loss"] != "node_lost"),
            "rows_charged_by_crash_losses": sum(1 for x in losses if x["loss"] != "node_lost" and x["in_flight"] == 1),
            "rows_made_suspect_by_crash_losses": sum(
                x["in_flight"] for x in losses if x["loss"] != "node_lost" and x["in_flight"] > 1
            ),
            "replica_restarts_charged": run.get("replica_restarts"),
            "run_status": run.get("status"),
            "rows_per_s_whole_job": round(len(ids) / (t_done - t_start), 3) if t_done > t_start else None,
            "events": events,
            "losses": [{**x, "t": round(x["t"] - t_start, 1)} for x in losses],
        }
    )
    started = [e["join_to_first_row_started_s"] for e in events if e["join_to_first_row_started_s"] is not None]
    result["replacement_join_to_first_row_s"] = {
        "n": len(started),
        "of": len(events),
        "median": round(statistics.median(started), 2) if started else None,
        "max": round(max(started), 2) if started else None,
    }
    return result


# ------------------------------------------------------------------ report
def fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def report(command: str, args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    lines = [f"`{command}`", ""]
    lines.append(
        f"# elastic farm benchmark: ray.cluster_utils.Cluster on one machine ({os.cpu_count()} cores), "
        f"head without GPU + 1-GPU worker nodes (fake GPUs), simulated backend {args.gpu_time:g}s/row, "
        f"model load {args.load_time:g}s, replicas: all, Ray {res['ray_version']}, node-death detection: "
        f"{'fast (~2 s)' if args.fast_health else 'Ray default health check (~15 s)'}"
    )
    scale = res.get("scale_up")
    if scale:
        lines += ["", "## scale-up", "", "| GPU nodes | window s | rows/s | ideal rows/s |", "|---|---|---|---|"]
        for w in scale["windows"]:
            lines.append(f"| {w['gpu_nodes']} | {w['seconds']} | {fmt(w['rows_per_s'])} | {w['ideal_rows_per_s']} |")
        lines += [
            "",
            "| node joined | add_node s | join -> replica ready s | join -> first row dispatched s | "
            "join -> first row started s | join -> first row done s |",
            "|---|---|---|---|---|---|",
        ]
        for j in scale["joins"]:
            lines.append(
                f"| {j['node']} | {j['add_node_s']} | {fmt(j['join_to_replica_ready_s'])} | "
                f"{fmt(j['join_to_first_row_dispatched_s'])} | {fmt(j['join_to_first_row_started_s'])} | "
                f"{fmt(j['join_to_first_row_done_s'])} |" + (f" {j['error']}" if "error" in j else "")
            )
    chaos = res.get("chaos")
    if chaos:
        rj = chaos["replacement_join_to_first_row_s"]
        lines += [
            "",
            f"## chaos: every {args.period:g}s kill a random GPU node (no graceful drain) and add a new one",
            "",
            "| measure | value |",
            "|---|---|",
        ]
        for name, value in (
            ("manifest rows", chaos["manifest_rows"]),
            (
                "chaos s (job s; tail after chaos s)",
                f"{chaos['chaos_s']} ({chaos['job_s']}; {chaos['tail_after_chaos_s']})",
            ),
            ("GPU nodes killed / added", chaos["node_kills"]),
            ("replica losses seen by the driver, by kind", chaos["losses_by_kind"] or "{}"),
            ("rows in flight on lost replicas (requeued)", chaos["rows_in_flight_on_lost_replicas"]),
            ("**node kills taken for replica crashes**", f"**{chaos['losses_taken_for_crashes']}**"),
            (
                "rows charged / made suspect by those crashes",
                f"{chaos['rows_charged_by_crash_losses']} / {chaos['rows_made_suspect_by_crash_losses']}",
            ),
            ("rows rerun (attempts > 1)", chaos["rows_rerun"]),
            ("replica restarts charged (crashes)", fmt(chaos["replica_restarts_charged"])),
            ("**rows lost**", f"**{chaos['rows_lost']}**"),
            ("**duplicate records**", f"**{chaos['duplicate_records']}**"),
            ("**rows charged as poison**", f"**{chaos['poison_rows']}**"),
            ("statuses", chaos["statuses"]),
            ("rows/s over the whole job", fmt(chaos["rows_per_s_whole_job"])),
            (
                "replacement node join -> first row started s (median / max, n)",
                f"{fmt(rj['median'])} / {fmt(rj['max'])} ({rj['n']} of {rj['of']} replacements took a row)",
            ),
            ("farm run exit code", fmt(chaos["farm_exit"])),
        ):
            lines.append(f"| {name} | {value} |")
    lines += ["", f"checks: {'PASS' if res['pass'] else 'FAIL'}" + "".join(f"; {p}" for p in res["problems"])]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke check: shorter windows, 1 node added, 45 s chaos")
    parser.add_argument("--gpu-time", type=float, default=0.5, help="simulated GPU seconds per row")
    parser.add_argument("--load-time", type=float, default=0.0, help="simulated model load seconds per replica")
    parser.add_argument("--start-nodes", type=int, default=1, help="GPU nodes at the start")
    parser.add_argument("--add-nodes", type=int, default=None, help="GPU nodes added one by one (default 2; quick 1)")
    parser.add_argument("--measure-s", type=float, default=None, help="rows/s window per size (default 25; quick 12)")
    parser.add_argument("--warm-rows", type=int, default=4, help="rows committed before the first window opens")
    parser.add_argument("--chaos-seconds", type=float, default=None, help="chaos duration (default 180; quick 45)")
    parser.add_argument("--period", type=float, default=None, help="seconds between node kills (default 30; quick 15)")
    parser.add_argument(
        "--chaos-rows", type=int, default=None, help="chaos manifest rows (default: measured rows/s x chaos seconds)"
    )
    parser.add_argument("--fast-health", action="store_true", help="Ray notices dead nodes in ~2 s instead of ~15 s")
    parser.add_argument("--skip", choices=["scale-up", "chaos"], action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--keep", help="keep manifests, outputs and farm logs in this folder (default: a tmp folder)")
    args = parser.parse_args()
    quick = args.quick
    args.add_nodes = args.add_nodes if args.add_nodes is not None else (1 if quick else 2)
    args.measure_s = args.measure_s or (12.0 if quick else 25.0)
    args.chaos_seconds = args.chaos_seconds or (45.0 if quick else 180.0)
    args.period = args.period or (15.0 if quick else 30.0)
    if args.start_nodes + args.add_nodes > 3:
        parser.error("at most 3 GPU nodes (a small machine): lower --start-nodes / --add-nodes")
    command = shlex.join(["python", "benchmarks/bench_elastic.py", *sys.argv[1:]])
    print(f"`{command}`", flush=True)

    import ray

    res: dict[str, Any] = {
        "command": command,
        "ray_version": ray.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "args": vars(args),
        "problems": [],
    }
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="farm-elastic-") as tmpdir:
        tmp = Path(args.keep or tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            with local_cluster(args.fast_health) as cluster:
                rows_per_s = (args.start_nodes + args.add_nodes) / args.gpu_time * 0.8
                if "scale-up" not in args.skip:
                    print("scale-up ...", flush=True)
                    scale = res["scale_up"] = phase_scale_up(cluster, tmp, args)
                    measured = scale["windows"][-1]["rows_per_s"]
                    rows_per_s = measured or rows_per_s
                    if not scale["ok"]:
                        res["problems"].append("an added node took no row")
                    if scale["losses"]:  # no node is removed during scale-up
                        res["problems"].append(f"replica losses during scale-up: {scale['losses']}")
                else:
                    for _ in range(args.start_nodes + args.add_nodes):
                        add_gpu_node(cluster)
                if "chaos" not in args.skip:
                    print(f"chaos ({args.chaos_seconds:g}s, a node every {args.period:g}s) ...", flush=True)
                    chaos = res["chaos"] = phase_chaos(cluster, tmp, args, rows_per_s)
                    checks = (
                        "rows_lost",
                        "duplicate_records",
                        "poison_rows",
                        "records_not_in_manifest",
                        "losses_taken_for_crashes",
                        "replica_restarts_charged",
                    )
                    for key in checks:
                        if chaos[key]:
                            res["problems"].append(f"{key} = {chaos[key]}")
                    if chaos["farm_exit"] != 0:
                        res["problems"].append(f"farm run exited {chaos['farm_exit']}")
                    if chaos.get("error"):
                        res["problems"].append(chaos["error"])
        except Exception as exc:  # noqa: BLE001 - reported with the figures gathered so far
            res["problems"].append(f"{type(exc).__name__}: {exc}")
    res["wall_s"] = round(time.time() - t0, 1)
    res["pass"] = not res["problems"]
    print("\n".join(report(command, args, res)))
    print(f"\n(total wall {res['wall_s']} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
