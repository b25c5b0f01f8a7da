"""The pure scheduler (farm.runtime.scheduler), rule by rule, with a fake clock and no Ray.

Each test drives ``Scheduler`` the way ``farm.runtime.driver`` does: ``fill`` -> (pool runs the rows) ->
``completed`` / ``row_fault`` on results, ``remove_replica`` on losses, ``late_replicas`` for deadlines and
``pause`` / ``completed`` + ``requeue`` / ``resume`` for a replica that stopped answering.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest

from farm.params import SamplingParams
from farm.records import ErrorCode
from farm.runtime.scheduler import Dispatch, Final, Loss, Scheduler, Task
from farm.types import GenerationRequest

T0 = 1000.0  # the fake clock starts here (any value; time.monotonic in the driver)
TIMEOUT_S = 10.0


class FakeClock:
    """The scheduler's clock: ``now`` only moves when a test advances it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Stream:
    """A manifest stream of ``n`` rows that records how many rows the scheduler pulled from it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled: list[str] = []

    def __iter__(self) -> Iterator[Task]:
        for i in range(self.n):
            task = make_task(f"row-{i:03d}", seed=i)
            self.pulled.append(task.id)
            yield task


def make_task(row_id: str, seed: int = 0) -> Task:
    request = GenerationRequest(
        id=row_id, prompt="a person talking", negative_prompt="", params=SamplingParams(), seed=seed
    )
    return Task(row={"id": row_id, "portrait": "p.png", "prompt": request.prompt}, request=request)


def make(
    n: int,
    replicas: tuple[str, ...] = ("a", "b"),
    cap: int = 2,
    max_attempts: int = 3,
    row_timeout_s: float = TIMEOUT_S,
) -> tuple[Scheduler, Stream, FakeClock]:
    stream, clock = Stream(n), FakeClock()
    sched = Scheduler(stream, cap=cap, max_attempts=max_attempts, row_timeout_s=row_timeout_s, clock=clock)
    for key in replicas:
        sched.add_replica(key)
    return sched, stream, clock


def placed(dispatches: list[Dispatch]) -> list[tuple[str, str]]:
    return [(d.replica, d.task.id) for d in dispatches]


def inflight_ids(sched: Scheduler, key: str) -> list[str]:
    return [t.id for t in sched.inflight(key)]


def queue_ids(sched: Scheduler) -> list[str]:
    return [t.id for t in sched.queue]


class Tickets:
    """What the pool would remember: ticket per (replica, row id), so a test can complete a row by its id."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.by_row: dict[str, Dispatch] = {}

    def fill(self) -> list[Dispatch]:
        out = self.sched.fill()
        for d in out:
            self.by_row[d.task.id] = d
        return out

    def complete(self, row_id: str) -> Task:
        d = self.by_row.pop(row_id)
        task = self.sched.completed(d.replica, d.ticket)
        assert task is d.task
        return task

    def lose(self, key: str, loss: Loss, message: str = "boom") -> list[Final]:
        for row_id in [r for r, d in self.by_row.items() if d.replica == key]:
            del self.by_row[row_id]
        return self.sched.remove_replica(key, loss, message)

    def drain(self, limit: int = 10_000) -> list[str]:
        """Fill and complete everything until the job is done; returns the ids completed, in order."""
        done: list[str] = []
        for _ in range(limit):
            self.fill()
            if self.sched.done:
                return done
            assert self.by_row, "rows remain but nothing can be dispatched"
            for row_id in list(self.by_row):
                done.append(self.complete(row_id).id)
        raise AssertionError("job did not finish")


# ---------------------------------------------------------------------------------------------------- filling
def test_fill_respects_cap_per_replica() -> None:
    sched, stream, _ = make(50, replicas=("a", "b", "c"), cap=2)
    out = sched.fill()
    assert Counter(d.replica for d in out) == {"a": 2, "b": 2, "c": 2}
    assert sched.busy == 6
    assert sched.fill() == []  # every replica is full
    assert len(stream.pulled) == 7  # six dispatched, one read ahead
    first = out[0]
    sched.completed(first.replica, first.ticket)
    again = sched.fill()
    assert [d.replica for d in again] == [first.replica]  # only the slot that freed up
    assert all(len(sched.inflight(k)) == 2 for k in ("a", "b", "c"))


def test_fill_serves_least_loaded_replica_first() -> None:
    sched, stream, _ = make(6, replicas=("a",), cap=3)
    t = Tickets(sched)
    assert [r for r, _ in placed(t.fill())] == ["a", "a", "a"]
    t.complete("row-000")  # a: 2 in flight
    sched.add_replica("b")
    sched.add_replica("c")
    out = t.fill()  # 3 rows left in the stream: b (empty) and c (empty) come before a (2 in flight)
    assert placed(out) == [("b", "row-003"), ("b", "row-004"), ("b", "row-005")]
    assert inflight_ids(sched, "a") == ["row-001", "row-002"]
    assert inflight_ids(sched, "c") == []


def test_fill_spreads_over_idle_replicas_before_loaded_one() -> None:
    sched, _, _ = make(20, replicas=("a",), cap=2)
    t = Tickets(sched)
    t.fill()
    t.complete("row-000")  # a: 1 in flight
    sched.add_replica("b")
    out = t.fill()
    assert [r for r, _ in placed(out)] == ["b", "b", "a"]


def test_fill_takes_retry_queue_before_stream() -> None:
    sched, stream, _ = make(20, replicas=("a",), cap=1)
    t = Tickets(sched)
    t.fill()
    task = t.complete("row-000")
    sched.requeue(task)
    out = t.fill()
    assert placed(out) == [("a", "row-000")]
    assert stream.pulled == ["row-000"]  # the stream was not touched
    assert task.dispatches == 2
    assert task.charged == 0


def test_fill_pulls_stream_lazily() -> None:
    sched, stream, _ = make(1000, replicas=("a", "b"), cap=2)
    t = Tickets(sched)
    assert sched.stream_open
    assert len(stream.pulled) == 0  # nothing pulled before the first fill
    t.fill()
    assert len(stream.pulled) == 4
    t.fill()
    assert len(stream.pulled) == 5  # one row read ahead, never more
    t.fill()
    assert len(stream.pulled) == 5
    t.complete("row-001")
    t.fill()
    assert len(stream.pulled) == 5  # the row read ahead went out
    assert sched.busy == 4


def test_no_replica_reads_one_row_ahead() -> None:
    sched, stream, _ = make(10, replicas=())
    assert sched.fill() == []
    assert sched.fill() == []
    assert len(stream.pulled) == 1
    assert not sched.done


def test_a_job_with_nothing_left_ends_without_a_replica() -> None:
    """A rerun of a finished job on a cluster with no GPU node yet must not wait for one."""
    sched, stream, _ = make(0, replicas=())
    assert sched.fill() == []
    assert sched.done


def test_stream_end_is_discovered_by_fill() -> None:
    sched, stream, _ = make(2, replicas=("a",), cap=2)
    t = Tickets(sched)
    t.fill()
    assert len(stream.pulled) == 2
    assert sched.stream_open  # not yet known to be exhausted
    t.complete("row-000")
    t.complete("row-001")
    assert not sched.done  # the stream may still have rows
    assert t.fill() == []
    assert not sched.stream_open
    assert sched.done


# ---------------------------------------------------------------------------------------------------- end of job
def test_end_of_job_crash_with_other_replica_idle_reruns_the_row() -> None:
    """Issue 7: a replica dies with its row near the end (stream drained, the other replica idle)."""
    sched, _, _ = make(2, replicas=("a", "b"), cap=1)
    t = Tickets(sched)
    assert placed(t.fill()) == [("a", "row-000"), ("b", "row-001")]
    t.complete("row-001")
    assert t.fill() == []  # stream drained, b idle
    assert not sched.stream_open
    assert not sched.done
    assert t.lose("a", Loss.CRASH, "segfault") == []
    task = sched.queue[0]
    assert (task.id, task.charged, task.suspect, task.avoid) == ("row-000", 1, True, "a")
    assert task.last_fault == (ErrorCode.POISON, "segfault")
    assert sched.crashes == 1
    assert placed(t.fill()) == [("b", "row-000")]  # rerun alone on the replica left
    assert sched.replicas["b"].solo
    t.complete("row-000")
    assert t.fill() == []
    assert sched.done
    assert task.dispatches == 2


def test_end_of_job_reserved_replica_after_an_idle_one_is_reached() -> None:
    """The old bug: an idle replica earlier in the fill order made fill return before the reserved one."""
    sched, _, _ = make(5, replicas=("a", "b", "c"), cap=2)
    t = Tickets(sched)
    assert placed(t.fill()) == [
        ("a", "row-000"),
        ("a", "row-001"),
        ("b", "row-002"),
        ("b", "row-003"),
        ("c", "row-004"),
    ]
    t.complete("row-002")  # b: 1 in flight
    assert t.fill() == []
    assert not sched.stream_open
    t.lose("c", Loss.CRASH)  # row-004 alone: charged, suspect
    assert t.fill() == []  # b (least loaded) is reserved and drains
    assert sched.replicas["b"].reserved
    t.complete("row-000")
    t.complete("row-001")  # a idle, before b in the fill order
    assert t.fill() == []
    t.complete("row-003")  # b drained
    assert placed(t.fill()) == [("b", "row-004")]
    t.complete("row-004")
    assert t.fill() == []
    assert sched.done


def test_end_of_job_replacement_replica_finishes_the_job() -> None:
    sched, _, _ = make(2, replicas=("a", "b"), cap=1)
    t = Tickets(sched)
    t.fill()
    t.lose("a", Loss.CRASH)
    sched.add_replica("a2")  # the pool restarted the lost replica
    completed = t.drain()
    assert sorted(completed) == ["row-000", "row-001"]
    assert sched.done


# ---------------------------------------------------------------------------------------------------- suspects
def test_crash_with_several_rows_makes_suspects_uncharged() -> None:
    sched, _, _ = make(20, replicas=("a", "b"), cap=3)
    t = Tickets(sched)
    t.fill()
    held = sched.inflight("a")
    assert len(held) == 3
    assert t.lose("a", Loss.CRASH) == []
    assert sched.crashes == 1
    assert sched.node_losses == 0
    assert sorted(queue_ids(sched)) == sorted(x.id for x in held)
    assert all(x.suspect and x.charged == 0 and x.last_fault is None and x.avoid is None for x in held)


def test_suspect_runs_alone_on_a_drained_replica() -> None:
    sched, stream, _ = make(100, replicas=("a", "b"), cap=2)
    t = Tickets(sched)
    t.fill()  # a: 000 001, b: 002 003
    t.lose("a", Loss.CRASH)  # 000 and 001: suspects
    assert t.fill() == []  # b is reserved: it drains, takes nothing new
    assert sched.replicas["b"].reserved
    pulled = len(stream.pulled)
    t.complete("row-002")
    assert t.fill() == []  # still draining (one in flight)
    t.complete("row-003")
    out = t.fill()
    assert len(out) == 1
    assert out[0].replica == "b" and out[0].task.suspect
    assert sched.replicas["b"].solo and not sched.replicas["b"].reserved
    assert len(sched.inflight("b")) == 1
    assert t.fill() == []  # alone: nothing joins it, the other suspect waits
    assert len(stream.pulled) == pulled
    sched.add_replica("c")  # a new replica takes normal rows; the second suspect keeps waiting for a solo slot
    out = t.fill()
    assert [r for r, _ in placed(out)] == ["c", "c"]
    assert not any(d.task.suspect for d in out)
    assert [x.suspect for x in sched.queue] == [True]


def test_crash_while_running_alone_charges_the_suspect() -> None:
    sched, _, _ = make(4, replicas=("a", "b"), cap=2)
    t = Tickets(sched)
    t.fill()  # a: 000 001, b: 002 003
    t.lose("a", Loss.CRASH)
    t.complete("row-002")
    t.complete("row-003")
    (first,) = t.fill()
    assert first.replica == "b" and first.task.charged == 0
    assert t.lose("b", Loss.CRASH, "illegal memory access") == []
    assert first.task.charged == 1
    assert first.task.suspect
    assert first.task.avoid == "b"
    assert first.task.last_fault == (ErrorCode.POISON, "illegal memory access")
    assert sched.queue[0] is first.task  # back at the front
    other = sched.queue[1]
    assert other.charged == 0  # the other suspect was never blamed
    assert sched.crashes == 2


@pytest.mark.parametrize(("loss", "code"), [(Loss.CRASH, ErrorCode.POISON), (Loss.TIMEOUT, ErrorCode.TIMEOUT)])
def test_row_charged_max_attempts_is_final(loss: Loss, code: ErrorCode) -> None:
    sched, _, _ = make(3, replicas=("r0",), cap=3, max_attempts=3)
    t = Tickets(sched)
    t.fill()
    t.lose("r0", Loss.CRASH)  # three suspects
    t.fill()  # no replica: nothing
    sched.add_replica("r1")
    (d,) = t.fill()
    poison = d.task
    finals: list[Final] = []
    for attempt in range(1, 4):
        assert sched.inflight(d.replica) == [poison]  # always alone
        finals = t.lose(d.replica, loss, "died")
        assert poison.charged == attempt
        if attempt < 3:
            assert finals == []
            assert sched.queue[0] is poison
            sched.add_replica(f"r{attempt + 1}")
            (d,) = t.fill()
            assert d.task is poison
    assert len(finals) == 1
    final = finals[0]
    assert final.task is poison and final.code is code
    assert "3 times" in final.message and "died" in final.message
    assert poison not in sched.queue
    sched.add_replica("r9")
    completed = t.drain()
    assert sorted(completed + [poison.id]) == ["row-000", "row-001", "row-002"]
    assert all(x.charged == 0 for x in sched.queue)


def test_suspect_success_frees_the_replica_for_normal_rows() -> None:
    sched, _, _ = make(30, replicas=("a", "b"), cap=2)
    t = Tickets(sched)
    t.fill()
    t.lose("a", Loss.CRASH)  # 000 001 suspects
    t.complete("row-002")
    t.complete("row-003")
    (d,) = t.fill()
    t.complete(d.task.id)
    assert not sched.replicas["b"].solo
    out = t.fill()  # the next suspect: b is idle, reserved at once and runs it alone
    assert len(out) == 1 and out[0].task.suspect
    t.complete(out[0].task.id)
    assert not any(x.suspect for x in sched.queue)
    out = t.fill()  # no suspect left: b takes normal rows up to cap again
    assert [r for r, _ in placed(out)] == ["b", "b"]
    assert not sched.replicas["b"].solo and not sched.replicas["b"].reserved


def test_suspect_is_never_dispatched_next_to_other_rows() -> None:
    sched, _, _ = make(40, replicas=("a", "b", "c"), cap=3)
    t = Tickets(sched)
    t.fill()
    t.lose("a", Loss.CRASH)  # three suspects
    sched.add_replica("d")
    completed: list[str] = []
    solo_runs = 0
    while not sched.done:
        t.fill()
        for key in sched.replicas:
            held = sched.inflight(key)
            if any(x.suspect for x in held):
                assert len(held) == 1
                assert sched.replicas[key].solo
                solo_runs += 1
        for row_id in list(t.by_row)[:2]:
            completed.append(t.complete(row_id).id)
    assert sorted(completed) == [f"row-{i:03d}" for i in range(40)]
    assert solo_runs >= 3


# ---------------------------------------------------------------------------------------------------- node loss
def test_node_loss_requeues_at_front_uncharged() -> None:
    sched, _, _ = make(20, replicas=("a", "b"), cap=3)
    t = Tickets(sched)
    t.fill()  # a: 000-002, b: 003-005
    t.complete("row-003")
    sched.requeue(t.complete("row-004"))  # something already waiting in the queue
    assert t.lose("a", Loss.NODE_LOST, "node died") == []
    assert queue_ids(sched) == ["row-000", "row-001", "row-002", "row-004"]
    assert all(x.charged == 0 and not x.suspect and x.last_fault is None for x in sched.queue)
    assert sched.crashes == 0
    assert sched.node_losses == 1
    out = t.fill()  # b (1 in flight) takes them first, in order, as normal rows (not alone)
    assert placed(out) == [("b", "row-000"), ("b", "row-001")]
    assert not sched.replicas["b"].solo


def test_node_loss_keeps_a_suspect_a_suspect_and_its_charges() -> None:
    sched, _, _ = make(2, replicas=("a", "b"), cap=1)
    t = Tickets(sched)
    t.fill()
    t.complete("row-001")
    t.lose("a", Loss.CRASH)  # row-000: charged 1, suspect
    (d,) = t.fill()
    assert d.replica == "b"
    assert t.lose("b", Loss.NODE_LOST) == []
    assert d.task.suspect and d.task.charged == 1
    assert sched.crashes == 1 and sched.node_losses == 1


def test_node_loss_of_last_replica_waits_for_a_new_one() -> None:
    sched, stream, _ = make(10, replicas=("a",), cap=2)
    t = Tickets(sched)
    t.fill()
    t.lose("a", Loss.NODE_LOST)
    assert sched.busy == 0
    assert t.fill() == []
    assert not sched.done
    assert len(stream.pulled) == 2
    sched.add_replica("b")
    assert placed(t.fill()) == [("b", "row-000"), ("b", "row-001")]  # the lost rows first
    assert len(stream.pulled) == 2
    completed = t.drain()
    assert completed[:2] == ["row-000", "row-001"]
    assert sorted(completed) == sorted(stream.pulled) == [f"row-{i:03d}" for i in range(10)]
    assert sched.crashes == 0


def test_node_loss_never_charges_even_many_times() -> None:
    sched, _, _ = make(1, replicas=("n0",), cap=1, max_attempts=2)
    t = Tickets(sched)
    for i in range(1, 6):
        (d,) = t.fill()
        assert t.lose(d.replica, Loss.NODE_LOST) == []
        sched.add_replica(f"n{i}")
    assert d.task.charged == 0 and not d.task.suspect and d.task.dispatches == 5
    assert t.drain() == ["row-000"]
    assert sched.crashes == 0 and sched.node_losses == 5


# ---------------------------------------------------------------------------------------------------- row faults
def test_row_fault_charges_avoids_and_requeues_at_back() -> None:
    sched, _, _ = make(20, replicas=("a", "b"), cap=2)
    t = Tickets(sched)
    t.fill()
    sched.requeue(t.complete("row-003"))
    task = t.complete("row-000")
    assert sched.row_fault("a", task, ErrorCode.INFRA, "CUDA out of memory") is True
    assert task.charged == 1 and task.avoid == "a" and not task.suspect
    assert task.last_fault == (ErrorCode.INFRA, "CUDA out of memory")
    assert queue_ids(sched) == ["row-003", "row-000"]
    assert sched.crashes == 0


def test_row_fault_retries_on_another_replica() -> None:
    sched, stream, _ = make(20, replicas=("a", "b"), cap=1)
    t = Tickets(sched)
    t.fill()  # a: 000, b: 001
    sched.row_fault("a", t.complete("row-000"), ErrorCode.INFRA, "oom")
    assert placed(t.fill()) == [("a", "row-002")]  # a takes a fresh row, not the one it failed
    assert queue_ids(sched) == ["row-000"]
    t.complete("row-001")
    assert placed(t.fill()) == [("b", "row-000")]
    assert stream.pulled[-1] == "row-002"


def test_row_fault_on_single_replica_is_retried_there() -> None:
    sched, stream, _ = make(20, replicas=("a",), cap=1)
    t = Tickets(sched)
    t.fill()
    sched.row_fault("a", t.complete("row-000"), ErrorCode.INFRA, "oom")
    assert placed(t.fill()) == [("a", "row-000")]
    assert stream.pulled == ["row-000"]


def test_avoided_row_is_taken_rather_than_idle_once_the_stream_is_drained() -> None:
    sched, _, _ = make(2, replicas=("a", "b"), cap=1)
    t = Tickets(sched)
    t.fill()  # a: 000, b: 001 (b stays busy)
    sched.row_fault("a", t.complete("row-000"), ErrorCode.INFRA, "oom")
    assert placed(t.fill()) == [("a", "row-000")]
    assert not sched.stream_open


def test_row_fault_out_of_attempts_returns_false() -> None:
    sched, _, _ = make(1, replicas=("a",), cap=1, max_attempts=2)
    t = Tickets(sched)
    t.fill()
    task = t.complete("row-000")
    assert sched.row_fault("a", task, ErrorCode.INFRA, "oom") is True
    (d,) = t.fill()
    assert d.task is task
    assert sched.row_fault("a", t.complete("row-000"), ErrorCode.INFRA, "oom again") is False
    assert task.charged == 2 and task.last_fault == (ErrorCode.INFRA, "oom again")
    assert task not in sched.queue
    assert t.fill() == []
    assert sched.done  # the caller records it


def test_row_fault_of_a_suspect_retries_on_another_replica() -> None:
    sched, _, _ = make(3, replicas=("a", "b", "c"), cap=1)
    t = Tickets(sched)
    t.fill()  # a: 000, b: 001, c: 002
    t.lose("a", Loss.CRASH)  # row-000 alone: charged 1, suspect
    t.complete("row-001")
    t.complete("row-002")
    assert placed(t.fill()) == [("b", "row-000")]  # alone on b; c idle, the stream is drained
    task = t.complete("row-000")
    assert sched.row_fault("b", task, ErrorCode.INFRA, "CUDA out of memory") is True
    assert task.avoid == "b" and task.suspect and task.charged == 2
    # b and c are both idle: the rule says the row is retried on another replica, i.e. on c
    assert placed(t.fill()) == [("c", "row-000")]


def test_avoided_row_goes_to_another_replica_with_room_at_the_end() -> None:
    sched, _, _ = make(3, replicas=("a", "b"), cap=2)
    t = Tickets(sched)
    assert placed(t.fill()) == [("a", "row-000"), ("a", "row-001"), ("b", "row-002")]
    assert t.fill() == []  # b pulls: the stream is drained
    assert not sched.stream_open
    t.complete("row-000")
    assert sched.row_fault("a", t.complete("row-001"), ErrorCode.INFRA, "CUDA out of memory") is True
    # a (idle, the replica that faulted it) comes before b (1 in flight, 1 free slot) in fill's order
    assert placed(t.fill()) == [("b", "row-001")]


# ---------------------------------------------------------------------------------------------------- deadlines
def test_late_replicas_follow_row_timeout_times_rows_ahead() -> None:
    sched, _, clock = make(20, replicas=("a",), cap=3, row_timeout_s=10.0)
    t = Tickets(sched)
    t.fill()  # at T0: deadlines T0+10, T0+20, T0+30
    assert sched.late_replicas() == []
    clock.now = T0 + 10.0
    assert sched.late_replicas() == []  # not before the deadline has passed
    clock.now = T0 + 10.001
    late = sched.late_replicas()
    assert [(k, x.id) for k, x in late] == [("a", "row-000")]
    t.complete("row-000")
    assert sched.late_replicas() == []  # row-001 had one row ahead: 20 s
    clock.now = T0 + 20.0
    assert sched.late_replicas() == []
    clock.now = T0 + 20.5
    assert [(k, x.id) for k, x in sched.late_replicas()] == [("a", "row-001")]
    t.complete("row-001")
    # at T0+20.5 behind row-002: row-003 has one row ahead (T0+40.5), row-004 two (T0+50.5)
    assert [x for _, x in placed(t.fill())] == ["row-003", "row-004"]
    clock.now = T0 + 30.0
    assert sched.late_replicas() == []
    clock.now = T0 + 30.1
    assert [x.id for _, x in sched.late_replicas()] == ["row-002"]
    t.complete("row-002")
    clock.now = T0 + 40.5
    assert sched.late_replicas() == []
    clock.now = T0 + 40.6
    assert [x.id for _, x in sched.late_replicas()] == ["row-003"]
    t.complete("row-003")
    clock.now = T0 + 50.5
    assert sched.late_replicas() == []
    clock.now = T0 + 50.6
    assert [x.id for _, x in sched.late_replicas()] == ["row-004"]


def test_late_replicas_reports_each_late_replica_once() -> None:
    sched, _, clock = make(20, replicas=("a", "b"), cap=2, row_timeout_s=5.0)
    t = Tickets(sched)
    t.fill()
    clock.advance(100)
    late = sched.late_replicas()
    assert sorted(k for k, _ in late) == ["a", "b"]
    for key, task in late:
        assert task in sched.inflight(key)


def test_timeout_kill_of_a_replica_with_one_row_charges_timeout() -> None:
    sched, _, clock = make(1, replicas=("a", "b"), cap=1, row_timeout_s=5.0)
    t = Tickets(sched)
    t.fill()
    clock.advance(6)
    ((key, task),) = sched.late_replicas()
    assert t.lose(key, Loss.TIMEOUT, "row-000 exceeded row_timeout_s=5") == []
    assert task.charged == 1 and task.suspect
    assert task.last_fault == (ErrorCode.TIMEOUT, "row-000 exceeded row_timeout_s=5")
    assert placed(t.fill()) == [("b", "row-000")]
    assert sched.late_replicas() == []  # fresh deadline from the new dispatch
    clock.advance(5.5)
    assert [k for k, _ in sched.late_replicas()] == ["b"]


# ---------------------------------------------------------------------------------------------------- pause/resume
def test_paused_replica_gets_no_new_rows() -> None:
    sched, _, _ = make(20, replicas=("a", "b"), cap=2)
    t = Tickets(sched)
    t.fill()
    sched.pause("a")
    t.complete("row-000")
    t.complete("row-002")
    out = t.fill()
    assert [r for r, _ in placed(out)] == ["b"]
    t.complete("row-001")
    assert t.fill() == []  # a has room but is paused
    assert sched.inflight("a") == []
    sched.resume("a")
    assert [r for r, _ in placed(t.fill())] == ["a", "a"]
    sched.pause("nobody")  # unknown keys are ignored
    sched.resume("nobody")


def test_requeue_puts_a_dropped_row_at_the_front_uncharged() -> None:
    """The driver's Dropped flow: completed -> requeue -> resume."""
    sched, _, _ = make(20, replicas=("a", "b"), cap=2)
    t = Tickets(sched)
    t.fill()  # a: 000 001, b: 002 003
    sched.pause("a")
    sched.row_fault("b", t.complete("row-002"), ErrorCode.INFRA, "oom")  # queue: 002
    dropped = t.complete("row-001")
    sched.requeue(dropped)
    sched.resume("a")
    assert queue_ids(sched) == ["row-001", "row-002"]
    assert dropped.charged == 0 and not dropped.suspect and dropped.avoid is None
    out = t.fill()
    assert placed(out)[0][1] == "row-001"


def test_paused_replica_is_not_reserved_for_a_suspect() -> None:
    sched, _, _ = make(20, replicas=("a", "b", "c"), cap=2)
    t = Tickets(sched)
    t.fill()  # a: 000 001, b: 002 003, c: 004 005
    t.lose("a", Loss.CRASH)
    for row_id in ("row-002", "row-003"):
        t.complete(row_id)
    sched.pause("b")  # b is idle but does not answer
    out = t.fill()
    assert all(d.replica != "b" for d in out)
    assert not sched.replicas["b"].reserved
    assert sched.replicas["c"].reserved


# ---------------------------------------------------------------------------------------------------- bookkeeping
def test_done_and_busy() -> None:
    sched, _, _ = make(3, replicas=("a", "b"), cap=1)
    t = Tickets(sched)
    assert not sched.done and sched.busy == 0  # stream not drained
    t.fill()
    assert sched.busy == 2 and not sched.done
    t.complete("row-000")
    assert sched.busy == 1
    t.fill()  # row-002 on a
    assert sched.busy == 2
    t.complete("row-001")
    t.complete("row-002")
    assert sched.busy == 0
    assert t.fill() == []
    assert not sched.stream_open and not sched.queue and sched.done
    sched.requeue(make_task("late"))
    assert not sched.done  # a queued row keeps the job open
    (d,) = t.fill()
    assert not sched.done  # ... and so does a row in flight
    t.complete(d.task.id)
    assert sched.done


def test_empty_stream_is_done_after_the_first_fill() -> None:
    sched, _, _ = make(0, replicas=("a",))
    assert not sched.done
    assert sched.fill() == []
    assert sched.done


def test_remove_unknown_replica_is_a_noop() -> None:
    sched, _, _ = make(5, replicas=("a",), cap=2)
    t = Tickets(sched)
    t.fill()
    for loss in Loss:
        assert sched.remove_replica("ghost", loss, "never started") == []
    assert sched.crashes == 0 and sched.node_losses == 0
    assert sched.busy == 2 and not sched.queue
    t.lose("a", Loss.CRASH)
    assert sched.remove_replica("a", Loss.CRASH, "again") == []
    assert sched.crashes == 1
    assert sched.inflight("a") == []


def test_tickets_are_unique() -> None:
    sched, _, _ = make(30, replicas=("a", "b", "c"), cap=3)
    t = Tickets(sched)
    tickets = [d.ticket for d in t.fill()]
    t.complete("row-000")
    tickets += [d.ticket for d in t.fill()]
    assert len(tickets) == len(set(tickets)) == 10


# ---------------------------------------------------------------------------------------------------- randomized
@pytest.mark.parametrize("seed", range(12))
def test_randomized_every_row_ends_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    n_rows, max_attempts = rng.randint(20, 60), 3
    stream, clock = Stream(n_rows), FakeClock()
    sched = Scheduler(stream, cap=rng.randint(1, 3), max_attempts=max_attempts, row_timeout_s=TIMEOUT_S, clock=clock)
    keys = iter(f"r{i}" for i in range(10_000))
    for _ in range(rng.randint(0, 3)):
        sched.add_replica(next(keys))
    outstanding: dict[int, tuple[str, Task]] = {}
    completed: list[str] = []
    finals: list[str] = []
    charges: Counter[str] = Counter()  # faults the test attributed to each row
    expected_crashes = expected_node_losses = 0

    def lose(key: str, loss: Loss) -> None:
        nonlocal expected_crashes, expected_node_losses
        held = sched.inflight(key)
        before = {x.id: (x.charged, x.suspect) for x in held}
        if loss is Loss.NODE_LOST:
            expected_node_losses += 1
        else:
            expected_crashes += 1
            if len(held) == 1:
                charges[held[0].id] += 1
        gone = sched.remove_replica(key, loss, "lost")
        for ticket in [k for k, (r, _) in outstanding.items() if r == key]:
            del outstanding[ticket]
        for final in gone:
            assert final.code is (ErrorCode.TIMEOUT if loss is Loss.TIMEOUT else ErrorCode.POISON)
            assert final.task.charged == max_attempts and final.task is held[0]
            finals.append(final.task.id)
        if loss is Loss.NODE_LOST:
            assert {x.id: (x.charged, x.suspect) for x in held} == before
            assert queue_ids(sched)[: len(held)] == [x.id for x in held]
        elif len(held) > 1:
            assert all(x.suspect and x.charged == before[x.id][0] for x in held)

    def check() -> None:
        queued = queue_ids(sched)
        running = [x.id for key in sched.replicas for x in sched.inflight(key)]
        everywhere = queued + running + completed + finals
        assert len(everywhere) == len(set(everywhere)), "a row is in two places"
        assert sorted(everywhere) == sorted(stream.pulled), "a row was lost"
        assert sched.busy == len(outstanding) == len(running)
        assert sched.crashes == expected_crashes and sched.node_losses == expected_node_losses
        for key in sched.replicas:
            held = sched.inflight(key)
            assert len(held) <= sched.cap
            if any(x.suspect for x in held):
                assert len(held) == 1, "a suspect ran next to other rows"
        for x in list(sched.queue) + [task for _, task in outstanding.values()]:
            assert x.charged == charges[x.id] < max_attempts

    for _ in range(400):
        action = rng.choices(
            ["fill", "complete", "fault", "crash", "timeout", "node", "add", "pause", "resume", "drop", "tick"],
            weights=[30, 30, 5, 3, 2, 4, 5, 2, 3, 2, 4],
        )[0]
        live = list(sched.replicas)
        if action == "fill":
            paused = {k for k in live if sched.replicas[k].paused}
            for d in sched.fill():
                assert d.replica not in paused
                outstanding[d.ticket] = (d.replica, d.task)
        elif action in ("complete", "fault", "drop") and outstanding:
            ticket = rng.choice(list(outstanding))
            key, expected = outstanding.pop(ticket)
            task = sched.completed(key, ticket)
            assert task is expected
            if action == "complete":
                completed.append(task.id)
            elif action == "fault":
                charges[task.id] += 1
                if not sched.row_fault(key, task, ErrorCode.INFRA, "oom"):
                    assert task.charged == max_attempts
                    finals.append(task.id)
            else:
                sched.pause(key)
                sched.requeue(task)
                sched.resume(key)
        elif action in ("crash", "timeout", "node") and live:
            loss = {"crash": Loss.CRASH, "timeout": Loss.TIMEOUT, "node": Loss.NODE_LOST}[action]
            lose(rng.choice(live), loss)
        elif action == "add" and len(live) < 4:
            sched.add_replica(next(keys))
        elif action == "pause" and live:
            sched.pause(rng.choice(live))
        elif action == "resume" and live:
            sched.resume(rng.choice(live))
        elif action == "tick":
            clock.advance(rng.uniform(0, TIMEOUT_S))
            for key, _ in sched.late_replicas():
                lose(key, Loss.TIMEOUT)
        check()

    # the end: every replica answers, at least one exists, rows complete until the job is done
    for key in sched.replicas:
        sched.resume(key)
    if not sched.replicas:
        sched.add_replica(next(keys))
    for _ in range(10_000):
        for d in sched.fill():
            outstanding[d.ticket] = (d.replica, d.task)
        check()
        if sched.done:
            break
        assert outstanding, "rows remain but nothing was dispatched"
        for ticket in rng.sample(list(outstanding), len(outstanding)):
            key, _ = outstanding.pop(ticket)
            completed.append(sched.completed(key, ticket).id)
    assert sched.done
    ended = completed + finals
    assert sorted(ended) == [f"row-{i:03d}" for i in range(n_rows)]  # every row exactly once
    assert Counter(ended).most_common(1)[0][1] == 1
