"""What one replica does with a row, without Ray: fetch -> prepare -> generate -> encode/upload -> score.

``RowProcessor.process`` is safe to call from several threads at once (the Ray actor does, to overlap rows): the
model runs one row at a time under ``gpu_lock`` while other rows fetch/prepare or encode/upload/score beside it, so
the accelerator never waits on CPU work. Per-portrait work (decode, face checks, the backend's subject, the identity
embedding) is computed once per portrait and kept in a bounded LRU.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from farm import storage
from farm.config import JobSpec
from farm.manifest import RowDefaults
from farm.models import build_backend
from farm.models.base import Backend
from farm.params import SamplingParams
from farm.records import ErrorCode, InfraError, Outcome, Record, RowError, Status
from farm.storage import OutputLayout
from farm.types import GenerationRequest
from farm.video import decode_video, encode_mp4

log = logging.getLogger("farm")
AI_NOTICE = "AI-generated video"
PORTRAIT_CACHE_BYTES = 256 * 2**20  # per replica: prepared subjects and embeddings, not decoded images


def _is_infra(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, InfraError)) or type(exc).__name__ in {"OutOfMemoryError", "CudaError"}


class LRU:
    """A bounded map of key -> Future, so concurrent callers for one key compute the value once.

    Bounded by entries and by bytes (the arrays a value holds, ``nbytes``); the newest value is always kept.
    """

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Future[Any]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        with self._lock:
            fut = self._items.get(key)
            owner = fut is None
            if owner:
                fut = Future()
                self._items[key] = fut
                self._evict(keep=key)
            else:
                self._items.move_to_end(key)
        if owner:
            try:
                value = compute()
            except BaseException as exc:  # noqa: BLE001 - the future carries it to every waiter
                fut.set_exception(exc)
                if not isinstance(exc, RowError):
                    with self._lock:
                        self._items.pop(key, None)
            else:
                fut.set_result(value)
                with self._lock:
                    if key in self._items:
                        self._bytes[key] = nbytes_of(value)
                        self._evict(keep=key)
        return fut.result()

    def _over(self) -> bool:
        too_big = self.max_bytes is not None and sum(self._bytes.values()) > self.max_bytes
        return len(self._items) > self.size or too_big

    def _evict(self, keep: str) -> None:
        while len(self._items) > 1 and self._over():
            oldest = next(iter(self._items))
            if oldest == keep:
                break
            self._items.pop(oldest)
            self._bytes.pop(oldest, None)


def nbytes_of(value: Any, depth: int = 4) -> int:
    """Bytes of the arrays (numpy, torch) a value holds, through dataclasses, mappings and sequences."""
    if isinstance(getattr(value, "nbytes", None), int):
        return value.nbytes
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch.Tensor without importing torch
        return int(value.element_size() * value.nelement())
    if depth == 0:
        return 0
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif hasattr(value, "__dict__"):
        items = list(vars(value).values())
    else:
        return 0
    return sum(nbytes_of(item, depth - 1) for item in items)


@dataclass
class Portrait:
    """What a replica keeps per portrait: the backend's subject, the identity embedding and which bytes they came
    from; the decoded image only when a metric needs it (``Metric.uses_portrait``)."""

    subject: Any
    embedding: np.ndarray | None
    sha256: str
    stamp: str
    image: np.ndarray | None = None  # kept only when a metric compares frames with the portrait's pixels


class RowProcessor:
    """One model replica's per-row work. Construct once per replica (loads the model)."""

    def __init__(
        self,
        job: JobSpec,
        replica: str = "local",
        device: str = "cpu",
        cache_size: int = 64,
        cache_bytes: int = PORTRAIT_CACHE_BYTES,
    ) -> None:
        self.job = job
        self.replica = replica
        self.device = device
        self.layout = OutputLayout(job.output, job.storage_options)
        self.backend: Backend = build_backend(job.model_spec())
        started = time.perf_counter()
        log.info("%s: loading %s on %s", replica, self.backend.describe(), device)
        self.backend.setup(device)
        log.info("%s: model loaded in %.1f s", replica, time.perf_counter() - started)
        self.recognizer, self.identity = self._load_identity(job)
        self.metrics = self._load_metrics(job, device)
        self.keep_portrait_image = any(m.uses_portrait for m in self.metrics)
        self.portraits = LRU(cache_size, max_bytes=cache_bytes)
        self.gpu_lock = threading.Lock()
        self.busy_s = 0.0
        self.first_generate: float | None = None
        self.last_generate_end: float | None = None

    def _load_identity(self, job: JobSpec) -> tuple[Any, Any]:
        """The recognizer (portrait checks and embedding) and the ``identity`` metric over it, when enabled."""
        if not job.identity.enabled:
            return None, None
        from farm.identity.recognizer import build_recognizer
        from farm.metrics.identity import IdentityMetric

        ident = job.identity
        recognizer = build_recognizer(
            ident.recognizer, ident.pack, storage_options=job.storage_options, **ident.options
        )
        log.info("%s: recognizer %s ready", self.replica, recognizer.model_id)
        return recognizer, IdentityMetric.from_recognizer(recognizer, ident.frames, ident.strict, ident.min_face_size)

    def _load_metrics(self, job: JobSpec, device: str) -> list[Any]:
        """The job's other metrics (``metrics:``), weights loaded once per replica; GPU metrics on its device."""
        if not job.metrics:
            return []
        from farm.metrics import build_metrics

        metrics = build_metrics(job.metrics, job.storage_options)
        for metric in metrics:
            metric.setup(device if metric.device == "gpu" else "cpu")
            log.info("%s: metric %s ready (%s)", self.replica, metric.name, metric.fingerprint())
        return metrics

    # ------------------------------------------------------------------ stages
    def _load_portrait(self, uri: str) -> Portrait:
        # an InfraError propagates: the driver retries the row elsewhere, and nothing is cached
        found = storage.load_portrait(uri, self.job.storage_options, self.job.portrait_policy())
        embedding = None
        if self.recognizer is not None:
            ident = self.job.identity
            embedding = self.recognizer.portrait_embedding(
                found.image, strict=ident.strict, min_face_size=ident.min_face_size
            )
        subject = self.backend.prepare_subject(found.image)
        image = found.image if self.keep_portrait_image else None
        return Portrait(subject, embedding, found.sha256, found.stamp, image)

    def _inject(self, row_id: str, dispatch: int) -> None:
        """Fault injection for tests and chaos drills (``runtime.inject_faults``); a no-op unless configured."""
        faults = self.job.runtime.inject_faults
        if row_id in faults.get("delay", {}):
            time.sleep(faults["delay"][row_id])
        if dispatch <= faults.get("crash", {}).get(row_id, 0):
            os.kill(os.getpid(), signal.SIGKILL)
        if dispatch <= faults.get("hang", {}).get(row_id, 0):
            threading.Event().wait()
        if dispatch <= faults.get("oom", {}).get(row_id, 0):
            raise InfraError(f"injected out-of-memory fault for row {row_id} (runtime.inject_faults)")

    def _generate(self, portrait: Portrait, request: GenerationRequest, dispatch: int) -> tuple[np.ndarray, float]:
        with self.gpu_lock:
            start = time.perf_counter()
            if self.first_generate is None:
                self.first_generate = start
            if self.job.runtime.inject_faults:
                self._inject(request.id, dispatch)
            frames = self.backend.generate(portrait.subject, request)
            end = time.perf_counter()
            self.busy_s += end - start
            self.last_generate_end = end
        return frames, end - start

    def _metadata(self, request: GenerationRequest) -> dict[str, str]:
        model = self.backend.describe()
        return {
            "title": request.id,
            "comment": f"{AI_NOTICE} by {model}",
            "description": f"{AI_NOTICE}. Model: {model}. Generated by Lynx Farm.",
            "artist": model,
            "encoder_model": model,
        }

    def _score(self, video: bytes, portrait: Portrait, prompt: str) -> dict[str, Any]:
        """Every metric's columns for one video (identity with the portrait embedding made at its check)."""
        if self.identity is None and not self.metrics:
            return {}
        frames, _ = decode_video(video)
        out: dict[str, Any] = {}
        if self.identity is not None and portrait.embedding is not None:
            out.update(self.identity.score_embedding(frames, portrait.embedding))
        if self.metrics:
            from farm.metrics import score_all

            out.update(score_all(self.metrics, frames, portrait.image, prompt))
        return out

    # ------------------------------------------------------------------ entry point
    def process(self, task: dict[str, Any]) -> Outcome:
        """Run one row (``task["rescore"]``: score its committed video again, no generation); returns what the
        replica knows of its record, ``retry=True`` for an infrastructure fault."""
        started = time.time()
        request: GenerationRequest = task["request"]
        record = Record(
            id=request.id, replica=self.replica, queue_s=max(0.0, started - task.get("dispatched_at", started))
        )
        outcome = Outcome(record)
        try:
            t0 = time.perf_counter()
            portrait = self.portraits.get(task["portrait"], lambda: self._load_portrait(task["portrait"]))
            record.set(
                prepare_s=time.perf_counter() - t0, portrait_sha256=portrait.sha256, portrait_stamp=portrait.stamp
            )
            if task.get("rescore"):
                video, uri = self._committed_video(task["rescore"]), task["rescore"]
            else:
                video, uri = self._make_video(portrait, request, task.get("dispatch", 1), record)
            self._score_into(record, video, portrait, request.prompt)
            record.set(status=Status.OK.value, video=uri)
        except RowError as exc:
            record.set(status=Status.FAILED.value, error_code=exc.code.value, error_message=exc.message)
        except Exception as exc:  # noqa: BLE001 - classified: infra faults retry, the rest is recorded
            record.set(
                status=Status.FAILED.value,
                error_code=(ErrorCode.INFRA if _is_infra(exc) else ErrorCode.GENERATION_ERROR).value,
                error_message=f"{type(exc).__name__}: {exc}"[:2000],
            )
            outcome.retry, outcome.traceback = True, traceback.format_exc(limit=20)
        record.total_s = time.time() - task.get("dispatched_at", started)
        return outcome

    def _committed_video(self, uri: str) -> bytes:
        """The video an earlier run committed (to score it again); gone -> the row's ``video_unreadable``."""
        try:
            return storage.read_bytes(uri, self.job.storage_options)
        except FileNotFoundError:
            raise RowError(
                ErrorCode.VIDEO_UNREADABLE, f"committed video {uri!r} is gone; rerun with --regenerate-changed"
            ) from None

    def _make_video(
        self, portrait: Portrait, request: GenerationRequest, dispatch: int, record: Record
    ) -> tuple[bytes, str]:
        """Generate, encode and store the row's video; returns its bytes and URI."""
        frames, record.generate_s = self._generate(portrait, request, dispatch)
        t1 = time.perf_counter()
        frames = self.backend.postprocess(frames, request)
        video = encode_mp4(frames, request.params.fps, self._metadata(request))
        del frames
        uri = self.layout.video(request.id)
        storage.write_bytes_atomic(uri, video, self.job.storage_options)
        record.encode_s = time.perf_counter() - t1
        return video, uri

    def _score_into(self, record: Record, video: bytes, portrait: Portrait, prompt: str) -> None:
        """The metrics of ``video`` into ``record``; per-frame values also to ``metrics/<id>.json`` when asked."""
        t2 = time.perf_counter()
        metrics = self._score(video, portrait, prompt)
        record.score_s = time.perf_counter() - t2
        per_frame = metrics.pop("per_frame", None)
        if self.job.identity.per_frame_json and (metrics or per_frame):
            payload = {"id": record.id, **metrics, "per_frame": per_frame}
            self.layout.write_json(self.layout.metrics(record.id), json.loads(json.dumps(payload, default=float)))
        record.set(**metrics)

    def stats(self) -> dict[str, float]:
        span = 0.0
        if self.first_generate is not None and self.last_generate_end is not None:
            span = self.last_generate_end - self.first_generate
        return {"busy_s": self.busy_s, "span_s": span}

    def teardown(self) -> None:
        self.backend.teardown()


def backend_defaults(job: JobSpec) -> tuple[SamplingParams, str]:
    """Backend defaults overlaid with the job's ``defaults``: what every row starts from."""
    backend = build_backend(job.model_spec())
    params = backend.default_params().with_overrides(job.defaults.overrides())
    if job.defaults.two_pass_guidance:
        from dataclasses import replace

        params = replace(params, guidance_scale_i=None)
    negative = job.defaults.negative_prompt
    if negative is None:
        negative = backend.default_negative_prompt()
    return params, negative


def row_defaults(job: JobSpec) -> RowDefaults:
    """What every row of ``job`` falls back to, for ``farm run`` and ``farm validate`` alike."""
    params, negative = backend_defaults(job)
    return RowDefaults(
        params,
        negative,
        job.defaults.seed,
        job.runtime.require_rights_confirmed,
        allowed_portrait_roots=tuple(job.runtime.allowed_portrait_roots),
    )
