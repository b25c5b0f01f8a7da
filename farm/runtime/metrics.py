"""The farm's counters and gauges, where operators already look: Ray's metrics (its dashboard, and Prometheus
scraping each node's metrics export port). Ray prefixes every name with ``ray_`` and adds ``_total`` to counters:

| Prometheus name | kind | tags | what |
|---|---|---|---|
| ``ray_farm_rows_total`` | counter | job, run, status, error_code | rows recorded by this run |
| ``ray_farm_rows_in_flight`` | gauge | job, run | rows dispatched to replicas and not yet back |
| ``ray_farm_replicas`` | gauge | job, run, state (ready, pending, wanted) | replicas by state |
| ``ray_farm_row_seconds`` | histogram | job, run, stage | seconds per row in each stage (``STAGES``) |
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from farm.records import Record

STAGES = ("queue", "prepare", "generate", "encode", "score", "total")
# seconds: a tiny test row takes milliseconds, a 14B Lynx row tens of minutes
BOUNDARIES = [0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 2400, 3600]


class FarmMetrics:
    """One run's metrics; every series is tagged with the job's name and the run id."""

    def __init__(self, job: str, run_id: str) -> None:
        self.tags = {"job": job, "run": run_id}
        keys = ("job", "run")
        self.rows = Counter(
            "farm_rows", "Rows recorded, by status and error code", tag_keys=(*keys, "status", "error_code")
        )
        self.in_flight = Gauge("farm_rows_in_flight", "Rows on replicas now", tag_keys=keys)
        self.replicas = Gauge("farm_replicas", "Replicas by state (ready, pending, wanted)", tag_keys=(*keys, "state"))
        self.row_seconds = Histogram(
            "farm_row_seconds", "Seconds per row, by stage", boundaries=BOUNDARIES, tag_keys=(*keys, "stage")
        )

    def record(self, rec: Record) -> None:
        """A committed record: its outcome, and the time each stage took (stages it did not reach are absent)."""
        self.rows.inc(1, tags={**self.tags, "status": rec.status or "", "error_code": rec.error_code or ""})
        for stage in STAGES:
            seconds = getattr(rec, f"{stage}_s")
            if seconds is not None:
                self.row_seconds.observe(float(seconds), tags={**self.tags, "stage": stage})

    def state(self, ready: int, pending: int, wanted: int, in_flight: int) -> None:
        for state, value in (("ready", ready), ("pending", pending), ("wanted", wanted)):
            self.replicas.set(value, tags={**self.tags, "state": state})
        self.in_flight.set(in_flight, tags=self.tags)
