"""farm.summary: per-config counts and metric means with seeded bootstrap intervals; nulls never count as 0."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pytest

from farm.summary import bootstrap_interval, default_by, metric_columns, render, summarize


def _table(rows: list[dict]) -> pa.Table:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def _sweep() -> pa.Table:
    """Two configs; g5 has 4 ok (one without a face score), 1 failed; g7 has 2 ok, 1 skipped; a carried `camera`."""
    rows = [
        {"id": "a0", "status": "ok", "config_id": "g5", "identity_mean": 0.6, "face_rate": 1.0, "generate_s": 2.0},
        {"id": "a1", "status": "ok", "config_id": "g5", "identity_mean": 0.8, "face_rate": 0.5, "generate_s": 4.0},
        {"id": "a2", "status": "ok", "config_id": "g5", "identity_mean": 0.7, "face_rate": 1.0, "generate_s": 3.0},
        {"id": "a3", "status": "ok", "config_id": "g5", "identity_mean": None, "face_rate": 0.0, "generate_s": 3.0},
        {"id": "a4", "status": "failed", "config_id": "g5", "identity_mean": None, "error_code": "no_face"},
        {"id": "b0", "status": "ok", "config_id": "g7", "identity_mean": 0.5, "face_rate": 1.0, "generate_s": 5.0},
        {"id": "b1", "status": "ok", "config_id": "g7", "identity_mean": 0.3, "face_rate": 1.0, "generate_s": 7.0},
        {"id": "b2", "status": "skipped", "config_id": "g7", "identity_mean": 0.99},
    ]
    for i, row in enumerate(rows):
        row["camera"] = "wide" if i % 2 else "close"
        row["model"] = "lynx"
        row["motion_mean"] = 0.25 if row["config_id"] == "g7" else None  # measured in one config only
    table = _table(rows)
    return table.append_column("identity_std", pa.nulls(table.num_rows, pa.float64()))  # never measured


def test_interval_contains_the_mean_and_is_deterministic() -> None:
    values = np.random.default_rng(1).normal(0.6, 0.1, size=50)
    low, high = bootstrap_interval(values, seed=3, resamples=500)
    assert low < values.mean() < high
    assert bootstrap_interval(values, seed=3, resamples=500) == (low, high)
    assert bootstrap_interval(values, seed=4, resamples=500) != (low, high)


def test_interval_narrows_with_more_values() -> None:
    rng = np.random.default_rng(2)
    widths = []
    for n in (10, 100, 1000):
        low, high = bootstrap_interval(rng.normal(0.5, 0.2, size=n), seed=0)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_one_value_has_a_zero_width_interval() -> None:
    assert bootstrap_interval(np.array([0.25])) == (0.25, 0.25)


def test_groups_by_config_id_and_counts_statuses() -> None:
    rows = {r["config_id"]: r for r in summarize(_sweep(), seed=0, resamples=200).to_pylist()}
    assert list(rows) == ["g5", "g7"]
    g5, g7 = rows["g5"], rows["g7"]
    assert (g5["rows"], g5["ok"], g5["failed"], g5["skipped"]) == (5, 4, 1, 0)
    assert (g7["rows"], g7["ok"], g7["failed"], g7["skipped"]) == (3, 2, 0, 1)
    assert g5["face_rate"] == pytest.approx(2.5 / 4)
    assert g5["seconds_per_video"] == pytest.approx(3.0)
    assert g7["seconds_per_video"] == pytest.approx(6.0)


def test_null_metrics_are_left_out_never_zero() -> None:
    rows = {r["config_id"]: r for r in summarize(_sweep(), resamples=200).to_pylist()}
    g5, g7 = rows["g5"], rows["g7"]
    assert g5["identity_mean_mean"] == pytest.approx(0.7)  # a3's null is not a 0 (0.525 if it were)
    assert g5["identity_mean_n"] == 3
    assert g5["identity_mean_lo"] <= 0.7 <= g5["identity_mean_hi"]
    assert g7["identity_mean_mean"] == pytest.approx(0.4)  # the skipped row's 0.99 is not an ok row's value
    assert g7["identity_mean_n"] == 2
    assert (g7["motion_mean_mean"], g7["motion_mean_n"]) == (0.25, 2)
    # a group without values: null mean and interval, n = 0
    assert (g5["motion_mean_mean"], g5["motion_mean_lo"], g5["motion_mean_hi"], g5["motion_mean_n"]) == (
        None,
        None,
        None,
        0,
    )


def test_groups_by_a_carried_column() -> None:
    rows = summarize(_sweep(), by=["camera"], resamples=100).to_pylist()
    assert [(r["camera"], r["rows"]) for r in rows] == [("close", 4), ("wide", 4)]
    both = summarize(_sweep(), by=["config_id", "camera"], resamples=100).to_pylist()
    assert [(r["config_id"], r["camera"]) for r in both] == [
        ("g5", "close"),
        ("g5", "wide"),
        ("g7", "close"),
        ("g7", "wide"),
    ]


def test_default_grouping_falls_back_to_model() -> None:
    table = _sweep()
    assert default_by(table) == ["config_id"]
    no_sweep = table.set_column(table.schema.get_field_index("config_id"), "config_id", pa.nulls(8, pa.string()))
    assert default_by(no_sweep) == ["model"]
    assert summarize(no_sweep, resamples=50).column("model").to_pylist() == ["lynx"]


def test_metrics_are_found_generically_and_checked_when_given() -> None:
    table = (
        _sweep().append_column("clip_score", pa.array([0.3] * 8)).append_column("motion_static", pa.array([True] * 8))
    )
    assert metric_columns(table) == ["identity_mean", "motion_mean", "motion_static", "clip_score"]  # no identity_std
    assert metric_columns(table, ["identity_std"]) == ["identity_std"]  # asked for: shown, all null
    never = summarize(table, metrics=["identity_std"], resamples=50).to_pylist()
    assert [(r["identity_std_mean"], r["identity_std_n"]) for r in never] == [(None, 0), (None, 0)]
    assert metric_columns(table, ["clip_score"]) == ["clip_score"]
    with pytest.raises(ValueError, match="'clip_scor' is not a column"):
        metric_columns(table, ["clip_scor"])
    with pytest.raises(ValueError, match="'camera' is string, not a number"):
        metric_columns(table, ["camera"])
    with pytest.raises(ValueError, match=r"cannot group by \['cfg'\]: no such column"):
        summarize(table, by=["cfg"])
    rate = summarize(table, metrics=["motion_static"], resamples=50).column("motion_static_mean").to_pylist()
    assert rate == [1.0, 1.0]


def test_render_table_csv_json() -> None:
    summary = summarize(_sweep(), resamples=200)
    text = render(summary, "table")
    assert text.splitlines()[0].split() == [
        "config_id",
        "rows",
        "ok",
        "failed",
        "skipped",
        "face_rate",
        "s/video",
        "identity_mean",
        "motion_mean",
    ]
    assert "0.7000 [" in text and "n=3" in text and "- (n=0)" in text
    parsed = list(csv.DictReader(io.StringIO(render(summary, "csv"))))
    assert [r["config_id"] for r in parsed] == ["g5", "g7"]
    assert float(parsed[0]["identity_mean_mean"]) == pytest.approx(0.7)
    assert parsed[0]["motion_mean_mean"] == ""  # null stays empty, not 0
    loaded = json.loads(render(summary, "json"))
    assert loaded[1]["identity_mean_n"] == 2 and loaded[0]["motion_mean_mean"] is None
    with pytest.raises(ValueError, match="give --format table, csv or json"):
        render(summary, "yaml")


def test_empty_table_renders() -> None:
    empty = _sweep().slice(0, 0)
    assert summarize(empty).num_rows == 0
    assert render(summarize(empty)) == "(no records)"


def test_a_metric_named_twice_or_face_rate_shows_once() -> None:
    """``--metrics identity_mean,face_rate,identity_mean``: each column once, in the order given; face_rate as the
    metric (mean with its interval) instead of the plain face_rate column beside it."""
    table = _sweep()
    assert metric_columns(table, ["identity_mean", "face_rate", "identity_mean"]) == ["identity_mean", "face_rate"]
    summary = summarize(table, metrics=["identity_mean", "face_rate", "identity_mean"], resamples=50)
    header = render(summary, "table").splitlines()[0].split()
    assert header == ["config_id", "rows", "ok", "failed", "skipped", "s/video", "identity_mean", "face_rate"]
    assert len(set(summary.column_names)) == len(summary.column_names)
    assert "0.6250 [" in render(summary, "table")  # g5's face rate over its 4 ok rows, with an interval
