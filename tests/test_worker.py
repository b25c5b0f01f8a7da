"""RowProcessor without Ray: stages, fault classification, per-portrait caching."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from farm import storage
from farm.manifest import RowDefaults, resolve_row
from farm.storage import resolve_pkg_uri
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
    assert first.retry is True and first.record.error_code == "infra_error"
    assert "peer reset" in first.record.error_message and "ConnectionResetError" in first.traceback
    second = processor.process(_task(processor, row)).record
    assert second.status == "ok" and Path(second.video).is_file()
    assert second.portrait_sha256 == hashlib.sha256(Path(resolve_pkg_uri(row["portrait"])).read_bytes()).hexdigest()


def test_bad_image_is_a_row_error_and_portrait_work_is_cached(
    processor: RowProcessor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    bad = processor.process(_task(processor, {**rows(1)[0], "portrait": str(junk)}))
    assert bad.record.error_code == "portrait_unreadable" and not bad.retry
    prepared = {"n": 0}
    original = processor.backend.prepare_subject

    def counting(image):
        prepared["n"] += 1
        return original(image)

    monkeypatch.setattr(processor.backend, "prepare_subject", counting)
    for row in rows(3, portrait=ASTRONAUT):
        assert processor.process(_task(processor, row)).record.status == "ok"
    assert prepared["n"] == 1


def test_identity_options_reach_the_recognizer(tmp_path: Path) -> None:
    job = still_job(
        write_manifest(tmp_path / "m.parquet", rows(1)),
        str(tmp_path / "out"),
        identity={"enabled": True, "recognizer": "dlib", "options": {"upsample": 1, "min_score": 0.3}},
    )
    processor = RowProcessor(job)
    assert processor.recognizer.detector.upsample == 1 and processor.recognizer.detector.min_score == 0.3


def test_portrait_cache_is_bounded_in_bytes_and_keeps_no_decoded_image() -> None:
    """Issue 8 item 7: the per-replica cache held 64 full-resolution images; now it holds what rows need, in bytes."""
    import numpy as np

    from farm.worker import LRU, Portrait, nbytes_of

    mib = 2**20
    cache = LRU(size=64, max_bytes=3 * (mib + 4096))  # room for three portraits
    for key in "abcde":
        cache.get(key, lambda: Portrait({"face": np.zeros(mib, np.uint8)}, np.zeros(512, np.float32), "0" * 64, "s"))
    assert cache.nbytes <= 3 * (mib + 4096)
    assert list(cache._items) == ["c", "d", "e"]  # oldest first out
    big = cache.get("huge", lambda: np.zeros(8 * mib, np.uint8))
    assert big.nbytes == 8 * mib and list(cache._items) == ["huge"]  # the newest value is always kept
    assert nbytes_of(Portrait((np.zeros(10, np.float64),), None, "0" * 64, "s")) == 80
    assert Portrait(None, None, "0" * 64, "s").image is None  # the decoded image is kept only when a metric needs it
