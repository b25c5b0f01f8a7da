"""The scheduling rules, with no Ray in them: which row goes to which replica, and what a failure costs a row.

* Each ready replica holds up to ``cap`` rows, so its CPU stages overlap the model. Rows come from the retry queue
  first, then the manifest stream.
* A replica that **crashes** (or is killed for a row past its deadline) with one row in flight charges that row; with
  several in flight it charges none, and they become *suspects*. A suspect re-runs alone on a reserved replica, so
  the next crash is unambiguous. A row charged ``max_attempts`` times is final: ``poison`` (or ``timeout``).
* A replica lost with its **node** (node died, preempted, drained) charges nothing and is no crash: its rows go back
  to the front of the queue as they were.
* A row fault that a replica reports (e.g. CUDA OOM) charges the row and retries it on another replica.
* The job ends when the stream is drained, the queue is empty and nothing is in flight.

The clock is passed in, so every rule is unit-tested with a fake clock in milliseconds.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from farm.records import ErrorCode
from farm.types import GenerationRequest


class Loss(enum.Enum):
    """Why a replica went away: only ``CRASH`` and ``TIMEOUT`` are charged to the rows it held."""

    CRASH = "crash"
    TIMEOUT = "timeout"
    NODE_LOST = "node_lost"


@dataclass
class Task:
    """One manifest row on its way through the farm."""

    row: dict[str, Any]
    request: GenerationRequest
    dispatches: int = 0
    charged: int = 0  # faults attributed to this row
    suspect: bool = False
    avoid: str | None = None  # replica that last failed it
    last_fault: tuple[ErrorCode, str] | None = None

    @property
    def id(self) -> str:
        return self.request.id


@dataclass(frozen=True)
class Dispatch:
    """Run ``task`` on ``replica``; the pool answers with ``ticket``."""

    replica: str
    ticket: int
    task: Task


@dataclass(frozen=True)
class Final:
    """A row that may not be tried again, with the code and message its record carries."""

    task: Task
    code: ErrorCode
    message: str


@dataclass
class _Replica:
    key: str
    inflight: dict[int, tuple[Task, float]] = field(default_factory=dict)
    solo: bool = False  # running one suspect alone
    reserved: bool = False  # draining, to run a suspect alone next
    paused: bool = False  # not answering: no new rows until it answers again or is removed


class Scheduler:
    """Queue, in-flight rows per replica, charging, deadlines and the end of the job."""

    def __init__(
        self,
        tasks: Iterable[Task],
        cap: int,
        max_attempts: int,
        row_timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._stream: Iterator[Task] | None = iter(tasks)
        self.cap = cap
        self.max_attempts = max_attempts
        self.row_timeout_s = row_timeout_s
        self.clock = clock
        self.queue: deque[Task] = deque()
        self.replicas: dict[str, _Replica] = {}
        self.crashes = 0  # replica losses charged to rows (node losses are not counted)
        self.node_losses = 0
        self._tickets = itertools.count(1)

    # ------------------------------------------------------------------ replicas
    def add_replica(self, key: str) -> None:
        """A replica finished loading and can take rows."""
        self.replicas[key] = _Replica(key)

    def pause(self, key: str) -> None:
        if key in self.replicas:
            self.replicas[key].paused = True
            self.replicas[key].reserved = False

    def resume(self, key: str) -> None:
        if key in self.replicas:
            self.replicas[key].paused = False

    def inflight(self, key: str) -> list[Task]:
        replica = self.replicas.get(key)
        return [t for t, _ in replica.inflight.values()] if replica else []

    def remove_replica(self, key: str, loss: Loss, message: str) -> list[Final]:
        """``key`` is gone; its rows go back to the queue, charged by the rules above. Returns the rows now final."""
        replica = self.replicas.pop(key, None)
        if replica is None:
            return []
        tasks = [t for t, _ in replica.inflight.values()]
        if loss is Loss.NODE_LOST:
            self.node_losses += 1
            self.queue.extendleft(reversed(tasks))
            return []
        self.crashes += 1
        code = ErrorCode.TIMEOUT if loss is Loss.TIMEOUT else ErrorCode.POISON
        alone = len(tasks) == 1
        finals: list[Final] = []
        for task in tasks:
            if alone:
                task.charged += 1
                task.last_fault = (code, message)
                task.avoid = key
            if task.charged >= self.max_attempts:
                finals.append(
                    Final(
                        task, code, f"row was running when its replica was lost {task.charged} times; last: {message}"
                    )
                )
                continue
            task.suspect = not alone or task.charged > 0
            self.queue.appendleft(task)
        return finals

    def late_replicas(self) -> list[tuple[str, Task]]:
        """Replicas holding a row past its deadline (the caller kills them: ``remove_replica(.., TIMEOUT, ..)``)."""
        now = self.clock()
        late = []
        for replica in self.replicas.values():
            overdue = [t for t, deadline in replica.inflight.values() if deadline < now]
            if overdue:
                late.append((replica.key, overdue[0]))
        return late

    # ------------------------------------------------------------------ rows
    def completed(self, key: str, ticket: int) -> Task:
        """The row behind ``ticket`` came back from ``key`` (its result is the caller's to read)."""
        replica = self.replicas[key]
        task, _ = replica.inflight.pop(ticket)
        replica.solo = False
        return task

    def row_fault(self, key: str, task: Task, code: ErrorCode, message: str) -> bool:
        """A fault charged to the row (e.g. OOM) on a live replica: True = requeued, False = out of attempts."""
        task.charged += 1
        task.avoid = key
        task.last_fault = (code, message)
        if task.charged < self.max_attempts:
            self.queue.append(task)
            return True
        return False

    def requeue(self, task: Task) -> None:
        """Put a row back at the front uncharged (its replica's fate is still unknown)."""
        self.queue.appendleft(task)

    @property
    def stream_open(self) -> bool:
        return self._stream is not None

    @property
    def done(self) -> bool:
        return not self.stream_open and not self.queue and not any(r.inflight for r in self.replicas.values())

    @property
    def busy(self) -> int:
        return sum(len(r.inflight) for r in self.replicas.values())

    # ------------------------------------------------------------------ filling
    def fill(self) -> list[Dispatch]:
        """Hand rows to replicas with room; suspects run alone on a reserved (drained) replica.

        Two passes: first each replica takes rows it is not asked to avoid; then rows avoided by every replica that
        had room are taken anyway rather than left idle. One row is read ahead of the stream even with no replica,
        so a job with nothing left to do ends without waiting for one.
        """
        self._look_ahead()
        out: list[Dispatch] = []
        ordered = sorted((r for r in self.replicas.values() if not r.paused), key=lambda r: len(r.inflight))
        self._reserve_for_suspect(ordered)
        open_slots: list[_Replica] = []
        for replica in ordered:
            if replica.solo:
                continue
            if replica.reserved:
                if replica.inflight:
                    continue
                replica.reserved = False
                suspect = self._pop(lambda t, key=replica.key: t.suspect and t.avoid != key) or self._pop(
                    lambda t: t.suspect
                )
                if suspect is not None:
                    replica.solo = True
                    out.append(self._dispatch(replica, suspect))
                    continue
            out.extend(self._top_up(replica, self._next_for))
            open_slots.append(replica)
        for replica in open_slots:  # only avoided rows left: take them rather than idle
            out.extend(self._top_up(replica, lambda r: self._pop(lambda t: not t.suspect)))
        return out

    def _top_up(self, replica: _Replica, source: Callable[[_Replica], Task | None]) -> list[Dispatch]:
        out = []
        while len(replica.inflight) < self.cap:
            task = source(replica)
            if task is None:
                break  # others may still need filling (e.g. a reserved replica further on)
            out.append(self._dispatch(replica, task))
        return out

    def _reserve_for_suspect(self, ordered: list[_Replica]) -> None:
        """Drain one replica (least loaded, preferably not the one the suspect failed on) to run a suspect alone."""
        suspect = next((t for t in self.queue if t.suspect), None)
        if suspect is None or not ordered or any(r.reserved or r.solo for r in ordered):
            return
        choice = next((r for r in ordered if r.key != suspect.avoid), ordered[0])
        choice.reserved = True

    def _look_ahead(self) -> None:
        if self._stream is not None and not self.queue:
            task = self._read_stream()
            if task is not None:
                self.queue.append(task)

    def _read_stream(self) -> Task | None:
        if self._stream is None:
            return None
        try:
            return next(self._stream)
        except StopIteration:
            self._stream = None
            return None

    def _pop(self, wanted: Callable[[Task], bool]) -> Task | None:
        for i, task in enumerate(self.queue):
            if wanted(task):
                del self.queue[i]
                return task
        return None

    def _next_for(self, replica: _Replica) -> Task | None:
        alone = sum(not r.paused for r in self.replicas.values()) == 1
        task = self._pop(lambda t: not t.suspect and (t.avoid != replica.key or alone))
        if task is not None:
            return task
        return self._read_stream()

    def _dispatch(self, replica: _Replica, task: Task) -> Dispatch:
        now = self.clock()
        deadline = now + self.row_timeout_s * (1 + len(replica.inflight))
        task.dispatches += 1
        ticket = next(self._tickets)
        replica.inflight[ticket] = (task, deadline)
        return Dispatch(replica.key, ticket, task)


__all__ = ["Dispatch", "Final", "Loss", "Scheduler", "Task"]
