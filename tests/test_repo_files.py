"""The repository's promises: README's two commands, CI running exactly the README's test command, cluster.yaml."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_starts_with_demo_and_test_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < text.index("\n## "), "the two commands come first"
    install, tests = _readme_commands()
    assert "pip install" in install and "farm run jobs/demo.yaml" in install and "make-tiny" in install
    assert tests == "python -m pytest"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci if line and not line.startswith("#")]
    assert commands[-1] == _readme_commands()[1]
    assert any(line.startswith("pip install") for line in commands)


def test_cluster_yaml_has_cpu_head_and_gpu_workers() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_types and all(t["node_config"]["InstanceType"].startswith(("p4d", "p5", "g5", "g6")) for t in gpu_types)
    assert any("pip install" in c and "lynx-farm" in c for c in config["setup_commands"])
    assert "~/lynx-farm" in config["file_mounts"]


def test_demo_job_points_at_the_tiny_checkpoint_and_shipped_portraits() -> None:
    job = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    assert job["model"]["backend"] == "lynx" and "tiny-lynx" in job["model"]["weights"]["base"]
    import pyarrow.parquet as pq

    portraits = set(pq.read_table(ROOT / job["manifest"]).column("portrait").to_pylist())
    assert portraits and all(p.startswith("pkg://") for p in portraits)
