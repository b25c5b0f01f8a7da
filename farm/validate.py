"""``farm validate``: check a job spec and its whole manifest before any GPU time, counting problems by reason, then
the pre-flight (``farm.preflight``: weights, a writable output, portrait locations, the GPU-time estimate)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from farm import results, resume, storage, table
from farm.config import JobSpec
from farm.fingerprints import metrics_config
from farm.manifest import Manifest, RowState, plan_rows, resolve_keyed
from farm.models import build_backend
from farm.preflight import PreflightReport, estimate_for, preflight
from farm.records import ErrorCode, InfraError, RowError, Status, status_for
from farm.storage import OutputLayout
from farm.sweep import model_groups
from farm.worker import row_defaults

MAX_EXAMPLES = 5


@dataclass
class ValidationReport:
    rows: int = 0
    valid: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # rows farm run records as skipped (not invalid)
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    extra_columns: list[str] = field(default_factory=list)
    configs: int = 0  # a sweep's grid size (rows count each row once per config)
    preflight: PreflightReport | None = None
    refusals: list[str] = field(default_factory=list)  # what farm run would refuse against the committed rows

    @property
    def ok(self) -> bool:
        """No invalid row, nothing ``farm run`` would refuse, no blocking pre-flight finding."""
        return not self.reasons and not self.refusals and (self.preflight is None or self.preflight.ok)

    def add(self, code: ErrorCode, row_id: Any, message: str) -> None:
        if status_for(code) is Status.SKIPPED:
            self.skipped[code.value] += 1
            return
        self.reasons[code.value] += 1
        bucket = self.examples.setdefault(code.value, [])
        if len(bucket) < MAX_EXAMPLES:
            bucket.append(f"{row_id!r}: {message}")

    def render(self) -> str:
        lines = []
        if self.configs:
            lines.append(f"sweep: {self.configs} configs x {self.rows // self.configs} rows = {self.rows} videos")
        invalid = self.rows - self.valid - sum(self.skipped.values())
        lines.append(f"rows: {self.rows}  valid: {self.valid}  invalid: {invalid}")
        lines.extend(f"skipped by farm run (not invalid): {n} {code}" for code, n in self.skipped.items())
        if self.extra_columns:
            lines.append(f"carried-through columns: {', '.join(self.extra_columns)}")
        for code, count in self.reasons.most_common():
            lines.append(f"  {code:<22} {count}")
            lines.extend(f"      e.g. {ex}" for ex in self.examples.get(code, []))
        lines.extend(f"farm run would refuse: {refusal}" for refusal in self.refusals)
        if self.preflight is not None:
            lines.append(self.preflight.render())
        return "\n".join(lines)


def _portrait_problem(uri: str, job: JobSpec) -> tuple[ErrorCode, str] | None:
    """What ``farm run`` would record for this portrait (same reader, limits and allowed roots): its error code and
    message; a storage fault is ``infra_error`` (the run would retry it)."""
    try:
        storage.load_portrait(uri, job.storage_options, job.portrait_policy())
    except RowError as exc:
        return exc.code, exc.message
    except Exception as exc:  # noqa: BLE001 - any other failure to open is a finding too
        return ErrorCode.INFRA, f"{uri}: {type(exc).__name__}: {exc}"
    return None


def validate_job(
    job: JobSpec,
    check_portraits: bool | None = None,
    workers: int = 8,
    deep: bool = False,
    run_preflight: bool = True,
) -> ValidationReport:
    """Classify every row as ``farm run`` would (the same ``plan_rows`` and ``resolve_row``: a duplicated id is one
    ``duplicate_id`` finding, as it becomes one record); with ``check_portraits`` also open every distinct portrait
    with the run's own reader (``storage.load_portrait``: its limits and allowed roots), in parallel. Then the
    pre-flight (``deep``: safetensors headers too), its GPU-time estimate summed over the valid rows' settings."""
    check_portraits = job.runtime.check_portraits if check_portraits is None else check_portraits
    manifest = Manifest(job.manifest, job.storage_options)
    defaults = row_defaults(job)
    report = ValidationReport(extra_columns=manifest.extra_columns, configs=len(job.configs()))
    estimate = estimate_for(job, rows=0)
    portraits: dict[str, list[Any]] = {}
    for state, key, row, error in plan_rows(manifest, set(), job.configs()):
        report.rows += 1
        if state is RowState.REPEAT:
            continue  # the first row of a duplicated id carries the one duplicate_id finding
        try:
            if error is not None:
                raise error
            request = resolve_keyed(key, row, defaults)
        except RowError as exc:
            report.add(exc.code, key, exc.message)
            continue
        if check_portraits:
            portraits.setdefault(row["portrait"], []).append(key)
        report.valid += 1
        estimate.add(request.params)
    if portraits:
        _check_portraits(job, portraits, report, workers)
    report.refusals = resume_refusals(job, manifest)
    if run_preflight:
        report.preflight = preflight(job, deep=deep, estimate=estimate)
    return report


def resume_refusals(job: JobSpec, manifest: Manifest) -> list[str]:
    """What ``farm run`` would refuse against the output's committed rows, in its words: rows made differently from
    what the spec and manifest now ask (per model group of a sweep), a carried column whose type changed. [] for a
    fresh output. Read-only: no lease is taken."""
    try:
        return _refusals(job, manifest)
    except InfraError:  # the output cannot be read: the pre-flight's output check names the problem
        return []


def _refusals(job: JobSpec, manifest: Manifest) -> list[str]:
    layout = OutputLayout(job.output, job.storage_options)
    found = []
    schema = results.result_schema(pa.schema([manifest.schema.field(c) for c in manifest.extra_columns]))
    try:
        table.check_carried_types(layout, results.carried_schema(schema, manifest.extra_columns))
    except table.SchemaDrift as exc:
        found.append(str(exc))
    for group in model_groups(job.configs()) or [[]]:
        sub = job.with_model_values(group[0].model_values()) if group else job
        model_config = build_backend(sub.model_spec()).output_config()
        context = resume.Context(layout, manifest, row_defaults(sub), model_config, metrics_config(sub), group)
        try:
            resume.plan_resume(context, verify_portraits=sub.runtime.verify_portraits)
        except resume.ChangedRows as exc:
            found.append(str(exc))
    return found


def _check_portraits(job: JobSpec, portraits: dict[str, list[Any]], report: ValidationReport, workers: int) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for uri, problem in pool.map(lambda uri: (uri, _portrait_problem(uri, job)), list(portraits)):
            if problem is None:
                continue
            code, message = problem
            for row_id in portraits[uri]:
                report.add(code, row_id, message)
                report.valid -= 1
