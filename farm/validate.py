"""``farm validate``: check a job spec and its whole manifest before any GPU time, counting problems by reason."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from farm import storage
from farm.config import JobSpec
from farm.manifest import Manifest, check_id, resolve_row
from farm.records import ErrorCode, RowError
from farm.worker import row_defaults

MAX_EXAMPLES = 5


@dataclass
class ValidationReport:
    rows: int = 0
    valid: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    extra_columns: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons

    def add(self, code: ErrorCode, row_id: Any, message: str) -> None:
        self.reasons[code.value] += 1
        bucket = self.examples.setdefault(code.value, [])
        if len(bucket) < MAX_EXAMPLES:
            bucket.append(f"{row_id!r}: {message}")

    def render(self) -> str:
        lines = [f"rows: {self.rows}  valid: {self.valid}  invalid: {self.rows - self.valid}"]
        if self.extra_columns:
            lines.append(f"carried-through columns: {', '.join(self.extra_columns)}")
        for code, count in self.reasons.most_common():
            lines.append(f"  {code:<22} {count}")
            lines.extend(f"      e.g. {ex}" for ex in self.examples.get(code, []))
        return "\n".join(lines)


def _portrait_problem(uri: str, job: JobSpec) -> str | None:
    """What ``farm run`` would find wrong with this portrait (same reader, limits and allowed roots)."""
    try:
        storage.read_portrait(uri, job.storage_options, job.portrait_policy())
    except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
        return f"{type(exc).__name__}: {exc}"
    return None


def validate_job(job: JobSpec, check_portraits: bool | None = None, workers: int = 8) -> ValidationReport:
    """Validate every row; with ``check_portraits`` also open every distinct portrait (in parallel)."""
    check_portraits = job.runtime.check_portraits if check_portraits is None else check_portraits
    manifest = Manifest(job.manifest, job.storage_options)
    defaults = row_defaults(job)
    duplicates = manifest.duplicate_ids()
    report = ValidationReport(extra_columns=manifest.extra_columns)
    portraits: dict[str, list[Any]] = {}
    for row in manifest.rows():
        report.rows += 1
        row_id = row.get("id")
        if row_id in duplicates:
            report.add(ErrorCode.DUPLICATE_ID, row_id, "id occurs more than once")
            continue
        try:
            check_id(row_id)
            resolve_row(row, defaults)
        except RowError as exc:
            report.add(exc.code, row_id, exc.message)
            continue
        if check_portraits:
            portraits.setdefault(row["portrait"], []).append(row_id)
        report.valid += 1
    if portraits:
        with ThreadPoolExecutor(workers) as pool:
            problems = pool.map(lambda uri: (uri, _portrait_problem(uri, job)), list(portraits))
            for uri, problem in problems:
                if problem is None:
                    continue
                for row_id in portraits[uri]:
                    report.add(ErrorCode.PORTRAIT_UNREADABLE, row_id, f"{uri}: {problem}")
                    report.valid -= 1
    return report
