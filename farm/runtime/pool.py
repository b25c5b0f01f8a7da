"""The replica pool: Ray actors that each hold one model copy, grown and shrunk with the cluster.

The pool keeps ``target`` replicas alive (placed or waiting for room). A replica waiting for room is an actor that
Ray has not placed yet: it starts the moment a node with a free GPU joins, and its pending demand (plus an explicit
``request_resources`` ask) is what makes an autoscaler add nodes. With ``replicas: all`` the target follows what the
cluster can scale to (``cluster.max_gpus``) where an autoscaler says, else the GPUs it has now, less those of
replicas that stopped answering (Ray counts a dead node's GPUs until its health check gives up, ~15 s): a node
replaced in that window does not leave a replica waiting for room for the rest of the job. Replicas lost with their
nodes are re-placed as capacity returns; replicas over the target that have not loaded are stopped (newest first).

Losses are classified here, from what Ray reports: a replica whose node died or was preempted is ``NODE_LOST`` (not
the rows' fault); one whose process died on a live node is a ``CRASH``. An unreachable replica
(``ActorUnavailableError``) is probed until Ray knows which it was, for at most ``node_loss_grace_s``.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from farm.config import JobSpec
from farm.records import ErrorCode, Outcome, Record, Status
from farm.runtime import cluster
from farm.runtime.replica import RemoteReplica, ReplicaStartError
from farm.runtime.scheduler import Loss

log = logging.getLogger("farm")

PROBE_EVERY_S = 1.0
CEILING_EVERY_S = 60.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
NODE_DEATH_MARKERS = ("its node has died", "node was terminated", "node died", "preempt", "drain")


@dataclass(frozen=True)
class Ask:
    """What one replica asks of Ray."""

    gpus: float
    cpus: float

    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("GPU", self.gpus), ("CPU", self.cpus)) if v > 0}

    def describe(self) -> str:
        return f"{self.gpus:g} GPU(s) and {self.cpus:g} CPU(s)"


# ------------------------------------------------------------------ events the driver reads from wait()
@dataclass(frozen=True)
class Ready:
    key: str
    info: dict[str, Any]


@dataclass(frozen=True)
class Done:
    key: str
    ticket: int
    outcome: Outcome


@dataclass(frozen=True)
class Paused:
    """The replica stopped answering; it takes no new rows until its fate is known."""

    key: str


@dataclass(frozen=True)
class Dropped:
    """The replica came back, but this row's result was lost on the way: rerun it, uncharged."""

    key: str
    ticket: int


@dataclass(frozen=True)
class Lost:
    key: str
    loss: Loss
    message: str
    started: bool  # had finished loading the model


@dataclass
class _Handle:
    key: str
    actor: Any
    info_ref: Any
    info: dict[str, Any] | None = None
    refs: dict[Any, int] = field(default_factory=dict)  # in-flight ref -> ticket
    probe_ref: Any = None
    probe_deadline: float = 0.0  # > 0 while the replica is unreachable and being probed
    next_probe_at: float = 0.0
    dropped: list[int] = field(default_factory=list)


class ReplicaPool:
    """Places, starts, watches and kills replicas; tells node loss from a crash."""

    def __init__(self, job: JobSpec, ask: Ask, target: int | str, run_id: str, embedded: bool) -> None:
        self.job = job
        self.ask = ask
        self.fixed_target = target if isinstance(target, int) else None
        self.run_id = run_id
        self.embedded = embedded
        self.target = 0
        self.handles: dict[str, _Handle] = {}
        self._keys = itertools.count()
        self._asked: int | None = None
        self.grace_s = job.runtime.node_loss_grace_s
        self.no_ready_since = time.monotonic()
        self.served: list[dict[str, Any]] = []  # every replica that became ready during this run
        self._ceiling_at: float | None = None
        self._ceiling_gpus = 0.0

    # ------------------------------------------------------------------ size
    def reconcile(self) -> None:
        """Grow or trim to the target (new actors wait for room); ask the autoscaler for what is missing."""
        self.target = self._wanted()
        while self._counted() < self.target:
            self._start()
        self._trim()
        if not self.embedded and self.ask.gpus > 0 and self._asked != self.target:
            cluster.request_bundles([self.ask.bundle()] * self.target)
            self._asked = self.target

    def _counted(self) -> int:
        """Replicas that count toward the target. An unreachable one (probably on a dead node) does not: with a fixed
        target or an autoscaler's ceiling it is replaced at once; with ``all`` and the GPUs present, its GPUs leave the
        target too (Ray still counts them), so a replacement starts when a node joins. If it answers again, ``_trim``
        stops a replacement that has not loaded."""
        return sum(1 for h in self.handles.values() if not h.probe_deadline)

    def _trim(self) -> None:
        """Stop replicas over the target that hold no rows yet (waiting for room or loading), newest first: the
        target went down (capacity left), or a replica given up as unreachable answered again."""
        surplus = self._counted() - self.target
        idle = [k for k, h in reversed(self.handles.items()) if h.info is None and not h.probe_deadline]
        for key in idle[: max(0, surplus)]:
            log.info("%s stopped before loading: %d replica(s) wanted", key, self.target)
            self.kill(key)

    def _wanted(self) -> int:
        if self.fixed_target is not None:
            return self.fixed_target
        if self.ask.gpus <= 0:
            return 1
        unreachable = sum(1 for h in self.handles.values() if h.probe_deadline) * self.ask.gpus
        gpus = max(cluster.resources_now()["GPU"] - unreachable, self._ceiling())
        return max(1, math.floor(gpus / self.ask.gpus + 1e-9))

    def _ceiling(self) -> float:
        """What the autoscaler can scale to, re-read once a minute (it may be an API call or a file)."""
        now = time.monotonic()
        if self._ceiling_at is None or now - self._ceiling_at >= CEILING_EVERY_S:
            self._ceiling_at, self._ceiling_gpus = now, cluster.max_gpus() or 0.0
        return self._ceiling_gpus

    def _start(self) -> None:
        key = f"replica-{next(self._keys)}"
        actor = RemoteReplica.options(
            name=actor_name(self.job.name, self.run_id, key),
            max_concurrency=self.job.resources.in_flight_per_replica + 2,
            max_restarts=0,
            num_gpus=self.ask.gpus,
            num_cpus=self.ask.cpus,
        ).remote(self.job, key)
        self.handles[key] = _Handle(key, actor, actor.info.remote())

    # ------------------------------------------------------------------ rows
    def submit(self, key: str, ticket: int, payload: dict[str, Any]) -> None:
        handle = self.handles[key]
        handle.refs[handle.actor.process.remote(payload)] = ticket

    def kill(self, key: str) -> None:
        handle = self.handles.pop(key, None)
        if handle is not None:
            _kill(handle.actor)

    # ------------------------------------------------------------------ waiting
    def wait(self, timeout_s: float) -> list[Ready | Done | Paused | Dropped | Lost]:
        """Block up to ``timeout_s`` for anything to happen; return what did."""
        owners: dict[Any, _Handle] = {}
        for handle in self.handles.values():
            owners.update({ref: handle for ref in handle.refs})
            if handle.info is None:
                owners[handle.info_ref] = handle
            if handle.probe_ref is not None:
                owners[handle.probe_ref] = handle
        events: list[Any] = []
        if owners:
            ready, _ = ray.wait(list(owners), num_returns=1, timeout=timeout_s)
            if ready:
                ready, _ = ray.wait(list(owners), num_returns=len(owners), timeout=0)
            for ref in ready:
                handle = owners[ref]
                if handle.key in self.handles:  # not lost while handling an earlier ref
                    events.extend(self._on_ready(handle, ref))
        else:
            time.sleep(timeout_s)
        events.extend(self._overdue_probes())
        return events

    def _on_ready(self, handle: _Handle, ref: Any) -> list[Any]:
        if ref == handle.probe_ref:
            return self._on_probe(handle)
        if ref == handle.info_ref and handle.info is None:
            return self._on_info(handle)
        ticket = handle.refs.pop(ref)
        try:
            return [Done(handle.key, ticket, ray.get(ref))]
        except ray.exceptions.RayActorError as exc:
            return self._on_actor_error(handle, exc, ticket)
        except Exception as exc:  # noqa: BLE001 - a bug escaped process(): record it and retry elsewhere
            record = Record(status=Status.FAILED.value, error_code=ErrorCode.GENERATION_ERROR.value)
            record.error_message = str(exc)[:2000]
            return [Done(handle.key, ticket, Outcome(record, retry=True))]

    def _on_info(self, handle: _Handle) -> list[Any]:
        try:
            handle.info = ray.get(handle.info_ref)
        except Exception as exc:  # noqa: BLE001 - RayActorError, or an exception Ray could not deserialize
            return [self._lose(handle, self._classify(handle, exc), _start_failure(exc))]
        self.no_ready_since = 0.0
        self.served.append(handle.info)
        return [Ready(handle.key, handle.info)]

    def _on_actor_error(self, handle: _Handle, exc: Exception, ticket: int) -> list[Any]:
        if isinstance(exc, ray.exceptions.ActorUnavailableError) and not self._node_dead(handle):
            handle.dropped.append(ticket)
            if handle.probe_deadline:
                return []
            handle.probe_ref = handle.actor.ping.remote()
            handle.probe_deadline = time.monotonic() + self.grace_s
            log.warning(
                "%s is not answering (%s); waiting up to %gs to learn whether its node is gone",
                handle.key,
                _short(exc),
                self.grace_s,
            )
            return [Paused(handle.key)]
        return [self._lose(handle, self._classify(handle, exc), _short(exc))]

    def _on_probe(self, handle: _Handle) -> list[Any]:
        """A probe answered: the replica is back; or Ray knows it is dead (and why); or still unreachable: retry.

        An unreachable node is not known dead until Ray's health check gives up on it (~15 s by default), so a
        probe that fails as "unavailable" decides nothing: the replica is probed again until the grace runs out.
        """
        try:
            ray.get(handle.probe_ref)
        except ray.exceptions.ActorUnavailableError:
            if self._node_dead(handle):
                return [self._lose(handle, Loss.NODE_LOST, "its node is no longer alive")]
            handle.probe_ref, handle.next_probe_at = None, time.monotonic() + PROBE_EVERY_S
            return []
        except Exception as exc:  # noqa: BLE001
            return [self._lose(handle, self._classify(handle, exc), _short(exc))]
        log.warning("%s answers again; %d row(s) whose results were lost are rerun", handle.key, len(handle.dropped))
        dropped = [Dropped(handle.key, t) for t in handle.dropped]
        handle.probe_ref, handle.probe_deadline, handle.dropped = None, 0.0, []
        return dropped

    def _overdue_probes(self) -> list[Lost]:
        """Re-probe unreachable replicas that are due; past the grace, an unreachable replica is lost with its node."""
        now = time.monotonic()
        lost = []
        for handle in [h for h in self.handles.values() if h.probe_deadline]:
            if handle.probe_deadline < now:
                lost.append(self._lose(handle, Loss.NODE_LOST, f"unreachable for {self.grace_s:g}s"))
            elif handle.probe_ref is None and handle.next_probe_at <= now:
                if self._node_dead(handle):
                    lost.append(self._lose(handle, Loss.NODE_LOST, "its node is no longer alive"))
                else:
                    handle.probe_ref = handle.actor.ping.remote()
        return lost

    # ------------------------------------------------------------------ losses
    def _classify(self, handle: _Handle, exc: BaseException) -> Loss:
        if getattr(exc, "preempted", False) or self._node_dead(handle):
            return Loss.NODE_LOST
        text = str(exc).lower()
        return Loss.NODE_LOST if any(marker in text for marker in NODE_DEATH_MARKERS) else Loss.CRASH

    def _node_dead(self, handle: _Handle) -> bool:
        node = (handle.info or {}).get("node_id")
        return bool(node) and node not in cluster.alive_nodes()

    def _lose(self, handle: _Handle, loss: Loss, message: str) -> Lost:
        self.kill(handle.key)
        if not any(h.info for h in self.handles.values()) and not self.no_ready_since:
            self.no_ready_since = time.monotonic()
        return Lost(handle.key, loss, message, started=handle.info is not None)

    # ------------------------------------------------------------------ views
    @property
    def ready(self) -> list[str]:
        return [k for k, h in self.handles.items() if h.info is not None and not h.probe_deadline]

    def infos(self) -> list[dict[str, Any]]:
        """Every replica that became ready during this run (lost ones too: where rows ran)."""
        return list(self.served)

    def waiting_for(self) -> str:
        """What the pool is waiting for, in words (progress lines and the start-timeout error)."""
        pending = len(self.handles) - len(self.ready)
        have = cluster.resources_now()
        return (
            f"{len(self.ready)}/{self.target} replicas ready, {pending} loading or waiting for room "
            f"(each asks for {self.ask.describe()}; the cluster has {have['GPU']:g} GPU, {have['CPU']:g} CPU)"
        ) + self._no_node_fits()

    def _no_node_fits(self) -> str:
        """Words for a GPU ask larger than any node: the cluster's total may look enough, but no node can hold one."""
        largest = cluster.largest_node_gpus()
        if not 0 < largest < self.ask.gpus:
            return ""
        return (
            f"; no node has {self.ask.gpus:g} GPUs (the largest has {largest:g}) and a replica's GPUs must all be on "
            f"one node: lower resources.gpus_per_replica, or add nodes with {self.ask.gpus:g} or more GPUs"
        )

    def stats(self) -> list[dict[str, float]]:
        out = []
        for key in self.ready:
            try:
                out.append(ray.get(self.handles[key].actor.stats.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - a dead replica has no stats
                continue
        return out

    def shutdown(self) -> None:
        for key in list(self.handles):
            self.kill(key)
        if self._asked:
            cluster.request_bundles([])


def actor_name(job: str, run_id: str, key: str) -> str:
    """``farm-<job>-<run>-replica-<n>``: what ``ray list actors`` and the dashboard show (job name made safe)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", job).strip("-")[:40] or "job"
    return f"farm-{safe}-{run_id[:12]}-{key}"


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _start_failure(exc: BaseException) -> str:
    """The loader's one line when the replica's ``__init__`` raised (``ReplicaStartError`` is the last line of the
    creation task's traceback), else ``_short``."""
    marker = f"{ReplicaStartError.__name__}: "
    if getattr(exc, "actor_init_failed", False):
        lines = [ANSI.sub("", line).strip() for line in str(exc).splitlines() if line.strip()]
        if lines and marker in lines[-1]:
            return lines[-1].split(marker, 1)[1]
    return _short(exc)


def _short(exc: BaseException) -> str:
    """One readable line: a traceback's last line (the error itself) rather than its frames."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{type(exc).__name__}: {lines[0][:160]} ... {lines[-1][:1000]}"
    return f"{type(exc).__name__}: {(lines or [''])[0][:1000]}"


__all__ = ["Ask", "Done", "Dropped", "Lost", "Paused", "Ready", "ReplicaPool"]
