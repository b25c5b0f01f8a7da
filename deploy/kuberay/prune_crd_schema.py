"""Write crd-schemas.json: KubeRay's RayCluster and RayJob OpenAPI schemas, pruned to the fields our manifests use.

KubeRay's CRDs are ~2 MB of YAML and no PyPI package ships them, so tests/test_deploy_configs.py validates the
manifests in this folder against this pruned copy instead. Every object the manifests touch keeps all of its property
names (a misspelled or misplaced field is reported as unknown), types, enums and required lists; properties the
manifests do not use keep only their type. Regenerate after editing the manifests or upgrading KubeRay:

    python deploy/kuberay/prune_crd_schema.py <kuberay checkout> > deploy/kuberay/crd-schemas.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFESTS = ("raycluster.yaml", "rayjob.yaml")
SHALLOW = ("type", "enum", "format", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")
KEEP = (*SHALLOW, "required", "anyOf", "pattern", "minimum", "maximum")


def prune(schema: dict[str, Any], instances: list[Any]) -> dict[str, Any]:
    """``schema`` cut down to what validating ``instances`` needs (see the module docstring)."""
    if not instances:
        return {k: schema[k] for k in SHALLOW if k in schema}
    out = {k: schema[k] for k in KEEP if k in schema}
    dicts = [i for i in instances if isinstance(i, dict)]
    if "properties" in schema:
        out["properties"] = {
            name: prune(sub, [d[name] for d in dicts if name in d]) for name, sub in schema["properties"].items()
        }
    if isinstance(schema.get("additionalProperties"), dict):
        values = [v for d in dicts for k, v in d.items() if k not in schema.get("properties", {})]
        out["additionalProperties"] = prune(schema["additionalProperties"], values)
    if isinstance(schema.get("items"), dict):
        out["items"] = prune(schema["items"], [x for i in instances if isinstance(i, list) for x in i])
    return out


def main(kuberay: str) -> None:
    root = Path(kuberay)
    docs = [d for name in MANIFESTS for d in yaml.safe_load_all((HERE / name).read_text())]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    result: dict[str, Any] = {
        "$comment": f"KubeRay ray-operator/config/crd/bases at {commit.strip() or 'unknown'}, pruned by "
        "deploy/kuberay/prune_crd_schema.py"
    }
    for kind, filename in CRDS.items():
        crd = yaml.safe_load((root / "ray-operator" / "config" / "crd" / "bases" / filename).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        result[kind] = prune(version["schema"]["openAPIV3Schema"], [d for d in docs if d.get("kind") == kind])
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
