"""RowProcessor without Ray: stages, fault classification, per-portrait caching."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm import storage
from farm.manifest import RowDefaults, resolve_row
from farm.worker import RowProcessor, backend_defaults
from tests.helpers import ASTRONAUT, rows, still_job, write_manifest


@pytest.fixture()
def processor(tmp_path: Path) -> RowProcessor:
    job = still_job(write_manifest(tmp_path / "m.parquet", rows(1)), str(tmp_path / "out"))
    return RowProcessor(job)


def _task(processor: RowProcessor, row: dict) -> dict:
    params, negative = backend_defaults(processor.job)
    return {
        "request": resolve_row(row, RowDefaults(params, negative, 0)),
        "portrait": row["portrait"],
        "dispatched_at": 0.0,
        "dispatch": 1,
    }


def test_transient_fetch_error_is_retried_not_cached(processor: RowProcessor, monkeypatch: pytest.MonkeyPatch) -> None:
    real = storage.read_bytes
    calls = {"n": 0}

    def flaky(uri: str, storage_options=None) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionResetError("peer reset")
        return real(uri, storage_options)

    monkeypatch.setattr(storage, "read_bytes", flaky)
    row = rows(1)[0]
    first = processor.process(_task(processor, row))
    assert first["retry"] is True and first["error_code"] == "infra_error" and "peer reset" in first["error_message"]
    second = processor.process(_task(processor, row))
    assert second["status"] == "ok" and Path(second["video"]).is_file()


def test_bad_image_is_a_row_error_and_portrait_work_is_cached(
    processor: RowProcessor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    bad = processor.process(_task(processor, {**rows(1)[0], "portrait": str(junk)}))
    assert bad["error_code"] == "portrait_unreadable" and "retry" not in bad
    prepared = {"n": 0}
    original = processor.backend.prepare_subject

    def counting(image):
        prepared["n"] += 1
        return original(image)

    monkeypatch.setattr(processor.backend, "prepare_subject", counting)
    for row in rows(3, portrait=ASTRONAUT):
        assert processor.process(_task(processor, row))["status"] == "ok"
    assert prepared["n"] == 1


def test_identity_options_reach_the_recognizer(tmp_path: Path) -> None:
    job = still_job(
        write_manifest(tmp_path / "m.parquet", rows(1)),
        str(tmp_path / "out"),
        identity={"enabled": True, "recognizer": "dlib", "options": {"upsample": 1, "min_score": 0.3}},
    )
    processor = RowProcessor(job)
    assert processor.recognizer.detector.upsample == 1 and processor.recognizer.detector.min_score == 0.3
