"""What a run shows while it works: a progress bar on a terminal, plain lines everywhere else.

Under ``ray job submit``, ``nohup`` or CI, stderr is not a terminal and a redrawn bar is one endless line; there the
run prints a plain line every ``runtime.progress_every_s`` seconds and at each phase change (waiting for replicas,
running, publishing, finished): rows done / total, rate, ETA, outcomes with the top error codes, and replicas. The
same snapshot is the heartbeat ``_job.json`` carries (``farm status OUT --json``). No Ray here.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from tqdm import tqdm

log = logging.getLogger("farm")
TOP_CODES = 3


@dataclass
class Snapshot:
    """Where a run stands; ``counts`` has ``ok``/``failed``/``skipped`` and ``failed:<error_code>`` keys."""

    total: int
    already_committed: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    replicas_ready: int = 0
    replicas_wanted: int = 0
    replicas_pending: int = 0
    in_flight: int = 0
    phase: str = "starting"

    @property
    def recorded(self) -> int:
        return sum(v for k, v in self.counts.items() if ":" not in k)

    @property
    def done(self) -> int:
        return self.already_committed + self.recorded

    def top_codes(self) -> list[tuple[str, int]]:
        codes = Counter({k.split(":", 1)[1]: v for k, v in self.counts.items() if k.startswith("failed:")})
        return codes.most_common(TOP_CODES)


def rate_and_eta(snap: Snapshot, elapsed_s: float) -> tuple[float | None, float | None]:
    """Rows recorded per second this run, and the seconds left at that rate (None until a row is recorded)."""
    if snap.recorded == 0 or elapsed_s <= 0:
        return None, None
    rate = snap.recorded / elapsed_s
    return rate, max(0, snap.total - snap.done) / rate


def describe(snap: Snapshot, elapsed_s: float) -> str:
    """One plain line, e.g. ``rows 120/1,000 (12.0%) | 2.10 rows/s | ETA 7m08s | ok 110 failed 8 (no_face 6) ...``."""
    rate, eta = rate_and_eta(snap, elapsed_s)
    share = f" ({snap.done / snap.total:.1%})" if snap.total else ""
    codes = ", ".join(f"{code} {n}" for code, n in snap.top_codes())
    parts = [
        f"rows {snap.done:,}/{snap.total:,}{share}",
        "- rows/s" if rate is None else f"{rate:.2f} rows/s",
        f"ETA {_duration(eta)}",
        f"ok {snap.counts['ok']} failed {snap.counts['failed']}{f' ({codes})' if codes else ''} "
        f"skipped {snap.counts['skipped']}",
        f"replicas {snap.replicas_ready}/{snap.replicas_wanted} ready, {snap.replicas_pending} loading or waiting",
        f"in flight {snap.in_flight}",
        snap.phase,
    ]
    return " | ".join(parts)


def as_dict(snap: Snapshot, elapsed_s: float) -> dict[str, Any]:
    """The snapshot as the heartbeat in ``_job.json`` keeps it."""
    rate, eta = rate_and_eta(snap, elapsed_s)
    return {
        "phase": snap.phase,
        "rows_total": snap.total,
        "rows_done": snap.done,
        "already_committed": snap.already_committed,
        "counts": dict(snap.counts),
        "rows_per_s": None if rate is None else round(rate, 4),
        "eta_s": None if eta is None else round(eta, 1),
        "replicas": {"ready": snap.replicas_ready, "wanted": snap.replicas_wanted, "pending": snap.replicas_pending},
        "in_flight": snap.in_flight,
        "elapsed_s": round(elapsed_s, 3),
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressReporter:
    """A tqdm bar when ``stream`` is a terminal, else a plain log line every ``every_s`` and at phase changes."""

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        every_s: float = 30.0,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        stream = stream or sys.stderr
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self.bar = tqdm(total=total, unit="row", mininterval=0.5, dynamic_ncols=True) if enabled and tty else None
        self.plain = enabled and not tty
        self.every_s = every_s
        self.clock = clock
        self.started = clock()
        self.last_line = -float("inf")
        self.last_phase = ""
        self.shown = 0

    def show(self, snap: Snapshot) -> None:
        """Bring the display up to ``snap`` (cheap: call it on every record and every loop turn)."""
        if self.bar is not None:
            self.bar.update(snap.done - self.shown)
            self.shown = snap.done
            codes = {code: n for code, n in snap.top_codes()}
            replicas = f"{snap.replicas_ready}/{snap.replicas_wanted}"
            ok, failed, skipped = snap.counts["ok"], snap.counts["failed"], snap.counts["skipped"]
            self.bar.set_postfix(ok=ok, failed=failed, skipped=skipped, replicas=replicas, **codes, refresh=False)
            return
        now = self.clock()
        if self.plain and (snap.phase != self.last_phase or now - self.last_line >= self.every_s):
            self.last_line, self.last_phase = now, snap.phase
            log.info("progress: %s", describe(snap, now - self.started))

    def elapsed(self) -> float:
        return self.clock() - self.started

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
