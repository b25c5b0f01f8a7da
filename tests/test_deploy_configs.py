"""The cluster configs users deploy with: cluster.yaml (Ray cluster launcher) and deploy/kuberay/ (KubeRay).

cluster.yaml goes through the pinned ray package's own launcher validation (ray-schema.json) and autoscaler config
reader; the KubeRay manifests go through KubeRay's CRD schemas (deploy/kuberay/crd-schemas.json) and through the
function the KubeRay autoscaler in the pinned ray uses to turn a RayCluster into its view of the cluster. On top, the
fields the farm relies on: GPU node types declare their GPUs, the head declares none, autoscaling is on, token auth is
on, the RayJob runs `farm run` on the RayCluster's spec.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"

# What each instance type has (AWS's published specs): a node type must declare exactly these, or the autoscaler
# plans replicas on GPUs that aren't there (or leaves some idle). Add an instance type here before using it.
INSTANCE_FACTS: dict[str, dict[str, Any]] = {
    "m6i.2xlarge": {"CPU": 8, "GPU": 0},
    "m6i.4xlarge": {"CPU": 16, "GPU": 0},
    "p4d.24xlarge": {"CPU": 96, "GPU": 8, "accelerator": "A100"},  # 8 x A100 40 GB
    "p4de.24xlarge": {"CPU": 96, "GPU": 8, "accelerator": "A100"},  # 8 x A100 80 GB
    "p5.48xlarge": {"CPU": 192, "GPU": 8, "accelerator": "H100"},  # 8 x H100 80 GB
    "g5.12xlarge": {"CPU": 48, "GPU": 4, "accelerator": "A10G"},  # 4 x A10G 24 GB
    "g5.48xlarge": {"CPU": 192, "GPU": 8, "accelerator": "A10G"},
    "g6e.12xlarge": {"CPU": 48, "GPU": 4, "accelerator": "L40S"},  # 4 x L40S 48 GB
}


def _pyproject_pin(package: str) -> str:
    """The ``==`` version pyproject.toml pins ``package`` to."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}(?:\[[^\]]*\])?==([^"]+)"', text)
    assert match, f"pyproject.toml does not pin {package}"
    return match.group(1)


# ------------------------------------------------------------------ cluster.yaml (Ray cluster launcher)
@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _launcher_validate(config: dict[str, Any]) -> None:
    """What `ray up` runs on a config before touching the cloud (the AWS resource autofill aside)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_ray_launcher_validation(cluster: dict[str, Any]) -> None:
    _launcher_validate(cluster)


def test_launcher_validation_rejects_a_node_type_without_resources(cluster: dict[str, Any]) -> None:
    """The check above is real: the original cluster.yaml's GPU types had no `resources` and failed it."""
    broken = copy.deepcopy(cluster)
    name = next(n for n in broken["available_node_types"] if n != broken["head_node_type"])
    broken["available_node_types"][name].pop("resources", None)
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        _launcher_validate(broken)


def test_node_types_declare_their_instance_resources(cluster: dict[str, Any]) -> None:
    """Read as the head's autoscaler (v2) reads it; declared CPU/GPU/accelerator match the instance type."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    config = AutoscalingConfig(copy.deepcopy(cluster), skip_content_hash=True)
    head = config.get_head_node_type()
    types = config.get_node_type_configs()
    for name, node_type in types.items():
        instance = cluster["available_node_types"][name]["node_config"]["InstanceType"]
        assert instance in INSTANCE_FACTS, f"{name}: add {instance}'s CPU/GPU to INSTANCE_FACTS"
        facts = INSTANCE_FACTS[instance]
        declared = node_type.resources
        if name == head:
            # Replicas always ask for CPU (cpus_per_replica > 0): CPU 0 and GPU 0 keep every replica off the head.
            assert declared.get("CPU") == 0 and declared.get("GPU") == 0, f"head {name} must declare CPU 0, GPU 0"
            assert node_type.max_worker_nodes == 1  # the head itself, never more
            continue
        assert facts["GPU"] > 0, f"worker type {name} ({instance}) has no GPU"
        assert declared.get("GPU") == facts["GPU"], f"{name}: {instance} has {facts['GPU']} GPUs, declared {declared}"
        assert declared.get("CPU") == facts["CPU"], f"{name}: {instance} has {facts['CPU']} vCPUs, declared {declared}"
        assert declared.get(f"accelerator_type:{facts['accelerator']}") == 1, f"{name}: accelerator_type resource"
        assert node_type.min_worker_nodes == 0  # GPUs come when the farm's driver asks the autoscaler for them


def test_cluster_can_scale_to_gpus(cluster: dict[str, Any]) -> None:
    """The autoscaler's view that ``replicas: all`` is sized from: sum of max_workers x GPU, capped by max_workers."""
    types = cluster["available_node_types"]
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"] and t.get("max_workers", 0) > 0}
    assert workers, "no GPU node type can be launched"
    per_node = max(t["resources"]["GPU"] for t in workers.values())
    ceiling = min(
        sum(t["max_workers"] * t["resources"]["GPU"] for t in workers.values()), cluster["max_workers"] * per_node
    )
    assert ceiling == 64  # 8 nodes x 8 A100s
    from ray.autoscaler._private.util import prepare_config

    from farm.runtime.cluster import gpus_in_launcher_config  # what the driver reads from ~/ray_bootstrap_config.yaml

    assert gpus_in_launcher_config(prepare_config(copy.deepcopy(cluster))) == ceiling


def test_cluster_runs_ray_with_token_auth(cluster: dict[str, Any]) -> None:
    """Ray 2.60 token auth: every `ray start` in token mode, the token synced to all nodes, shells export the mode."""
    starts = [
        c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cluster[key] if "ray start" in c
    ]
    assert len(starts) == 2
    assert all(re.search(r"(^|\s)RAY_AUTH_MODE=token\s+ray start", c) for c in starts), starts
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in cluster["setup_commands"])
    torch = _pyproject_pin("torch")
    assert any(f"torch=={torch}" in c for c in cluster["setup_commands"]), f"setup_commands must pin torch=={torch}"


# ------------------------------------------------------------------ deploy/kuberay
def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _by_kind(name: str) -> dict[str, dict[str, Any]]:
    """A manifest's documents by kind (ConfigMaps by ``ConfigMap/<name>``)."""
    out: dict[str, dict[str, Any]] = {}
    for doc in _docs(name):
        key = f"ConfigMap/{doc['metadata']['name']}" if doc["kind"] == "ConfigMap" else doc["kind"]
        assert key not in out, f"{name}: two {key}"
        out[key] = doc
    return out


@pytest.fixture(scope="module")
def raycluster_docs() -> dict[str, dict[str, Any]]:
    docs = _by_kind("raycluster.yaml")
    assert set(docs) == {"RayCluster", "ConfigMap/lynx-farm-autoscaler"}, set(docs)
    return docs


@pytest.fixture(scope="module")
def raycluster(raycluster_docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return raycluster_docs["RayCluster"]


@pytest.fixture(scope="module")
def rayjob_docs() -> dict[str, dict[str, Any]]:
    docs = _by_kind("rayjob.yaml")
    assert set(docs) == {"RayJob", "ConfigMap/lynx-farm-jobs", "ConfigMap/lynx-farm-autoscaler"}, set(docs)
    return docs


def _strict(instance: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Fields the schema doesn't know. Kubernetes drops unknown fields silently, and JSON Schema allows them."""
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [e for i, item in enumerate(instance) for e in _strict(item, schema["items"], f"{path}[{i}]")]
    if not isinstance(instance, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    errors = []
    for key, value in instance.items():
        if props is not None and key in props:
            errors += _strict(value, props[key], f"{path}.{key}")
        elif isinstance(extra, dict):
            errors += _strict(value, extra, f"{path}.{key}")
        elif props is not None:
            errors.append(f"unknown field {path}.{key}")
    return errors


def test_kuberay_manifests_match_the_crd_schemas(raycluster: dict[str, Any], rayjob_docs: dict[str, Any]) -> None:
    schemas = json.loads((KUBERAY / "crd-schemas.json").read_text())
    for doc in (raycluster, rayjob_docs["RayJob"]):
        assert doc["apiVersion"] == "ray.io/v1"
        schema = schemas[doc["kind"]]
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
        ]
        errors += _strict(doc, schema)
        assert not errors, f"{doc['kind']}: {errors}"


def test_crd_check_reports_misspelled_fields(raycluster: dict[str, Any]) -> None:
    schema = json.loads((KUBERAY / "crd-schemas.json").read_text())["RayCluster"]
    broken = copy.deepcopy(raycluster)
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = broken["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert _strict(broken, schema) == ["unknown field $.spec.workerGroupSpecs[0].maxReplica"]


def _gpu_quantity(container: dict[str, Any]) -> dict[str, str]:
    res = container.get("resources", {})
    return {kind: res.get(kind, {}).get("nvidia.com/gpu") for kind in ("limits", "requests")}


def test_raycluster_gpu_workers_autoscale_and_head_has_no_gpu(raycluster: dict[str, Any]) -> None:
    spec = raycluster["spec"]
    assert raycluster["kind"] == "RayCluster"
    assert spec["rayVersion"] == _pyproject_pin("ray")
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    assert all(_gpu_quantity(c) == {"limits": None, "requests": None} for c in head["template"]["spec"]["containers"])
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        ray_container = group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first
        gpus = group["rayStartParams"]["num-gpus"]
        assert int(gpus) >= 1, group["groupName"]
        assert _gpu_quantity(ray_container) == {"limits": gpus, "requests": gpus}, group["groupName"]
        assert group["minReplicas"] == 0 and group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_raycluster_as_the_kuberay_autoscaler_sees_it(raycluster: dict[str, Any]) -> None:
    """The pinned ray's KubeRay autoscaler derives its config from the CR (and validates it with ray's schema)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = copy.deepcopy(raycluster)
    cr["metadata"].setdefault("namespace", "default")
    config = _derive_autoscaling_config_from_ray_cr(cr)
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert head["resources"]["CPU"] == 0 and head["resources"]["GPU"] == 0
    for group in raycluster["spec"]["workerGroupSpecs"]:
        node_type = types[group["groupName"]]
        assert node_type["resources"]["GPU"] == int(group["rayStartParams"]["num-gpus"])
        assert node_type["min_workers"] == 0 and node_type["max_workers"] == group["maxReplicas"]
    assert sum(t["max_workers"] * t["resources"]["GPU"] for t in types.values()) >= 1


def _mounted_file(pod: dict[str, Any], path: Path, docs: dict[str, dict[str, Any]]) -> str:
    """The text a pod sees at ``path``: a key of a ConfigMap (from ``docs``) mounted on its first container."""
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if path.parent == Path(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return docs[f"ConfigMap/{volume['configMap']['name']}"]["data"][path.name]


def test_farm_sizes_replicas_all_from_the_kuberay_autoscaler_view(
    raycluster_docs: dict[str, dict[str, Any]], rayjob_docs: dict[str, dict[str, Any]]
) -> None:
    """The head's FARM_AUTOSCALER_CONFIG file says what the KubeRay autoscaler (as the pinned ray derives it) says."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from farm.runtime.cluster import gpus_in_launcher_config

    assert rayjob_docs["ConfigMap/lynx-farm-autoscaler"] == raycluster_docs["ConfigMap/lynx-farm-autoscaler"]
    cr = copy.deepcopy(raycluster_docs["RayCluster"])
    cr["metadata"].setdefault("namespace", "default")
    derived = _derive_autoscaling_config_from_ray_cr(cr)
    head_pod = cr["spec"]["headGroupSpec"]["template"]["spec"]
    (env,) = [e["value"] for e in head_pod["containers"][0]["env"] if e["name"] == "FARM_AUTOSCALER_CONFIG"]
    view = yaml.safe_load(_mounted_file(head_pod, Path(env), raycluster_docs))
    assert view["head_node_type"] == derived["head_node_type"] and view["max_workers"] == derived["max_workers"]
    for name, node_type in derived["available_node_types"].items():
        mine = view["available_node_types"][name]
        assert mine["max_workers"] == node_type["max_workers"], name
        assert mine["resources"]["GPU"] == node_type["resources"].get("GPU", 0), name
    gpus = gpus_in_launcher_config(view)
    assert gpus == gpus_in_launcher_config(derived) == 64  # 8 pods x 8 GPUs


def test_rayjob_runs_farm_on_the_raycluster_spec(
    raycluster: dict[str, Any], rayjob_docs: dict[str, Any], tmp_path: Path
) -> None:
    from farm.config import load_job

    job = rayjob_docs["RayJob"]["spec"]
    assert job["rayClusterSpec"] == raycluster["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    assert "clusterSelector" not in job
    assert job["shutdownAfterJobFinishes"] is True
    assert job.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    # No entrypoint resources: the driver then runs on the head (a supervisor with CPU > 0 could not go there).
    assert not any(job.get(k) for k in ("entrypointNumCpus", "entrypointNumGpus", "entrypointResources"))

    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["farm", "run"] and len(argv) == 3, argv
    spec_path = Path(argv[2])
    head_pod = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    text = _mounted_file(head_pod, spec_path, rayjob_docs)

    local = tmp_path / spec_path.name
    local.write_text(text)
    spec = load_job(local)  # what `farm run` does with it
    raw = yaml.safe_load(text)
    uris = [raw["manifest"], raw["output"], *raw["model"]["weights"].values(), raw["identity"]["pack"]]
    assert all("://" in u for u in uris), f"on a cluster, give object-store URIs: {uris}"
    assert spec.resources.replicas == "all"


def test_dockerfile_builds_the_pinned_stack() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)", text, re.M)
    assert base and base.group(1).startswith(_pyproject_pin("ray") + "-"), "base image must carry the pinned ray"
    assert f"torch=={_pyproject_pin('torch')}" in text
    assert "pip install" in text and "-e " in text
