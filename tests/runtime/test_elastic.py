"""The farm on a real multi-node Ray (``ray.cluster_utils.Cluster``, as Ray's own tests use): GPU nodes join and die
while a job runs. The driver is a real ``farm run`` process that joins the cluster through ``RAY_ADDRESS``, as under
``ray job submit``; replicas use the ``simulated`` backend (it asks for a GPU like Lynx does).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from farm.storage import OutputLayout
from farm.table import read_results
from tests.helpers import farm_run_process, rows, write_manifest


@pytest.fixture()
def cluster() -> Iterator[Any]:
    """A head with no GPU (replicas never land there); tests add GPU nodes. Ray's default health check: a killed node
    is known dead only ~15 s later, while its replicas are merely unreachable (the case spot preemption produces)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    yield c
    c.shutdown()


def _spec(tmp_path: Path, n_rows: int, **sections: Any) -> Path:
    runtime = {"commit_every_rows": 4, "commit_every_s": 0.5, "start_timeout_s": 300, "node_loss_grace_s": 60}
    data: dict[str, Any] = {
        "name": "elastic",
        "manifest": write_manifest(tmp_path / "m.parquet", rows(n_rows)),
        "output": str(tmp_path / "out"),
        "output_shared": True,  # one machine: every "node" sees tmp_path
        "model": {"backend": "simulated", "options": {"gpu_time_s": 0.4}},
        "identity": {"enabled": False},
        "resources": {"replicas": "all", "gpus_per_replica": 1, "cpus_per_replica": 0.25, "in_flight_per_replica": 2},
        "runtime": {**runtime, **sections.pop("runtime", {})},
        **sections,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _records(out: Path) -> dict[str, dict[str, Any]]:
    layout = OutputLayout(str(out))
    table = read_results(layout)
    raw = sum(pq.read_metadata(p).num_rows for p in layout.log_parts())
    ids = table.column("id").to_pylist()
    assert raw == len(ids) == len(set(ids)), "exactly one record per id"
    return {r["id"]: r for r in table.to_pylist()}


def _wait_for(predicate: Any, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert proc.poll() is None, (
            f"farm run exited early ({proc.returncode}) while waiting for {what}:\n" + proc.stdout.read()
        )
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _committed(out: Path) -> int:
    layout = OutputLayout(str(out))
    return sum(pq.read_metadata(p).num_rows for p in layout.log_parts())


def test_job_waits_for_gpu_nodes_then_uses_nodes_added_mid_job_and_survives_losing_one(
    cluster: Any, tmp_path: Path
) -> None:
    """0 GPUs at start: no CPU replica, the job waits; GPU nodes that join are used; a node killed mid-job (no
    graceful drain, as a spot preemption) loses no row and charges none."""
    spec = _spec(tmp_path, 40)
    proc = farm_run_process(spec, cluster.address)
    time.sleep(6)  # the driver is up and waiting: nothing may have run without a GPU
    assert proc.poll() is None and _committed(tmp_path / "out") == 0
    first = cluster.add_node(num_cpus=1, num_gpus=1)
    _wait_for(lambda: _committed(tmp_path / "out") >= 4, proc, 120, "rows on the first GPU node")
    second = cluster.add_node(num_cpus=1, num_gpus=1)
    joined_at = time.time()
    _wait_for(lambda: _committed(tmp_path / "out") >= 16, proc, 120, "more rows")
    cluster.remove_node(first, allow_graceful=False)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output
    recs = _records(tmp_path / "out")
    assert sorted(recs) == [f"row-{i:03d}" for i in range(40)]
    assert {r["status"] for r in recs.values()} == {"ok"}, output
    assert all(r["gpu_ids"] for r in recs.values()), "every row ran on a GPU replica"
    nodes = {r["node"].split(":")[1] for r in recs.values()}
    assert {first.node_id[:8], second.node_id[:8]} <= nodes, nodes
    late = [r for r in recs.values() if r["node"].endswith(second.node_id[:8])]
    assert late and all(r["committed_at"].timestamp() >= joined_at for r in late)
    assert "lost (node_lost)" in output, "the loss is reported as a node loss"
    assert "lost (crash)" not in output and "poison" not in output, output

    # the same job into a local path not declared shared, on this cluster of several nodes: refused, exit 2
    data = yaml.safe_load(spec.read_text())
    data.update(output=str(tmp_path / "unshared"), output_shared=False)
    spec.write_text(yaml.safe_dump(data))
    refused = farm_run_process(spec, cluster.address)
    output = refused.communicate(timeout=120)[0]
    assert refused.returncode == 2 and "output_shared: true" in output, output
    assert not (tmp_path / "unshared").exists()


@pytest.mark.slow
def test_a_crash_on_a_row_is_still_charged_on_a_multi_node_cluster(cluster: Any, tmp_path: Path) -> None:
    """A replica process that dies on a row (its node lives on) is a crash: charged, then poison."""
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.add_node(num_cpus=1, num_gpus=1)
    spec = _spec(tmp_path, 8, runtime={"max_attempts": 2, "inject_faults": {"crash": {"row-003": 5}}})
    proc = farm_run_process(spec, cluster.address)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    recs = _records(tmp_path / "out")
    assert recs["row-003"]["status"] == "failed" and recs["row-003"]["error_code"] == "poison", recs["row-003"]
    assert all(r["status"] == "ok" for k, r in recs.items() if k != "row-003")


@pytest.mark.slow
def test_replicas_are_replaced_when_capacity_returns(cluster: Any, tmp_path: Path) -> None:
    """The only GPU node dies mid-job: rows wait (uncharged) until a new node joins, then finish there."""
    only = cluster.add_node(num_cpus=1, num_gpus=1)
    spec = _spec(tmp_path, 24)
    proc = farm_run_process(spec, cluster.address)
    _wait_for(lambda: _committed(tmp_path / "out") >= 4, proc, 120, "first rows")
    cluster.remove_node(only, allow_graceful=False)
    time.sleep(8)
    assert proc.poll() is None, "the job waits for capacity instead of aborting"
    replacement = cluster.add_node(num_cpus=1, num_gpus=1)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output
    recs = _records(tmp_path / "out")
    assert len(recs) == 24 and {r["status"] for r in recs.values()} == {"ok"}
    assert any(r["node"].endswith(replacement.node_id[:8]) for r in recs.values())
    assert all(r["attempts"] <= 2 for r in recs.values())
    # the new node joined while Ray still counted the dead one: the target went back to the one GPU there is
    assert '"replicas": 1,' in output, output


@pytest.mark.slow
def test_a_replica_larger_than_any_node_is_named_while_waiting(cluster: Any, tmp_path: Path) -> None:
    """Two 1-GPU nodes, 2 GPUs per replica: the total looks enough, no node can hold one; the wait says so."""
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.add_node(num_cpus=1, num_gpus=1)
    spec = _spec(tmp_path, 2, runtime={"start_timeout_s": 15})
    data = yaml.safe_load(spec.read_text())
    data["resources"]["gpus_per_replica"] = 2
    spec.write_text(yaml.safe_dump(data))
    proc = farm_run_process(spec, cluster.address)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 3, output
    assert "no node has 2 GPUs (the largest has 1)" in output and "lower resources.gpus_per_replica" in output, output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def autoscaling_cluster(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A head with a real Ray autoscaler whose provider is Ray's fake multi-node one (nodes are local processes):
    the autoscaler adds GPU nodes when asked, as on a cloud. Writes ``tmp_path/autoscaler.yaml``; yields (address,
    Ray's temp dir, the auth environment a client needs)."""
    import ray._private.services as services

    ip, port = services.get_node_ip_address(), _free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="farm-as-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    config = {
        "cluster_name": "farm-test",
        "max_workers": 4,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"{ip}:{port}",
        },
        "auth": {},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        **{
            key: []
            for key in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
            )
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }
    path = tmp_path / "autoscaler.yaml"
    path.write_text(yaml.safe_dump(config))
    # Token auth on, as Ray 2.60 clusters run by default: every process that joins needs the same token.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **auth, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--num-gpus=0",
            f"--autoscaling-config={path}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"{ip}:{port}", temp_dir, auth
    finally:
        _kill_processes_mentioning(str(temp_dir), f":{port}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_processes_mentioning(*needles: str) -> None:
    """Stop only this test's Ray processes (``ray stop`` would also stop the session's other clusters)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and any(n in cmdline for n in needles):
            try:
                proc.kill()
            except psutil.Error:
                pass


@pytest.mark.slow
def test_the_autoscaler_is_asked_for_every_gpu_it_can_add(
    autoscaling_cluster: tuple[str, Path, dict[str, str]], tmp_path: Path
) -> None:
    """`replicas: all` on a cluster with 0 GPUs: the farm reads what the autoscaler can scale to (2 GPU nodes), asks
    for both with request_resources, and runs on the nodes the autoscaler brings up."""
    address, temp_dir, auth = autoscaling_cluster
    config = tmp_path / "autoscaler.yaml"
    spec = _spec(tmp_path, 24)
    env = {**os.environ, **auth, "RAY_ADDRESS": address, "FARM_AUTOSCALER_CONFIG": str(config)}
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "run", str(spec), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = _records(tmp_path / "out")
    assert len(recs) == 24 and {r["status"] for r in recs.values()} == {"ok"}
    assert '"replicas": 2' in proc.stdout
    replicas = json.loads((tmp_path / "out" / "_job.json").read_text())["replicas"]
    assert len({r["node_id"] for r in replicas}) == 2, "a replica on each GPU node the autoscaler added"
    monitor = "\n".join(p.read_text(errors="replace") for p in temp_dir.glob("session_*/logs/monitor.log"))
    assert "request_resources" in monitor
