"""How many replicas the pool keeps (``ReplicaPool.reconcile``), without Ray: the cluster view is faked, replicas are
plain handles. ``replicas: all`` follows the GPUs there are (less those of replicas that stopped answering) or can
be; replicas over the target that hold no rows are stopped, newest first; loaded ones never are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from farm.config import parse_job
from farm.runtime import cluster
from farm.runtime.pool import Ask, ReplicaPool, _Handle


class FakePool(ReplicaPool):
    """Handles without actors: ``_start`` adds one, ``kill`` drops it (and remembers it)."""

    def __init__(self, target: int | str, ask: Ask, **kwargs: Any) -> None:
        super().__init__(job(kwargs.pop("tmp_path")), ask, target, "run", embedded=True)
        self.killed: list[str] = []

    def _start(self) -> None:
        key = f"replica-{next(self._keys)}"
        self.handles[key] = _Handle(key, actor=None, info_ref=None)

    def kill(self, key: str) -> None:
        self.handles.pop(key)
        self.killed.append(key)

    def load(self, *keys: str) -> None:
        for key in keys:
            self.handles[key].info = {"node_id": "n"}

    def unreachable(self, *keys: str) -> None:
        for key in keys:
            self.handles[key].probe_deadline = 1e18


def job(tmp_path: Path):
    return parse_job(
        {"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"), "model": {"backend": "simulated"}}
    )


@pytest.fixture()
def gpus(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The fake cluster: GPUs now (as Ray reports them), the autoscaler's ceiling (0: none), the largest node."""
    state = {"now": 0.0, "ceiling": 0.0, "largest": 1.0}
    monkeypatch.setattr(cluster, "resources_now", lambda: {"CPU": 8.0, "GPU": state["now"]})
    monkeypatch.setattr(cluster, "max_gpus", lambda: state["ceiling"] or None)
    monkeypatch.setattr(cluster, "largest_node_gpus", lambda: state["largest"])
    return state


def test_all_follows_the_gpus_up_and_down_and_trims_only_replicas_without_rows(tmp_path: Path, gpus) -> None:
    pool = FakePool("all", Ask(gpus=1, cpus=1), tmp_path=tmp_path)
    gpus["now"] = 2
    pool.reconcile()
    assert pool.target == 2 and list(pool.handles) == ["replica-0", "replica-1"]
    pool.load("replica-0", "replica-1")
    gpus["now"] = 4
    pool.reconcile()
    assert pool.target == 4 and len(pool.handles) == 4
    pool.load("replica-2")  # replica-3 still waits for room when two GPUs leave
    gpus["now"] = 2
    pool.reconcile()
    assert pool.target == 2 and pool.killed == ["replica-3"], "only the one without rows is stopped"
    assert sorted(pool.handles) == ["replica-0", "replica-1", "replica-2"], "loaded replicas are never stopped"


def test_a_replaced_node_counted_twice_by_ray_leaves_no_replica_waiting_all_job(tmp_path: Path, gpus) -> None:
    """One GPU node dies and a new one joins before Ray's health check gives up on the old: Ray reports 2 GPUs, but
    the dead node's replica stopped answering, so the target stays 1; the replacement is placed on the new node."""
    pool = FakePool("all", Ask(gpus=1, cpus=1), tmp_path=tmp_path)
    gpus["now"] = 1
    pool.reconcile()
    pool.load("replica-0")
    pool.unreachable("replica-0")  # its node was killed
    pool.reconcile()
    assert pool.target == 1 and list(pool.handles) == ["replica-0", "replica-1"], "replaced at once"
    gpus["now"] = 2  # the new node joined; the dead one is still counted
    pool.reconcile()
    assert pool.target == 1 and len(pool.handles) == 2
    del pool.handles["replica-0"]  # lost with its node
    gpus["now"] = 1  # Ray gave up on the dead node
    pool.reconcile()
    assert pool.target == 1 and list(pool.handles) == ["replica-1"] and not pool.killed


def test_a_replacement_made_while_ray_still_counted_the_dead_node_is_stopped(tmp_path: Path, gpus) -> None:
    pool = FakePool("all", Ask(gpus=1, cpus=1), tmp_path=tmp_path)
    gpus["now"] = 2  # node A (lost, its replica already given up) still counted, node B joined
    pool.reconcile()
    pool.load("replica-0")
    assert len(pool.handles) == 2
    gpus["now"] = 1
    pool.reconcile()
    assert pool.target == 1 and pool.killed == ["replica-1"]


def test_the_autoscaler_ceiling_keeps_replacements_waiting_for_new_nodes(tmp_path: Path, gpus) -> None:
    pool = FakePool("all", Ask(gpus=1, cpus=1), tmp_path=tmp_path)
    gpus.update(now=1, ceiling=4)
    pool.reconcile()
    assert pool.target == 4 and len(pool.handles) == 4
    gpus["now"] = 0  # the only node died: what the autoscaler can bring back still counts
    pool.reconcile()
    assert pool.target == 4 and not pool.killed


def test_a_fixed_target_trims_a_replacement_when_the_lost_replica_answers_again(tmp_path: Path, gpus) -> None:
    pool = FakePool(2, Ask(gpus=1, cpus=1), tmp_path=tmp_path)
    gpus["now"] = 2
    pool.reconcile()
    pool.load("replica-0", "replica-1")
    pool.unreachable("replica-1")
    pool.reconcile()
    assert list(pool.handles) == ["replica-0", "replica-1", "replica-2"]
    pool.handles["replica-1"].probe_deadline = 0.0  # it answers again
    pool.reconcile()
    assert pool.killed == ["replica-2"] and pool.target == 2


def test_an_ask_larger_than_any_node_is_named(tmp_path: Path, gpus) -> None:
    pool = FakePool("all", Ask(gpus=2, cpus=1), tmp_path=tmp_path)
    gpus.update(now=2, largest=1)  # two 1-GPU nodes: 2 GPUs in total, none can hold a replica
    pool.reconcile()
    words = pool.waiting_for()
    assert "the cluster has 2 GPU" in words
    assert "no node has 2 GPUs (the largest has 1)" in words and "lower resources.gpus_per_replica" in words
    gpus["largest"] = 2
    assert "no node has" not in pool.waiting_for()


def test_the_farm_s_own_ray_refuses_a_replica_larger_than_the_machine(tmp_path: Path, gpus) -> None:
    from farm.config import SpecError
    from farm.runtime.driver import Driver

    spec = job(tmp_path).model_dump()
    spec["resources"]["gpus_per_replica"] = 2
    gpus.update(now=1, largest=1)
    with pytest.raises(SpecError, match=r"gpus_per_replica=2: this machine has 1 GPU\(s\)"):
        Driver(parse_job(spec))._ask(embedded=True)
    assert Driver(parse_job(spec))._ask(embedded=False).gpus == 2  # a joined cluster may get larger nodes
