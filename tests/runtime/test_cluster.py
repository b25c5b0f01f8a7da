"""The cluster view without a cluster: which Ray the farm joins, and what an autoscaler config says it can reach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.runtime import cluster

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def init_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    return calls


def test_without_an_address_the_farm_starts_its_own_ray(init_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never an unrelated cluster that happens to run on the machine (`ray.init()` alone would attach to it)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.connect() is True
    assert init_calls[-1]["address"] == "local"


def test_an_address_or_ray_address_joins_that_cluster(init_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []
    monkeypatch.setattr(cluster, "check_reachable", checked.append)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster.connect() is False
    assert init_calls[-1]["address"] == "10.0.0.5:6379"
    assert cluster.connect("head:6379") is False
    assert init_calls[-1]["address"] == "head:6379"
    assert checked == ["10.0.0.5:6379", "head:6379"]


def test_an_address_where_nothing_answers_fails_fast_naming_it(init_calls: list) -> None:
    """Found by a README walkthrough: `farm run --address 127.0.0.1:1` printed Ray's GCS retry warnings for minutes."""
    import socket

    from farm.runtime.errors import JobAborted

    with socket.socket() as probe:  # a port with nothing listening: bound, never listened on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
        for given in (address, f"ray://{address}"):
            with pytest.raises(JobAborted, match=f"cannot reach the Ray cluster at '{given}'.*--address / RAY_ADDRESS"):
                cluster.connect(given)
    assert init_calls == [], "ray.init was never called"


def test_the_launcher_config_in_this_repo_scales_to_its_gpus() -> None:
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    expected = 0.0
    budget = config.get("max_workers")
    per_type = sorted(
        (
            (float(t.get("resources", {}).get("GPU", 0)), int(t.get("max_workers", 0)))
            for name, t in config["available_node_types"].items()
            if name != config["head_node_type"]
        ),
        reverse=True,
    )
    for gpus, count in per_type:
        take = count if budget is None else min(count, budget)
        expected += gpus * take
        budget = None if budget is None else budget - take
    assert cluster.gpus_in_launcher_config(config) == expected > 0


def test_launcher_config_sums_largest_nodes_first_within_max_workers() -> None:
    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 8, "GPU": 0}, "max_workers": 0},
            "small": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 10},
            "big": {"resources": {"CPU": 96, "GPU": 8}, "max_workers": 2},
            "cpu": {"resources": {"CPU": 16}, "max_workers": 5},
        },
    }
    assert cluster.gpus_in_launcher_config(config) == 2 * 8 + 1 * 1
    config["available_node_types"]["big"]["max_workers"] = 0
    config["available_node_types"]["small"]["max_workers"] = 0
    assert cluster.gpus_in_launcher_config(config) is None


def test_max_gpus_reads_the_file_named_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "head_node_type": "h",
                "available_node_types": {
                    "h": {"resources": {"GPU": 0}},
                    "g": {"resources": {"GPU": 4}, "max_workers": 3},
                },
            }
        )
    )
    monkeypatch.setenv("FARM_AUTOSCALER_CONFIG", str(path))
    assert cluster.max_gpus() == 12
    path.write_text(": not yaml [")
    assert cluster.max_gpus() is None  # unreadable: replicas follow the GPUs present (a warning says why)
    monkeypatch.setenv("FARM_AUTOSCALER_CONFIG", str(tmp_path / "missing.yaml"))
    assert cluster.max_gpus() is None


def test_on_kuberay_the_raycluster_object_gives_the_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's RayCluster (here: deploy/kuberay/raycluster.yaml, as the Kubernetes API would return it) is read
    through Ray's own KubeRay autoscaler code: 8 pods x 8 GPUs."""
    from ray.autoscaler._private.kuberay import node_provider

    docs = list(yaml.safe_load_all((REPO / "deploy" / "kuberay" / "raycluster.yaml").read_text()))
    raycluster = next(d for d in docs if d and d.get("kind") == "RayCluster")
    raycluster["metadata"].setdefault("namespace", "default")  # the API server fills it in
    asked: list[str] = []

    def fake_get(self: Any, path: str) -> dict:
        asked.append(path)
        return raycluster

    monkeypatch.setattr(node_provider.KubernetesHttpApiClient, "__init__", lambda self, namespace: None)
    monkeypatch.setattr(node_provider.KubernetesHttpApiClient, "get", fake_get)
    monkeypatch.delenv("FARM_AUTOSCALER_CONFIG", raising=False)
    monkeypatch.setenv("RAY_CLUSTER_NAME", raycluster["metadata"]["name"])
    monkeypatch.setenv("RAY_CLUSTER_NAMESPACE", "default")
    assert cluster.max_gpus() == 64
    assert asked == [f"rayclusters/{raycluster['metadata']['name']}"]


def test_an_unreadable_raycluster_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.autoscaler._private.kuberay import node_provider

    def forbidden(self: Any, path: str) -> dict:
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(node_provider.KubernetesHttpApiClient, "__init__", lambda self, namespace: None)
    monkeypatch.setattr(node_provider.KubernetesHttpApiClient, "get", forbidden)
    monkeypatch.setenv("RAY_CLUSTER_NAME", "x")
    monkeypatch.setenv("RAY_CLUSTER_NAMESPACE", "default")
    monkeypatch.setenv("FARM_AUTOSCALER_CONFIG", "/nonexistent.yaml")
    assert cluster.max_gpus() is None


@pytest.mark.parametrize(
    ("embedded", "allow_cpu", "gpus"),
    [(True, False, 0.0), (False, True, 0.0), (False, False, 1.0)],
    ids=["embedded-local-ray-falls-back", "allow_cpu-falls-back", "joined-cluster-waits-for-gpus"],
)
def test_cpu_fallback_only_on_the_embedded_ray_or_when_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, embedded: bool, allow_cpu: bool, gpus: float
) -> None:
    """A GPU job on a cluster with no GPU yet never silently gets a CPU replica on a cluster the user started."""
    from farm.config import parse_job
    from farm.runtime.driver import Driver

    monkeypatch.setattr(cluster, "resources_now", lambda: {"CPU": 8.0, "GPU": 0.0})
    job = parse_job(
        {
            "manifest": str(tmp_path / "m.parquet"),
            "output": str(tmp_path / "out"),
            "model": {"backend": "simulated"},
            "resources": {"gpus_per_replica": 1, "allow_cpu": allow_cpu},
        }
    )
    assert Driver(job)._ask(embedded).gpus == gpus
