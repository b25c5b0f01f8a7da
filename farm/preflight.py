"""Pre-flight: what would waste GPU time, found before any replica starts (``farm validate`` and ``farm run``).

A typo in a weights path otherwise costs replica starts (minutes each for 14B weights) and an unwritable output is
found only when the first part is committed. Checked here, cheaply: the backend's weights (``Backend.check_weights``:
nothing loaded), that the output takes a probe object, that portrait locations answer; and an estimate of the GPU
time the job will take, from measured benchmark figures.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from farm import storage
from farm.config import JobSpec
from farm.params import SamplingParams

MAX_PORTRAIT_ROOTS = 8  # distinct portrait folders checked (the manifest is read only until this many are seen)
MAX_PORTRAIT_ROWS = 100_000  # ... or this many rows
PROBE_PREFIX = ".farm-probe-"


@dataclass(frozen=True)
class Measured:
    """One measured setting: seconds per denoising step and per VAE decode at ``frames x height x width``."""

    frames: int
    height: int
    width: int
    s_per_step: float
    decode_s: float
    passes: int  # transformer passes per step in the measured setting (guidance)

    @property
    def volume(self) -> int:
        return self.frames * self.height * self.width


# From benchmarks/results/lynx_gpu_h200.md (one NVIDIA H200, 14B sizes, bf16, batched guidance, SDPA's own kernel,
# the "default" rows: full 3 guidance passes, lite 2). Update with that file.
BENCHMARK_SOURCE = "benchmarks/results/lynx_gpu_h200.md"
MEASURED_H200 = {
    "full": Measured(frames=81, height=480, width=832, s_per_step=10.13, decode_s=1.83, passes=3),
    "lite": Measured(frames=121, height=480, width=832, s_per_step=12.00, decode_s=2.73, passes=2),
}


@dataclass(frozen=True)
class Finding:
    check: str  # weights | output | portraits | model
    message: str
    blocking: bool = True


@dataclass
class GpuEstimate:
    """GPU seconds for a job's rows on one H200, scaled linearly from the measured setting (an estimate)."""

    measured: Measured | None
    label: str
    rows: int = 0
    seconds: float = 0.0

    def add(self, params: SamplingParams, rows: int = 1) -> None:
        self.rows += rows
        if self.measured is not None:
            self.seconds += rows * row_seconds(self.measured, params)

    def render(self) -> str:
        if self.measured is None:
            return f"GPU time estimate: none for {self.label} (no measured figures)"
        m = self.measured
        per_row = self.seconds / self.rows if self.rows else 0.0
        hours = self.seconds / 3600
        return (
            f"GPU time estimate: {self.rows} rows x {_duration(per_row)} = {hours:,.{1 if hours >= 10 else 3}f} "
            "GPU-hours on "
            f"one NVIDIA H200 ({self.label}; measured {m.s_per_step:g} s/step at {m.frames}x{m.height}x{m.width} "
            f"in {BENCHMARK_SOURCE}, scaled linearly with steps, guidance passes and frames x pixels; an estimate, "
            "not a quote)"
        )


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def row_seconds(measured: Measured, params: SamplingParams) -> float:
    """Steps x s/step (per guidance pass) plus one decode, both scaled by frames x pixels relative to the measured
    setting."""
    scale = params.num_frames * params.height * params.width / measured.volume
    step = measured.s_per_step * params.guidance_passes() / measured.passes
    return (params.num_inference_steps * step + measured.decode_s) * scale


def estimate_for(job: JobSpec, rows: int | None = None, params: SamplingParams | None = None) -> GpuEstimate:
    """An estimate for ``job``: ``rows`` (default: the manifest's row count) at ``params`` (default: the job's
    defaults over the backend's). Pass ``rows=0`` and ``add`` per row where rows override the defaults."""
    measured = MEASURED_H200.get(job.model.variant or "full") if job.model.backend == "lynx" else None
    label = f"Lynx {job.model.variant or 'full'}" if measured else f"the {job.model.backend} backend"
    estimate = GpuEstimate(measured, label)
    if rows is None:
        from farm.manifest import Manifest

        rows = Manifest(job.manifest, job.storage_options).num_rows
    if rows:
        if params is None:
            from farm.worker import row_defaults

            params = row_defaults(job).params
        estimate.add(params, rows)
    return estimate


@dataclass
class PreflightReport:
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    estimate: GpuEstimate | None = None
    deep: bool = False  # the weights' safetensors headers were read too

    @property
    def ok(self) -> bool:
        """False when a blocking finding (missing weights, unwritable output) would waste GPU time."""
        return not any(f.blocking for f in self.findings)

    def add(self, check: str, messages: Iterable[str], blocking: bool = True) -> None:
        self.checked.append(check)
        self.findings.extend(Finding(check, m, blocking) for m in messages)

    def render(self) -> str:
        verdict = "ok" if self.ok else "BLOCKED (fix these before spending GPU time)"
        checked = [f"{c} (deep: file headers read)" if c == "weights" and self.deep else c for c in self.checked]
        lines = [f"pre-flight: {verdict}; checked {', '.join(checked) or 'nothing'}"]
        for f in self.findings:
            lines.append(f"  {'error' if f.blocking else 'warning'} [{f.check}] {f.message}")
        if self.estimate is not None:
            lines.append(self.estimate.render())
        return "\n".join(lines)


def preflight(
    job: JobSpec, deep: bool = False, check_portrait_roots: bool = True, estimate: GpuEstimate | None = None
) -> PreflightReport:
    """Everything worth knowing before GPU time: weights (``deep``: safetensors headers too), a writable output,
    reachable portrait locations, and the GPU-time ``estimate`` (default: ``estimate_for(job)``)."""
    report = PreflightReport()
    weights, approximations = check_model(job, deep)
    report.add("weights", weights)
    report.deep = deep
    report.add("model", approximations, blocking=False)
    report.add("output", [p] if (p := check_output(job.output, job.storage_options)) else [])
    if check_portrait_roots:
        report.add("portraits", check_portraits(job), blocking=False)
    report.estimate = estimate if estimate is not None else estimate_for(job)
    return report


def check_model(job: JobSpec, deep: bool = False) -> tuple[list[str], list[str]]:
    """(problems with the weights, a line naming the opt-in settings that make the videos differ from the model's
    reference inference), from one backend built without loading anything."""
    from farm.models import build_backend

    try:
        backend = build_backend(job.model_spec())
        problems = backend.check_weights(deep=deep)
    except Exception as exc:  # noqa: BLE001 - a bad model section or a storage fault is a finding, not a traceback
        return [f"model: {type(exc).__name__}: {exc}"], []
    found = backend.approximations()
    if not found:
        return problems, []
    return problems, [f"videos will differ from the reference inference, by choice: {'; '.join(found)}"]


def check_output(output: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Write and delete ``<output>/.farm-probe-<uuid>``; the problem in one line, or None. Folders this creates for
    a local output are removed again (``farm run`` creates them itself)."""
    probe = storage.join(output, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    created = _missing_local_dirs(output)
    try:
        storage.write_bytes_atomic(probe, b"", storage_options)
        fs, path = storage.get_fs(probe, storage_options)
        fs.rm_file(path)
    except Exception as exc:  # noqa: BLE001 - permission, a file where a folder must be, no bucket, no credentials
        return (
            f"output {output!r} is not writable ({type(exc).__name__}: {exc}); fix `output` in the job spec "
            "(or --output), its permissions, or the storage credentials"
        )
    finally:
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                break
    return None


def _missing_local_dirs(output: str) -> list[str]:
    """The folders of a local ``output`` that do not exist yet, deepest first."""
    if not storage.is_local(output):
        return []
    missing = []
    path = os.path.abspath(storage.get_fs(output)[1])
    while path and not os.path.exists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def portrait_roots(job: JobSpec) -> list[str]:
    """``runtime.allowed_portrait_roots`` and the first ``MAX_PORTRAIT_ROOTS`` distinct portrait folders."""
    from farm.manifest import Manifest

    roots = list(job.runtime.allowed_portrait_roots)
    folders: list[str] = []
    seen = 0
    try:
        for batch in Manifest(job.manifest, job.storage_options).batches(columns=["portrait"]):
            for uri in batch.column("portrait").to_pylist():
                folder = posixpath.dirname(uri) if isinstance(uri, str) and "/" in uri else None
                if folder and folder not in folders:
                    folders.append(folder)
            seen += batch.num_rows
            if len(folders) >= MAX_PORTRAIT_ROOTS or seen >= MAX_PORTRAIT_ROWS:
                break
    except Exception:  # noqa: BLE001 - the manifest's own problems are validate's findings, not the pre-flight's
        pass
    return roots + [f for f in folders[:MAX_PORTRAIT_ROOTS] if f not in roots]


def check_portraits(job: JobSpec) -> list[str]:
    problems = []
    for root in portrait_roots(job):
        try:
            if storage.exists(root, job.storage_options):
                continue
            problems.append(f"portrait location {root!r} does not exist; rows under it would fail with a row error")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"portrait location {root!r} cannot be reached ({type(exc).__name__}: {exc})")
    return problems
