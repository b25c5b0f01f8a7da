"""The driver: wires the manifest stream, the scheduler and the replica pool together, and commits records.

``scheduler`` decides which row runs where and what a failure costs a row (pure rules); ``pool`` keeps the Ray
replicas placed as the cluster grows and shrinks and says why one was lost; this module turns their answers into
committed records, holds the output lease, shows progress and writes ``_job.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from farm import __version__, results, resume, secrets, table
from farm.config import JobSpec, SpecError
from farm.fingerprints import metrics_config
from farm.lease import LeaseLost, OutputLease
from farm.manifest import Manifest, ManifestError, RowDefaults, RowState, plan_rows, resolve_keyed
from farm.models import build_backend
from farm.preflight import estimate_for, preflight
from farm.publish import publish
from farm.recording import RecordMaker, scrubbed
from farm.records import ErrorCode, InfraError, Outcome, Record, RowError, status_for
from farm.resume import ResumePlan
from farm.runtime import cluster
from farm.runtime.errors import JobAborted
from farm.runtime.metrics import FarmMetrics
from farm.runtime.pool import Ask, Done, Dropped, Lost, Paused, Ready, ReplicaPool
from farm.runtime.progress import ProgressReporter, Snapshot, as_dict
from farm.runtime.scheduler import Final, Loss, Scheduler, Task
from farm.storage import OutputLayout, anchored, is_local
from farm.sweep import Config, model_groups
from farm.worker import row_defaults

log = logging.getLogger("farm")
MAX_COMMIT_FAILURES = 10  # results parts that storage refused in a row (each after its own retries) end the run


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

    @classmethod
    def combined(cls, parts: list[RunSummary]) -> RunSummary:
        """A sweep's runs (one per model group) as one summary: counts and times added up."""
        counts: Counter[str] = Counter()
        for part in parts:
            counts.update(part.counts)
        return cls(
            run_id=",".join(p.run_id for p in parts),
            counts=counts,
            rows_seen=sum(p.rows_seen for p in parts),
            already_committed=sum(p.already_committed for p in parts),
            elapsed_s=sum(p.elapsed_s for p in parts),
            replicas=max(p.replicas for p in parts),
            replica_restarts=sum(p.replica_restarts for p in parts),
            busy_fraction=_weighted_busy(parts),
            first_dispatch_s=next((p.first_dispatch_s for p in parts if p.first_dispatch_s is not None), None),
        )

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


def _weighted_busy(parts: list[RunSummary]) -> float | None:
    """The runs' busy fractions weighted by their elapsed time (None when no run measured one)."""
    known = [(p.busy_fraction, p.elapsed_s) for p in parts if p.busy_fraction is not None and p.elapsed_s > 0]
    total = sum(elapsed for _, elapsed in known)
    return sum(busy * elapsed for busy, elapsed in known) / total if total else None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Driver:
    """Runs one job to completion (or until interrupted); rerunning the same job resumes it."""

    RECONCILE_EVERY_S = 2.0  # how often the pool re-reads the cluster (GPU nodes that joined)

    def __init__(
        self,
        job: JobSpec,
        progress: bool = True,
        retry_failed: bool = False,
        address: str | None = None,
        regenerate_changed: bool = False,
        rescore_changed: bool = False,
        configs: Sequence[Config] = (),
    ) -> None:
        """``configs``: the sweep configurations this driver runs (one model group of ``job``'s grid)."""
        self.job = job
        self.configs = list(configs)
        self.regenerate_changed = regenerate_changed
        self.rescore_changed = rescore_changed
        secrets.remember(job.model_dump(mode="json"))  # error messages and log lines never show these values
        secrets.install_log_filter()
        self.progress = progress
        self.retry_failed = retry_failed
        self.address = address
        self.layout = OutputLayout(job.output, job.storage_options)
        self.counts: Counter[str] = Counter()
        self.init_failures = 0
        self.infra_streak = 0  # rows in a row that failed on infrastructure faults after all their attempts
        self.ever_ready = False
        self.weights: dict[str, str | None] = {}  # replica key -> the model fingerprint it reported when ready
        self.resume = ResumePlan()
        self.defaults: RowDefaults | None = None
        self.model_name: str = ""
        self.writer: results.ResultWriter | None = None
        self.reporter: ProgressReporter | None = None
        self.metrics: FarmMetrics | None = None
        self.phase = "starting"
        self.total_rows = 0
        self._last_heartbeat = -math.inf
        self.started = time.monotonic()
        self.run_id = ""
        self.run_seq = 0
        self.first_dispatch_s: float | None = None
        self.already_committed = 0
        self.commit_failures = 0
        self.pool: ReplicaPool | None = None
        self.scheduler: Scheduler | None = None
        self._last_reconcile = -1e9
        self._last_state = ""

    @property
    def fingerprint(self) -> str | None:
        """The model fingerprint the first replica reported (``_job.json``); each record has its replica's own."""
        return next((weights for weights in self.weights.values() if weights), None)

    # ------------------------------------------------------------------ setup
    def _ask(self, embedded: bool) -> Ask:
        """What each replica asks of Ray; GPU asks fall back to CPU only on the embedded cluster or when allowed."""
        res = self.job.resources
        need = build_backend(self.job.model_spec()).resources(res.gpus_per_replica)
        cpus = min(res.cpus_per_replica, need.cpus) if need.cpus < 1 else res.cpus_per_replica
        gpus = need.gpus
        if gpus > 0 and cluster.resources_now()["GPU"] == 0:
            if embedded or res.allow_cpu:
                why = "the local cluster the farm started" if embedded else "resources.allow_cpu"
                log.warning("no GPU in the Ray cluster: replicas run on CPU (%s)", why)
                gpus = 0.0
            else:
                log.warning(
                    "the Ray cluster has no GPU yet: replicas wait for GPU nodes (the autoscaler is asked); "
                    "set resources.allow_cpu: true to run on CPU instead"
                )
        if embedded and gpus > 0:
            self._check_machine_fits(gpus)
        return Ask(gpus=gpus, cpus=cpus)

    def _check_machine_fits(self, gpus: float) -> None:
        """The farm's own Ray is this one machine: a replica needing more GPUs than it has could never start."""
        have = cluster.largest_node_gpus()
        if 0 < have < gpus:
            raise SpecError(
                f"resources.gpus_per_replica={self.job.resources.gpus_per_replica:g}: this machine has {have:g} "
                "GPU(s) (the Ray the farm started here), and a replica's GPUs must all be on one node: lower "
                "gpus_per_replica, or join a cluster with larger nodes (--address)"
            )

    def _check_output_reachable(self, embedded: bool) -> None:
        """A local-path output on several nodes would scatter videos across their disks: refuse unless shared."""
        if embedded or self.job.output_shared or not is_local(self.job.output) or not cluster.is_multi_node():
            return
        raise SpecError(
            f"output {self.job.output!r} is a local path, and this Ray cluster has (or can scale to) several nodes: "
            "each replica would write its videos to its own node's disk. Use an object-store URI (s3://bucket/out), "
            "or set output_shared: true if the path is on storage every node mounts (NFS, a shared volume)"
        )

    # ------------------------------------------------------------------ rows
    def _row_stream(self, manifest: Manifest, defaults: RowDefaults, done: set[str]) -> Iterator[Task]:
        for state, key, raw, error in plan_rows(manifest, done, self.configs):
            if state is not RowState.TODO:
                self.already_committed += state is RowState.COMMITTED
                self._tick()
                continue
            row = {**raw, "id": key}
            try:
                if error is not None:
                    raise error
                request = resolve_keyed(key, raw, defaults)
            except RowError as exc:
                status = status_for(exc.code)
                self._commit(self.maker.invalid(raw, key, exc.code, exc.message, status))
                continue
            yield Task(row=row, request=request)

    def _commit(self, record: Record) -> None:
        record = scrubbed(record)
        if self.metrics is not None:
            self.metrics.record(record)
        self.counts[record.status] += 1
        if record.error_code:
            self.counts[f"{record.status}:{record.error_code}"] += 1  # failed:no_face, skipped:rights_not_confirmed
        self._tick()
        try:
            self.writer.add(record)  # buffered first: a failed commit keeps it for the next try
        except InfraError as exc:
            self._commit_failed(exc)

    def _commit_due(self) -> None:
        try:
            self.writer.flush_if_due()
        except InfraError as exc:
            self._commit_failed(exc)
        else:
            if not self.writer.buffer:
                self.commit_failures = 0

    def _commit_failed(self, exc: InfraError) -> None:
        """Storage refused a results part even after its retries: keep the records buffered and try again later."""
        self.commit_failures += 1
        log.warning(
            "committing %d record(s) failed (%d in a row, retried every commit_every_s): %s",
            len(self.writer.buffer),
            self.commit_failures,
            exc,
        )
        if self.commit_failures >= MAX_COMMIT_FAILURES:
            raise JobAborted(f"results could not be committed {self.commit_failures} times in a row: {exc}") from exc

    def _commit_finals(self, finals: list[Final]) -> None:
        for final in finals:
            task = final.task
            self._commit(self.maker.failed(task.row, task.request, task.dispatches, final.code, final.message))

    def _tick(self) -> None:
        if self.reporter is not None:
            self.reporter.show(self._snapshot())

    def _snapshot(self) -> Snapshot:
        pool, scheduler = self.pool, self.scheduler
        phase = self.phase
        if phase == "running" and pool is not None and not pool.ready:
            phase = "waiting for replicas"
        return Snapshot(
            total=self.total_rows,
            already_committed=self.already_committed,
            counts=self.counts,
            replicas_ready=len(pool.ready) if pool else 0,
            replicas_wanted=pool.target if pool else 0,
            replicas_pending=len(pool.handles) - len(pool.ready) if pool else 0,
            in_flight=scheduler.busy if scheduler else 0,
            phase=phase,
        )

    def _heartbeat_due(self) -> None:
        """Every ``runtime.heartbeat_s``: ``_job.json``'s run entry says where the run stands (``farm status``)."""
        now = time.monotonic()
        if now - self._last_heartbeat < self.job.runtime.heartbeat_s:
            return
        self._last_heartbeat = now
        snap = self._snapshot()
        if self.metrics is not None:
            self.metrics.state(snap.replicas_ready, snap.replicas_pending, snap.replicas_wanted, snap.in_flight)
        try:
            self._write_job_json(status="running")
        except InfraError as exc:  # a missed heartbeat is not worth stopping the run for
            log.warning("could not write the heartbeat to %s: %s", self.layout.job_json, exc)

    def _payload(self, task: Task) -> dict[str, Any]:
        portrait = task.row["portrait"]
        if isinstance(portrait, str):
            portrait = anchored(portrait)  # replicas run in other working directories (other nodes)
        old = self.resume.rescore.get(task.id)
        return {
            "request": task.request,
            "portrait": portrait,
            "dispatched_at": time.time(),
            "dispatch": task.dispatches,
            "rescore": old.video if old is not None else None,
        }

    # ------------------------------------------------------------------ events
    def _handle_result(self, key: str, task: Task, outcome: Outcome) -> None:
        reported = outcome.record
        if outcome.retry:
            message = reported.error_message or ""
            detail = f"\n{outcome.traceback.rstrip()}" if outcome.traceback else ""
            log.warning("row %s: %s on %s (attempt %d)%s", task.id, message, key, task.dispatches, detail)
            if self.scheduler.row_fault(key, task, ErrorCode(reported.error_code), message):
                return
        old = self.resume.rescore.get(task.id)
        if old is not None:
            self._commit(self.maker.rescored(task.row, old, reported))
        else:
            weights = self.weights.get(key)
            self._commit(self.maker.finished(task.row, task.request, reported, task.dispatches, weights))
        self._count_infra_streak(reported)

    def _count_infra_streak(self, final: Record) -> None:
        """Rows failing one after another on infrastructure faults (storage refusing the credentials, a store down)
        would fail the whole manifest: stop after ``runtime.infra_abort_after`` of them (exit 3)."""
        limit = self.job.runtime.infra_abort_after
        self.infra_streak = self.infra_streak + 1 if final.error_code == ErrorCode.INFRA.value else 0
        if limit and self.infra_streak >= limit:
            raise JobAborted(
                f"{self.infra_streak} rows in a row failed on infrastructure faults after "
                f"{self.job.runtime.max_attempts} attempts each (runtime.infra_abort_after={limit}); last: "
                f"{final.error_message}. Fix the cause (storage, network, credentials; GPU memory for out-of-memory) "
                "and rerun the same command: it redoes these rows"
            )

    def _on_ready(self, event: Ready) -> None:
        self.scheduler.add_replica(event.key)
        self.ever_ready = True
        self.weights[event.key] = event.info.get("fingerprint")
        self.model_name = event.info.get("model", self.model_name)
        log.info("%s ready on %s (%s)", event.key, event.info.get("node"), self.pool.waiting_for())

    def _on_lost(self, event: Lost) -> None:
        in_flight = len(self.scheduler.inflight(event.key))
        log.warning("%s lost (%s): %s; %d row(s) in flight", event.key, event.loss.value, event.message, in_flight)
        self._commit_finals(self.scheduler.remove_replica(event.key, event.loss, event.message))
        if event.loss is Loss.NODE_LOST:
            return
        if not event.started:
            self.init_failures += 1
            if (
                not self.ever_ready and self.init_failures >= 2
            ) or self.init_failures > self.job.runtime.max_replica_restarts:
                raise JobAborted(
                    f"replicas cannot load the model ({self.init_failures} failed starts): {event.message}"
                )
        elif self.scheduler.crashes > self.job.runtime.max_replica_restarts:
            raise JobAborted(
                f"replicas were lost {self.scheduler.crashes} times (max_replica_restarts); last: {event.message}"
            )

    def _on_event(self, event: Any) -> None:
        if isinstance(event, Done):
            self._handle_result(event.key, self.scheduler.completed(event.key, event.ticket), event.outcome)
        elif isinstance(event, Ready):
            self._on_ready(event)
        elif isinstance(event, Lost):
            self._on_lost(event)
            self._last_reconcile = -math.inf  # replace it now
        elif isinstance(event, Paused):
            self.scheduler.pause(event.key)
            self._last_reconcile = -math.inf
        elif isinstance(event, Dropped):
            self.scheduler.requeue(self.scheduler.completed(event.key, event.ticket))
            self.scheduler.resume(event.key)

    def _kill_late(self) -> None:
        for key, task in self.scheduler.late_replicas():
            self.pool.kill(key)
            self._on_lost(
                Lost(
                    key, Loss.TIMEOUT, f"row {task.id} exceeded row_timeout_s={self.job.runtime.row_timeout_s:g}", True
                )
            )

    def _check_start_timeout(self) -> None:
        """No replica ready for runtime.start_timeout_s (none placeable, none loads): stop with the ask."""
        since = self.pool.no_ready_since
        if self.pool.ready or not since or time.monotonic() - since <= self.job.runtime.start_timeout_s:
            return
        raise JobAborted(
            f"no replica was ready for runtime.start_timeout_s={self.job.runtime.start_timeout_s:g}s: "
            f"{self.pool.waiting_for()}; lower resources.replicas or gpus_per_replica, or add nodes"
        )

    def _report_state(self) -> None:
        state = self.pool.waiting_for()
        if state != self._last_state:
            self._last_state = state
            log.info("%s", state)
        self._tick()

    # ------------------------------------------------------------------ main
    def run(self) -> RunSummary:
        """Take the output, plan what is left, keep replicas fed until every row has a record, publish."""
        start = self.started = time.monotonic()
        manifest = Manifest(self.job.manifest, self.job.storage_options)
        schema = self._prepare(manifest)
        embedded = cluster.connect(self.address)
        self.metrics = FarmMetrics(self.job.name, self.run_id)
        self._check_output_reachable(embedded)
        ask = self._ask(embedded)
        done = self._take_output(manifest, schema)
        self._start(manifest, done, ask, embedded)
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not None and _in_main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        status = "interrupted"
        try:
            self._loop()
            status = "finished"
        except (JobAborted, ManifestError, LeaseLost):
            status = "aborted"
            raise
        finally:
            summary = self._finish(status, self.total_rows, start)
            if previous is not None and _in_main_thread():
                signal.signal(signal.SIGTERM, previous)
        return summary

    def _prepare(self, manifest: Manifest) -> pa.Schema:
        """What this run is, before touching the cluster or the output: row defaults, the record maker (model and
        metric settings), the run id and its lease; returns the results schema."""
        job = self.job
        self.total_rows = manifest.num_rows * max(1, len(self.configs))  # a sweep's model group: rows x configs
        self.defaults = row_defaults(job)
        self.extra_columns = manifest.extra_columns
        self.run_id = results.new_run_id()
        self.lease = OutputLease(
            self.layout,
            job.storage_options,
            run_id=self.run_id,
            ttl_s=job.runtime.lease_ttl_s,
            renew_every_s=job.runtime.lease_ttl_s / 4,
        )
        backend = build_backend(job.model_spec())
        self.model_name = backend.describe()
        self.maker = RecordMaker(self.model_name, backend.output_config(), metrics_config(job), self.extra_columns)
        return results.result_schema(pa.schema([manifest.schema.field(c) for c in self.extra_columns]))

    def _take_output(self, manifest: Manifest, schema: pa.Schema) -> set[str]:
        """The output lease, then the resume plan under it (released again if planning refuses or fails)."""
        self.lease.acquire()
        try:
            self.lease.start_renewing()
            return self._plan_resume(manifest, self.defaults, schema)
        except BaseException:
            self.lease.release()
            raise

    def _start(self, manifest: Manifest, done: set[str], ask: Ask, embedded: bool) -> None:
        """The replica pool and the scheduler over the rows still to make; the run is now ``running``."""
        job = self.job
        self.pool = ReplicaPool(job, ask, job.resources.replicas, self.run_id, embedded)
        self.scheduler = Scheduler(
            self._row_stream(manifest, self.defaults, done),
            cap=job.resources.in_flight_per_replica,
            max_attempts=job.runtime.max_attempts,
            row_timeout_s=job.runtime.row_timeout_s,
            clock=time.monotonic,
        )
        self.pool.reconcile()
        self.phase = "running"
        self._write_job_json(status="running")
        self.reporter = ProgressReporter(self.total_rows, self.progress, job.runtime.progress_every_s)
        self._tick()

    def _finish(self, status: str, rows_seen: int, start: float) -> RunSummary:
        unsaved = None
        try:
            self.writer.flush()
        except (LeaseLost, InfraError) as exc:
            unsaved = (
                f"{len(self.writer.buffer)} record(s) could not be committed ({exc}); a rerun makes those rows again"
            )
            log.error("%s", unsaved)
        busy = _busy_fraction(self.pool.stats())
        self.pool.shutdown()
        summary = RunSummary(
            run_id=self.run_id,
            counts=self.counts,
            rows_seen=rows_seen,
            already_committed=self.already_committed,
            elapsed_s=time.monotonic() - start,
            replicas=self.pool.target,
            replica_restarts=self.scheduler.crashes,
            busy_fraction=busy,
            first_dispatch_s=self.first_dispatch_s,
        )
        if self.lease.lost is None:
            self._show_phase("publishing")
            self._publish()
            self._write_job_json(status=status, summary=summary)
        self._show_phase(status)
        if self.reporter is not None:
            self.reporter.close()
        try:
            self.lease.release()
        except Exception as exc:  # noqa: BLE001 - the work is committed; the lease just expires after its ttl
            log.warning("could not release the output lease (%s); it expires after lease_ttl_s", exc)
        if unsaved and status == "finished":
            raise JobAborted(unsaved)
        return summary

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            if now - self._last_reconcile >= self.RECONCILE_EVERY_S:
                self._last_reconcile = now
                self.pool.reconcile()
                self._report_state()
            for dispatch in self.scheduler.fill():
                if self.first_dispatch_s is None:
                    self.first_dispatch_s = time.monotonic() - self.started
                self.pool.submit(dispatch.replica, dispatch.ticket, self._payload(dispatch.task))
            if self.scheduler.done:
                return
            self._check_start_timeout()
            for event in self.pool.wait(min(1.0, self.writer.due_in())):
                self._on_event(event)
            self._kill_late()
            self._commit_due()
            self._heartbeat_due()

    def _plan_resume(self, manifest: Manifest, defaults: RowDefaults, schema: pa.Schema) -> set[str]:
        """Under the lease, before any replica starts: this run's sequence number, the carried columns' types
        checked against the log, and what to do with committed rows (``farm.resume``); returns the ids to skip."""
        job = self.job
        self.run_seq = table.next_run_seq(self.layout, self._recorded_run_seq())
        table.check_carried_types(self.layout, results.carried_schema(schema, self.extra_columns))
        context = resume.Context(
            self.layout, manifest, defaults, self.maker.model_config, self.maker.metrics_config, self.configs
        )
        self.resume = resume.plan_resume(
            context, self.retry_failed, self.regenerate_changed, self.rescore_changed, job.runtime.verify_portraits
        )
        self._preflight(self.total_rows - len(self.resume.keep))
        for line in self.resume.changes:
            log.info("changed since the committed rows: %s", line)
        if self.resume.invalid_now:
            codes = ", ".join(f"{code}: {n}" for code, n in self.resume.invalid_now.most_common())
            log.warning(
                "%d committed ok row(s) are invalid in this manifest now (%s): their records and videos are kept; "
                "fix those manifest rows (e.g. remove the duplicated row) to make them again",
                sum(self.resume.invalid_now.values()),
                codes,
            )
        if self.resume.removed:
            log.warning(
                "%d committed id(s) are not in this manifest: their records stay in %s (this run does not touch them)",
                self.resume.removed,
                self.layout.results_dir,
            )
        self.writer = results.ResultWriter(
            self.layout,
            schema,
            self.run_seq,
            job.runtime.commit_every_rows,
            job.runtime.commit_every_s,
            guard=lambda: self.lease.check(),
            run_id=self.run_id,
        )
        return self.resume.keep

    def _preflight(self, rows_to_make: int) -> None:
        """Before any replica starts: the weights, the output and the portrait locations (``farm.preflight``, the
        checks ``farm validate`` makes); a blocking finding stops the run as a spec error, nothing started."""
        report = preflight(self.job, estimate=estimate_for(self.job, rows=rows_to_make))
        log.info("%s", report.render())
        if not report.ok:
            blocking = "\n".join(f"  {f.message}" for f in report.findings if f.blocking)
            raise SpecError(f"pre-flight found what would fail on the replicas (nothing was started):\n{blocking}")

    def _recorded_run_seq(self) -> int:
        runs = self.layout.read_json(self.layout.job_json).get("runs", [])
        return max((int(r.get("run_seq") or 0) for r in runs), default=0)

    def _show_phase(self, phase: str) -> None:
        self.phase = phase
        self._tick()

    def _publish(self) -> None:
        """Compact the log into the published table (``<out>/results/``) while this run still holds the lease; a
        failure leaves the log (the truth) intact and is retried by the next run or ``farm compact``."""
        try:
            published = publish(self.layout)
            log.info("published %s ids to %s", published.get("ids_published"), self.layout.results_dir)
        except Exception as exc:  # noqa: BLE001 - the records are committed; only the published copy is stale
            log.warning(
                "could not publish %s (%s); run `farm compact %s`", self.layout.results_dir, exc, self.job.output
            )

    def _resolved_defaults(self) -> dict[str, Any] | None:
        """What every row of this run fell back to: the backend's defaults overlaid with the spec's ``defaults``."""
        if self.defaults is None:
            return None
        params = self.defaults.params.as_dict()
        return {**params, "negative_prompt": self.defaults.negative_prompt, "seed": self.defaults.base_seed}

    def _ended(self, run: dict[str, Any]) -> dict[str, Any]:
        """An earlier run still marked running while this one holds the lease: its driver died without a last word."""
        if run.get("status") != "running":
            return run
        took_over = f"its driver stopped without a final update; run #{self.run_seq} took over the output"
        return {**run, "status": "interrupted", "ended_by": took_over}

    def _write_job_json(self, status: str, summary: RunSummary | None = None) -> None:
        """``_job.json``: the latest spec and model at the top, and one entry per run ever made into this output
        (its own resolved spec and settings, never overwritten by a later run)."""
        previous = self.layout.read_json(self.layout.job_json)
        runs = [self._ended(r) for r in previous.get("runs", []) if r.get("run_id") != self.run_id]
        spec = self.job.model_dump(mode="json")  # redacted below with the rest (README "Credentials")
        runs.append(
            {
                "run_id": self.run_id,
                "run_seq": self.run_seq,
                "status": status,
                "updated_at": _utcnow().isoformat(),
                "farm_version": __version__,
                "spec": spec,
                "resolved_defaults": self._resolved_defaults(),
                "model_config": json.loads(self.maker.model_config),
                "metrics_config": json.loads(self.maker.metrics_config),
                "model_fingerprint": self.fingerprint,
                "resume": self.resume.as_dict(),
                "heartbeat_at": _utcnow().isoformat(),
                "heartbeat_every_s": self.job.runtime.heartbeat_s,
                "last_commit_at": self.writer.last_commit_at if self.writer else None,
                "progress": as_dict(self._snapshot(), time.monotonic() - self.started),
                **(summary.as_dict() if summary else {}),
            }
        )
        payload = {
            "name": self.job.name,
            "farm_version": __version__,
            "spec": spec,
            "model": {
                "backend": self.job.model.backend,
                "variant": self.job.model.variant,
                "description": self.model_name,
                "fingerprint": self.fingerprint,
            },
            "replicas": self.pool.infos() if self.pool else [],
            "runs": runs,
        }
        self.lease.check()
        self.layout.write_json(self.layout.job_json, secrets.redact_spec(payload))


def _busy_fraction(stats: list[dict[str, float]]) -> float | None:
    busy = sum(s["busy_s"] for s in stats)
    span = sum(s["span_s"] for s in stats)
    return busy / span if span > 0 else None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_job(job: JobSpec, **options: Any) -> RunSummary:
    """Run ``job`` to the end; ``options`` are ``Driver``'s (``progress``, ``retry_failed``, ``address``,
    ``regenerate_changed``, ``rescore_changed``; README "Resume" says what the flags redo). A sweep runs one model
    group of its grid after the other (``farm.sweep.model_groups``), each with its own replicas."""
    configs = job.configs()
    if not configs:
        return Driver(job, **options).run()
    summaries = []
    for group in model_groups(configs):
        sub_job = job.with_model_values(group[0].model_values())
        log.info("sweep: %d config(s) on %s: %s", len(group), _model_words(sub_job), ", ".join(c.id for c in group))
        summaries.append(Driver(sub_job, configs=group, **options).run())
    return RunSummary.combined(summaries)


def _model_words(job: JobSpec) -> str:
    variant = f" {job.model.variant}" if job.model.variant else ""
    return f"{job.model.backend}{variant} {job.model.options or ''}".strip()


__all__ = ["Driver", "JobAborted", "RunSummary", "run_job"]
