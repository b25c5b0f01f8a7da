"""The Ray cluster as the farm sees it: joining it, what it has now, what it can scale to, which nodes are alive.

**Joining.** The farm joins an existing cluster only when told to: ``--address`` or ``RAY_ADDRESS`` (Ray Jobs sets
the latter for the job's entrypoint). Otherwise it starts its own local, *embedded* Ray (``address="local"``), never
one that happens to run on the machine. Only on the embedded cluster (or with ``resources.allow_cpu``) may a job that
asks for GPUs fall back to CPU replicas.

**What the cluster can scale to** (for ``resources.replicas: all``), read in this order:
1. the autoscaler's cluster config where Ray keeps one in its GCS;
2. on KubeRay (``RAY_CLUSTER_NAME`` and ``RAY_CLUSTER_NAMESPACE`` set in the pod), the RayCluster object itself, read
   from the Kubernetes API and turned into an autoscaling config the way Ray's KubeRay autoscaler does;
3. a cluster-launcher config: ``$FARM_AUTOSCALER_CONFIG``, else ``~/ray_bootstrap_config.yaml`` on the head node;
In 2 and 3: the sum over worker node types of ``max_workers`` x their ``resources.GPU`` (largest nodes first, capped
by the top-level ``max_workers``), plus the head's.
4. otherwise the GPUs the cluster has now, re-read as nodes join and leave (``pool.ReplicaPool._wanted``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import ray
import yaml

from farm.runtime.errors import JobAborted

log = logging.getLogger("farm")

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
CONNECT_TIMEOUT_S = 10.0  # to open a TCP connection to a cluster address before handing it to Ray


_embedded_gcs: str | None = None  # the GCS address of the local Ray this process started, while it runs


def connect(address: str | None = None) -> bool:
    """Join ``address`` / ``RAY_ADDRESS`` if given, else start an embedded local Ray. True = embedded.

    Already connected counts as joined (a notebook, a test: the caller chose that cluster), unless it is the embedded
    Ray this process started itself, for an earlier job of a sweep: that one stays embedded (CPU fallback included).
    """
    global _embedded_gcs
    if ray.is_initialized():
        return _embedded_gcs is not None and ray.get_runtime_context().gcs_address == _embedded_gcs
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # replica log lines without colour codes in files and Ray Jobs
    context = ray.init(
        address=address or "local",
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    info = getattr(context, "address_info", None) or {}
    _embedded_gcs = info.get("gcs_address") if address is None else None
    return address is None


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when nothing answers at a ``host:port`` (or ``ray://host:port``) cluster
    address: ``ray.init`` would retry an unreachable GCS for minutes with only its own warnings. ``auto`` and other
    forms are left to Ray."""
    found = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)", address.strip())
    if not found:
        return
    host, port = found.group(1), int(found.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise JobAborted(
            f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}): is its head node running, and the "
            "port open from here? Check --address / RAY_ADDRESS (the head's GCS address, host:6379 by default; "
            "ray://host:10001 for Ray Client)"
        ) from None


def resources_now() -> dict[str, float]:
    """CPU and GPU totals of the nodes alive now."""
    have = ray.cluster_resources()
    return {"CPU": float(have.get("CPU", 0)), "GPU": float(have.get("GPU", 0))}


def largest_node_gpus() -> float:
    """The most GPUs one alive node has: all GPUs of a replica must be on one node."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return max((float((n.get("Resources") or {}).get("GPU", 0)) for n in nodes), default=0.0)


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def max_gpus() -> float | None:
    """The most GPUs the autoscaler can bring up (see the module docstring), or None where nothing says."""
    try:
        from ray._private.state import state

        published = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: any failure means "not published"
        published = None
    if published and published.get("GPU"):
        return float(published["GPU"])
    kuberay = _kuberay_max_gpus()
    if kuberay:
        return kuberay
    path = Path(os.path.expanduser(os.environ.get("FARM_AUTOSCALER_CONFIG", BOOTSTRAP_CONFIG)))
    if path.is_file():
        try:
            return gpus_in_launcher_config(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError) as exc:
            log.warning("cannot read the autoscaler config %s (%s): replicas follow the GPUs present", path, exc)
    return None


def _kuberay_max_gpus() -> float | None:
    """What the RayCluster this pod belongs to can scale to (KubeRay), or None off KubeRay or when it cannot be read."""
    name, namespace = os.environ.get("RAY_CLUSTER_NAME"), os.environ.get("RAY_CLUSTER_NAMESPACE")
    if not (name and namespace):
        return None
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
        from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

        ray_cr = KubernetesHttpApiClient(namespace).get(f"rayclusters/{name}")
        return gpus_in_launcher_config(_derive_autoscaling_config_from_ray_cr(ray_cr))
    except Exception as exc:  # noqa: BLE001 - no API access (RBAC), no service account: fall back
        log.warning(
            "cannot read RayCluster %s/%s (%s): replicas: all falls back to other sources", namespace, name, exc
        )
        return None


def gpus_in_launcher_config(config: dict[str, Any]) -> float | None:
    """GPUs a cluster-launcher config can scale to: worker types' ``max_workers`` x GPU (capped), plus the head."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    total = 0.0
    per_node: list[tuple[float, int]] = []
    for name, node_type in types.items():
        gpus = float((node_type.get("resources") or {}).get("GPU", 0))
        if name == head:
            total += gpus
        elif gpus > 0:
            per_node.append((gpus, int(node_type.get("max_workers", 0))))
    budget = int(cap) if cap is not None else None
    for gpus, count in sorted(per_node, reverse=True):  # the largest nodes first: what "can scale to" means
        take = count if budget is None else min(count, budget)
        total += gpus * take
        if budget is not None:
            budget -= take
    return total if total > 0 else None


def request_bundles(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for these bundles (replaces the previous ask; ``[]`` withdraws it)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as exc:  # noqa: BLE001 - no autoscaler API on this cluster: placement still works
        log.debug("request_resources failed: %s", exc)


def is_multi_node() -> bool:
    """More than one node now, or an autoscaler that can add some."""
    return len(alive_nodes()) > 1 or bool(max_gpus())


__all__ = [
    "alive_nodes",
    "check_reachable",
    "connect",
    "gpus_in_launcher_config",
    "largest_node_gpus",
    "max_gpus",
    "request_bundles",
    "resources_now",
]
