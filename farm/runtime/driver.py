"""The driver: stream the manifest, keep every replica fed, retry infrastructure faults, commit records.

Scheduling: each ready replica holds up to ``in_flight_per_replica`` rows (so its CPU stages overlap the model);
rows come from a retry queue first, then the manifest stream. A replica that dies (or exceeds a row's deadline and is
killed) makes its in-flight rows *suspects*: a suspect is re-run alone on a fresh replica, so the next death is
unambiguous and is charged to that row; a row charged ``max_attempts`` times is recorded ``failed/poison`` (or
``failed/timeout``). Exceptions that a replica reports as infrastructure faults (e.g. CUDA OOM) are charged to the
row and retried on another replica.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from farm import __version__, results
from farm.config import JobSpec
from farm.manifest import Manifest, ManifestError, RowDefaults, RowState, plan_rows, resolve_row
from farm.models import build_backend
from farm.models.base import GenerationRequest
from farm.records import ErrorCode, RowError, Status
from farm.runtime.errors import JobAborted
from farm.runtime.replica import RemoteReplica
from farm.storage import OutputLayout
from farm.worker import backend_defaults

log = logging.getLogger("farm")


@dataclass
class Task:
    row: dict[str, Any]
    request: GenerationRequest
    dispatches: int = 0
    charged: int = 0  # faults attributed to this row
    suspect: bool = False
    avoid: int | None = None  # replica slot that last failed it
    last_fault: tuple[ErrorCode, str] | None = None
    first_dispatch: float | None = None


@dataclass
class Slot:
    index: int
    actor: Any = None
    info_ref: Any = None
    info: dict[str, Any] | None = None
    inflight: dict[Any, tuple[Task, float]] = field(default_factory=dict)
    solo: bool = False
    reserved: bool = False
    generation: int = 0
    started_at: float = 0.0

    @property
    def name(self) -> str:
        return f"replica-{self.index}" + (f".{self.generation}" if self.generation else "")


@dataclass
class RunSummary:
    run_id: str
    counts: Counter[str]
    rows_seen: int
    already_committed: int
    elapsed_s: float
    replicas: int
    replica_restarts: int
    busy_fraction: float | None = None
    first_dispatch_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "counts": dict(self.counts),
            "rows_seen": self.rows_seen,
            "already_committed": self.already_committed,
            "elapsed_s": round(self.elapsed_s, 3),
            "replicas": self.replicas,
            "replica_restarts": self.replica_restarts,
            "busy_fraction": self.busy_fraction,
            "first_dispatch_s": self.first_dispatch_s,
        }


def ensure_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) if given, else start/attach a local Ray."""
    if ray.is_initialized():
        return
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or None,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Driver:
    """Runs one job to completion (or until interrupted); rerunning the same job resumes it."""

    def __init__(self, job: JobSpec, progress: bool = True, retry_failed: bool = False) -> None:
        self.job = job
        self.progress = progress
        self.retry_failed = retry_failed
        self.layout = OutputLayout(job.output, job.storage_options)
        self.counts: Counter[str] = Counter()
        self.retry_queue: deque[Task] = deque()
        self.slots: list[Slot] = []
        self.restarts = 0
        self.init_failures = 0
        self.fingerprint: str | None = None
        self.model_name: str = ""
        self.bar: tqdm | None = None
        self.started = time.monotonic()
        self.run_id = ""
        self.first_dispatch_s: float | None = None

    # ------------------------------------------------------------------ setup
    def _resources(self) -> tuple[int, float, float]:
        """(replicas, gpus per replica, cpus per replica) on this cluster."""
        res = self.job.resources
        backend = build_backend(self.job.model_spec())
        need = backend.resources(res.gpus_per_replica)
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        gpus = need.gpus
        if gpus > 0 and cluster_gpus == 0:
            log.warning("no GPU in the Ray cluster: replicas run on CPU")
            gpus = 0.0
        cpus = min(res.cpus_per_replica, need.cpus) if need.cpus < 1 else res.cpus_per_replica
        if res.replicas == "all":
            replicas = max(1, math.floor(cluster_gpus / gpus)) if gpus > 0 else 1
        else:
            replicas = int(res.replicas)
        return replicas, gpus, cpus

    def _start_slot(self, slot: Slot) -> None:
        replicas_opts = {"num_gpus": self._gpus, "num_cpus": self._cpus}
        slot.actor = RemoteReplica.options(
            max_concurrency=self.job.resources.in_flight_per_replica + 2, max_restarts=0, **replicas_opts
        ).remote(self.job, slot.name)
        slot.info_ref = slot.actor.info.remote()
        slot.info = None
        slot.started_at = time.monotonic()
        slot.inflight = {}
        slot.solo = False
        slot.reserved = False

    # ------------------------------------------------------------------ rows
    def _row_stream(self, manifest: Manifest, defaults: RowDefaults, done: set[str]) -> Iterator[Task]:
        for state, key, row, error in plan_rows(manifest, done):
            if state is not RowState.TODO:
                self.already_committed += state is RowState.COMMITTED
                self._tick()
                continue
            row = {**row, "id": key}
            try:
                if error is not None:
                    raise error
                request = resolve_row(row, defaults)
            except RowError as exc:
                status = Status.SKIPPED if exc.code == ErrorCode.RIGHTS_NOT_CONFIRMED else Status.FAILED
                self._record_failure(row, None, exc.code, exc.message, status=status)
                continue
            yield Task(row=row, request=request)

    def _base_record(self, task_row: dict[str, Any], request: GenerationRequest | None) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "id": task_row.get("id"),
            "portrait": task_row.get("portrait"),
            "prompt": task_row.get("prompt"),
            "model": self.model_name,
        }
        if request is not None:
            rec.update(request.params.as_dict())
            rec.update(prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed)
        for name in self.extra_columns:
            rec[results.carried_name(name)] = task_row.get(name)
        return rec

    def _record_failure(
        self,
        row: dict[str, Any],
        task: Task | None,
        code: ErrorCode,
        message: str,
        status: Status = Status.FAILED,
        extra: dict[str, Any] | None = None,
    ) -> None:
        rec = self._base_record(row, task.request if task else None)
        rec.update(extra or {})
        rec.update(status=status.value, error_code=code.value, error_message=message, video=None)
        rec["attempts"] = task.dispatches if task else 0
        self._commit(rec)

    def _commit(self, record: dict[str, Any]) -> None:
        record.pop("retry", None)
        record.pop("traceback", None)
        self.counts[record["status"]] += 1
        if record.get("error_code"):
            self.counts[f"failed:{record['error_code']}"] += 1
        self._tick()
        self.writer.add(record)

    def _tick(self) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        self.bar.set_postfix(
            ok=self.counts[Status.OK.value], failed=self.counts[Status.FAILED.value],
            skipped=self.counts[Status.SKIPPED.value], refresh=False,
        )

    # ------------------------------------------------------------------ scheduling
    def _next_task(self, slot: Slot, stream: Iterator[Task]) -> Task | None:
        for i, task in enumerate(self.retry_queue):
            if task.suspect:
                continue
            if task.avoid != slot.index or len(self.slots) == 1:
                del self.retry_queue[i]
                return task
        if self._stream_open:
            try:
                return next(stream)
            except StopIteration:
                self._stream_open = False
        for i, task in enumerate(self.retry_queue):  # only avoided ones left: take them rather than idle
            if not task.suspect:
                del self.retry_queue[i]
                return task
        return None

    def _dispatch(self, slot: Slot, task: Task) -> None:
        now = time.time()
        ahead = len(slot.inflight)
        deadline = time.monotonic() + self.job.runtime.row_timeout_s * (1 + ahead)
        task.dispatches += 1
        task.first_dispatch = task.first_dispatch or now
        if self.first_dispatch_s is None:
            self.first_dispatch_s = time.monotonic() - self.started
        payload = {
            "request": task.request, "portrait": task.row["portrait"], "dispatched_at": now,
            "dispatch": task.dispatches,
        }
        ref = slot.actor.process.remote(payload)
        slot.inflight[ref] = (task, deadline)

    def _fill(self, stream: Iterator[Task]) -> None:
        cap = self.job.resources.in_flight_per_replica
        ready = [s for s in self.slots if s.info is not None]
        suspects = [t for t in self.retry_queue if t.suspect]
        if suspects and ready and not any(s.reserved or s.solo for s in ready):
            min(ready, key=lambda s: len(s.inflight)).reserved = True
        for slot in sorted(ready, key=lambda s: len(s.inflight)):
            if slot.solo:
                continue
            if slot.reserved:
                if slot.inflight:
                    continue
                suspect = next((t for t in self.retry_queue if t.suspect), None)
                slot.reserved = False
                if suspect is not None:
                    self.retry_queue.remove(suspect)
                    slot.solo = True
                    self._dispatch(slot, suspect)
                    continue
            while len(slot.inflight) < cap:
                task = self._next_task(slot, stream)
                if task is None:
                    return
                self._dispatch(slot, task)

    def _handle_result(self, slot: Slot, task: Task, rec: dict[str, Any]) -> None:
        slot.solo = False
        if rec.get("retry"):
            task.charged += 1
            task.avoid = slot.index
            code = ErrorCode(rec["error_code"])
            task.last_fault = (code, rec.get("error_message", ""))
            log.warning("row %s: %s on %s (attempt %d)", task.request.id, rec.get("error_message"), slot.name,
                        task.dispatches)
            if task.charged < self.job.runtime.max_attempts:
                self.retry_queue.append(task)
                return
        out = self._base_record(task.row, task.request)
        out.update(rec)
        out["attempts"] = task.dispatches
        if out["status"] != Status.OK.value:
            out["video"] = None
        self._commit(out)

    def _handle_death(self, slot: Slot, reason: ErrorCode, message: str) -> None:
        tasks = [t for t, _ in slot.inflight.values()]
        charged_alone = len(tasks) == 1
        log.warning("%s lost (%s): %s; %d row(s) in flight", slot.name, reason.value, message, len(tasks))
        for task in tasks:
            if charged_alone:
                task.charged += 1
                task.last_fault = (reason, message)
                task.avoid = slot.index
            if task.charged >= self.job.runtime.max_attempts:
                code = ErrorCode.TIMEOUT if reason == ErrorCode.TIMEOUT else ErrorCode.POISON
                self._record_failure(
                    task.row, task, code,
                    f"row was running when its replica was lost {task.charged} times; last: {message}",
                )
                continue
            task.suspect = not charged_alone or task.charged > 0
            self.retry_queue.appendleft(task)
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.restarts += 1
        if self.restarts > self.job.runtime.max_replica_restarts:
            raise JobAborted(f"replicas were lost {self.restarts} times (max_replica_restarts); last: {message}")
        slot.generation += 1
        self._start_slot(slot)

    def _check_start_timeout(self) -> None:
        """No replica ever started (e.g. more GPUs asked for than the cluster has, and no autoscaler): stop."""
        if any(s.info is not None for s in self.slots):
            return
        waited = time.monotonic() - min(s.started_at for s in self.slots)
        if waited > self.job.runtime.start_timeout_s:
            ask = f"{self._gpus:g} GPU(s) and {self._cpus:g} CPU(s) per replica"
            have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            raise JobAborted(
                f"no replica started within runtime.start_timeout_s={self.job.runtime.start_timeout_s:g}s "
                f"(each asks for {ask}; the cluster has {have}); lower resources.replicas or add nodes"
            )

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            late = [t for t, deadline in slot.inflight.values() if deadline < now]
            if late:
                self._handle_death(
                    slot, ErrorCode.TIMEOUT,
                    f"row {late[0].request.id} exceeded row_timeout_s={self.job.runtime.row_timeout_s}",
                )

    def _on_info(self, slot: Slot) -> None:
        try:
            slot.info = ray.get(slot.info_ref)
        except Exception as exc:  # noqa: BLE001 - RayActorError, or an exception Ray could not deserialize
            self.init_failures += 1
            never_ready = not any(s.info for s in self.slots) and self.restarts == 0
            if (never_ready and self.init_failures >= 2) or self.init_failures > self.job.runtime.max_replica_restarts:
                raise JobAborted(f"replicas cannot load the model ({self.init_failures} failed starts): {exc}") \
                    from None
            log.warning("%s failed to start: %s", slot.name, exc)
            slot.generation += 1
            self._start_slot(slot)
            return
        self.fingerprint = self.fingerprint or slot.info.get("fingerprint")
        self.model_name = slot.info.get("model", self.model_name)

    # ------------------------------------------------------------------ main
    def run(self) -> RunSummary:
        start = self.started = time.monotonic()
        job = self.job
        manifest = Manifest(job.manifest, job.storage_options)
        params, negative = backend_defaults(job)
        defaults = RowDefaults(params, negative, job.defaults.seed, job.runtime.require_rights_confirmed)
        self.extra_columns = manifest.extra_columns
        schema = results.result_schema(pa.schema([manifest.schema.field(c) for c in self.extra_columns]))
        self.writer = results.ResultWriter(
            self.layout, schema, job.runtime.commit_every_rows, job.runtime.commit_every_s
        )
        self.run_id = self.writer.run_id
        self.model_name = build_backend(job.model_spec()).describe()
        done = results.committed_ids(self.layout)
        if self.retry_failed:
            merged = results.read_results(self.layout, ["status"])
            done = set(merged.filter(pc.equal(merged.column("status"), Status.OK.value)).column("id").to_pylist())
        self.already_committed = 0

        ensure_ray()
        n, self._gpus, self._cpus = self._resources()
        self.slots = [Slot(index=i) for i in range(n)]
        for slot in self.slots:
            self._start_slot(slot)
        self._write_job_json(status="running")
        self.bar = tqdm(total=manifest.num_rows, unit="row", disable=not self.progress, mininterval=0.5,
                        dynamic_ncols=True)
        stream = self._row_stream(manifest, defaults, done)
        self._stream_open = True
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not None and _in_main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        status = "interrupted"
        try:
            self._loop(stream)
            status = "finished"
        except (JobAborted, ManifestError):
            status = "aborted"
            raise
        finally:
            self.writer.flush()
            busy = self._busy_fraction()
            for slot in self.slots:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            if self.bar is not None:
                self.bar.close()
            summary = RunSummary(
                run_id=self.run_id, counts=self.counts, rows_seen=manifest.num_rows,
                already_committed=self.already_committed, elapsed_s=time.monotonic() - start,
                replicas=len(self.slots), replica_restarts=self.restarts, busy_fraction=busy,
                first_dispatch_s=self.first_dispatch_s,
            )
            self._write_job_json(status=status, summary=summary)
            if previous is not None and _in_main_thread():
                signal.signal(signal.SIGTERM, previous)
        return summary

    def _loop(self, stream: Iterator[Task]) -> None:
        while True:
            self._fill(stream)
            inflight = {ref: slot for slot in self.slots for ref in slot.inflight}
            pending_info = {s.info_ref: s for s in self.slots if s.info is None}
            if not inflight and not self._stream_open and not self.retry_queue:
                return
            refs = list(inflight) + list(pending_info)
            if not refs:
                raise JobAborted("no replica is running and rows remain")
            self._check_start_timeout()
            wait_s = min(1.0, self.writer.due_in())
            ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                if ref in pending_info:
                    self._on_info(pending_info[ref])
                    continue
                slot = inflight[ref]
                if ref not in slot.inflight:  # slot was restarted while handling an earlier ref
                    continue
                task, _ = slot.inflight.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    slot.inflight[ref] = (task, 0.0)
                    self._handle_death(slot, ErrorCode.POISON, f"{type(exc).__name__}: {str(exc)[:500]}")
                    continue
                except Exception as exc:  # noqa: BLE001 - a bug escaped process(): record it, retry elsewhere
                    rec = {"id": task.request.id, "status": "failed", "error_code": ErrorCode.GENERATION_ERROR.value,
                           "error_message": str(exc)[:2000], "retry": True}
                self._handle_result(slot, task, rec)
            self._check_deadlines()
            self.writer.flush_if_due()

    def _busy_fraction(self) -> float | None:
        stats = []
        for slot in self.slots:
            if slot.info is None:
                continue
            try:
                stats.append(ray.get(slot.actor.stats.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - a dead replica has no stats
                continue
        busy = sum(s["busy_s"] for s in stats)
        span = sum(s["span_s"] for s in stats)
        return busy / span if span > 0 else None

    def _write_job_json(self, status: str, summary: RunSummary | None = None) -> None:
        previous = self.layout.read_json(self.layout.job_json)
        runs = [r for r in previous.get("runs", []) if r.get("run_id") != self.run_id]
        runs.append({"run_id": self.run_id, "status": status, "updated_at": _utcnow().isoformat(),
                     **(summary.as_dict() if summary else {})})
        payload = {
            "name": self.job.name,
            "farm_version": __version__,
            "spec": self.job.model_dump(mode="json"),
            "model": {
                "backend": self.job.model.backend,
                "variant": self.job.model.variant,
                "description": self.model_name,
                "fingerprint": self.fingerprint,
            },
            "replicas": [s.info for s in self.slots if s.info],
            "runs": runs,
        }
        self.layout.write_json(self.layout.job_json, payload)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_job(job: JobSpec, progress: bool = True, retry_failed: bool = False) -> RunSummary:
    return Driver(job, progress=progress, retry_failed=retry_failed).run()


__all__ = ["Driver", "JobAborted", "RunSummary", "ensure_ray", "run_job"]
