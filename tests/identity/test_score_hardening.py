"""``farm score`` finishes: missing filesystems are named up front, dead workers and MemoryError become retries and
then records, and videos are sampled while decoding (bounded memory)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from farm import scoring, video
from farm.cli import main
from farm.identity import score_job
from farm.identity.recognizer import sample_indices
from farm.identity.score_job import load_video_frames
from farm.records import ErrorCode, InfraError
from farm.scoring import Entry, RowQueue, UnavailableFilesystem, score_manifest
from farm.storage import OutputLayout, read_image
from farm.table import read_results
from farm.video import decode_sampled, decode_video, encode_mp4
from tests.helpers import ASTRONAUT, write_manifest


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 frames of the astronaut at 128²: a face in every frame, cheap to score."""
    image = read_image(ASTRONAUT)[::4, ::4]
    path = tmp_path_factory.mktemp("clip") / "astronaut.mp4"
    path.write_bytes(encode_mp4(np.repeat(image[None], 4, axis=0), 8, preset="ultrafast"))
    return str(path)


def _records(out: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read_results(OutputLayout(out)).to_pylist()}


@pytest.fixture()
def score(tmp_path: Path, tiny_pack: Path) -> Any:
    """``score(rows, **kwargs)`` -> (summary, records by id): 2 workers with the tiny random-weight insightface pack
    (it loads in a fraction of a second, so recreated pools stay cheap; its faces are random, its records real)."""

    def run(data: list[dict[str, Any]], **kwargs: Any) -> tuple[dict[str, Any], dict[str, dict]]:
        out = str(tmp_path / "scores")
        kwargs = {"recognizer": "insightface", "pack": str(tiny_pack), "workers": 2, "frames": 2, **kwargs}
        summary = score_manifest(write_manifest(tmp_path / "m.parquet", data), out, progress=False, **kwargs)
        return summary, _records(out)

    return run


# ---------------------------------------------------------------------------------------------- filesystems
@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="needs an environment without gcsfs")
def test_gs_row_without_gcsfs_stops_up_front_naming_the_package(
    tmp_path: Path, clip: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = [
        {"id": "local", "portrait": ASTRONAUT, "video": clip},
        {"id": "gcs", "portrait": ASTRONAUT, "video": "gs://bucket/videos/a.mp4"},
    ]
    out = tmp_path / "scores"
    args = ["score", write_manifest(tmp_path / "m.parquet", data), "--output", str(out), "--no-progress"]
    assert main(args) == 2  # the CLI's usage exit (UnavailableFilesystem is a ManifestError)
    err = capsys.readouterr().err
    assert "gcsfs" in err and "gs://bucket/videos/a.mp4" in err and "nothing was scored" in err
    assert not OutputLayout(str(out)).log_parts()
    with pytest.raises(UnavailableFilesystem, match="1 gs:// URIs"):
        score_manifest(str(tmp_path / "m.parquet"), str(out), progress=False, workers=1)


def test_unknown_protocol_is_the_rows_error(score: Any, clip: str) -> None:
    data = [
        {"id": "ok", "portrait": ASTRONAUT, "video": clip},
        {"id": "video", "portrait": ASTRONAUT, "video": "nosuchproto://b/a.mp4"},
        {"id": "portrait", "portrait": "nosuchproto://b/p.png", "video": clip},
    ]
    summary, recs = score(data)
    assert summary["counts"] == {"ok": 1, "failed": 2}
    assert (recs["video"]["error_code"], recs["portrait"]["error_code"]) == ("video_unreadable", "portrait_unreadable")
    assert "nosuchproto" in recs["video"]["error_message"]


def test_a_missing_filesystem_inside_a_worker_is_an_infra_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package(*_: Any, **__: Any) -> Any:
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(score_job.storage, "read_bytes", no_package)
    with pytest.raises(InfraError, match="can't be read on this machine: Install gcsfs"):
        load_video_frames("gs://bucket/a.mp4", k=2)


# ------------------------------------------------------------------------------------- worker faults
def _marker_once(marker: str) -> bool:
    """True the first time only for ``marker`` (a file remembers, across worker processes)."""
    path = Path(marker)
    if path.exists():
        return False
    path.write_text("x")
    return True


def killing_scorer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The real chunk scorer, except that a row whose ``die`` column says so SIGKILLs its own worker first."""
    for row in rows:
        die = row.get("die") or ""
        if die == "always" or (die.startswith("once:") and _marker_once(die[5:])):
            os.kill(os.getpid(), signal.SIGKILL)
    return scoring._score_chunk(rows)


def faulting_scorer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The real chunk scorer with the video read failing as the row's ``fail`` column says (inside ``score_row``)."""
    real = score_job.load_video_frames
    faults = {r["id"]: r.get("fail") or "" for r in rows}

    def load(uri: str, storage_options: Any = None, k: int | None = None) -> Any:
        fail = next((f for i, f in faults.items() if uri.endswith(f"#{i}")), "")
        kind, _, spec = fail.partition("+")
        if kind and (not spec or _marker_once(spec)):
            raise MemoryError() if kind == "oom" else InfraError(f"injected {kind}")
        return real(uri.split("#", 1)[0], storage_options, k)

    score_job.load_video_frames = load  # this worker process only
    try:
        return scoring._score_chunk(rows)
    finally:
        score_job.load_video_frames = real


def test_sigkilled_worker_rows_are_requeued_and_a_poison_row_is_recorded(score: Any, tmp_path: Path, clip: str) -> None:
    data = [{"id": f"ok{i}", "portrait": ASTRONAUT, "video": clip, "die": None} for i in range(3)]
    data += [
        {"id": "poison", "portrait": ASTRONAUT, "video": clip, "die": "always"},
        {"id": "flaky", "portrait": ASTRONAUT, "video": clip, "die": f"once:{tmp_path / 'flaky.marker'}"},
    ]
    summary, recs = score(data, chunk_scorer=killing_scorer)
    assert summary["counts"] == {"ok": 4, "failed": 1}
    assert set(recs) == {r["id"] for r in data}
    assert all(r["status"] == "ok" and r["frames_scored"] == 2 for k, r in recs.items() if k != "poison")
    poison = recs["poison"]
    assert (poison["status"], poison["error_code"]) == ("failed", ErrorCode.POISON.value)
    assert "worker process died" in poison["error_message"] and f"{scoring.MAX_TRIES} times" in poison["error_message"]


def test_workers_that_always_die_abort_the_run(score: Any, clip: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scoring, "MAX_DEATHS", 2)  # read by the parent: 3 deaths with no row finishing
    data = [{"id": k, "portrait": ASTRONAUT, "video": clip, "die": "always"} for k in ("a", "b", "c")]
    with pytest.raises(scoring.ScoreAborted, match="died 3 times without a row finishing"):
        score(data, chunk_scorer=killing_scorer, workers=1)


def test_memory_error_and_infra_faults_are_retried_alone_then_recorded(score: Any, tmp_path: Path, clip: str) -> None:
    marker = tmp_path / "once"
    cases = {"ok": "", "oom": "oom", "oom_once": f"oom+{marker}-1", "infra_once": f"infra+{marker}-2"}
    data = [{"id": k, "portrait": ASTRONAUT, "video": f"{clip}#{k}", "fail": f} for k, f in cases.items()]
    summary, recs = score(data, chunk_scorer=faulting_scorer)
    assert summary["counts"] == {"ok": 3, "failed": 1}
    oom = recs["oom"]
    assert (oom["status"], oom["error_code"]) == ("failed", ErrorCode.INFRA.value)
    assert "out of memory" in oom["error_message"]
    data = [{**row, "video": clip} for row in data]
    summary, recs = score(data, retry_failed=True)  # the machine has memory again: only the failed row is rescored
    assert summary["counts"] == {"already_committed": 3, "ok": 1} and recs["oom"]["status"] == "ok"


def test_a_recognizer_that_cannot_load_is_raised_not_a_dead_pool(score: Any, tmp_path: Path, clip: str) -> None:
    data = [{"id": "a", "portrait": ASTRONAUT, "video": clip}]
    with pytest.raises(FileNotFoundError, match="nonexistent-pack"):
        score(data, pack=str(tmp_path / "nonexistent-pack"))


def test_row_queue_charges_a_fault_only_to_a_row_that_ran_alone() -> None:
    queue = RowQueue(iter([({"id": "a"}, {"id": "b"}), ({"id": "c"},)]), max_tries=2)
    first = queue.next_batch(0)
    assert [e.row["id"] for e in first] == ["a", "b"]
    assert queue.fault(first, alone=False, code="poison", message="died") == []  # not charged: who did it?
    assert queue.next_batch(0) is not None and queue.next_batch(1) is None  # suspects run one at a time, alone
    b = queue.next_batch(0)
    assert [e.row["id"] for e in b] == ["b"] and queue.fault(b, alone=True, code="poison", message="died") == []
    again = queue.next_batch(0)
    assert again == [Entry({"id": "b"}, charged=1)]
    [final] = queue.fault(again, alone=True, code="poison", message="died")
    assert final.entry.row["id"] == "b" and "2 times" in final.message
    assert [e.row["id"] for e in queue.next_batch(0)] == ["c"] and queue.next_batch(0) is None


# ------------------------------------------------------------------------------------- frame sampling
@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> str:
    """600 frames of 256², each different (a moving gradient with a frame-number stripe)."""
    y, x = np.mgrid[0:256, 0:256]
    frames = np.empty((600, 256, 256, 3), np.uint8)
    for i in range(600):
        frames[i, ..., 0] = (x + 3 * i) % 256
        frames[i, ..., 1] = (y + i) % 256
        frames[i, ..., 2] = (i * 7) % 256
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    path.write_bytes(encode_mp4(frames, 24, preset="ultrafast"))
    return str(path)


def _peak_mb(fn: Any) -> tuple[Any, float]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_sampling_while_decoding_matches_full_decode_in_bounded_memory(long_video: str) -> None:
    (full, _), full_peak = _peak_mb(lambda: decode_video(long_video))
    (sampled, total), sampled_peak = _peak_mb(lambda: load_video_frames(long_video, k=16))
    assert total == 600 and full.shape == (600, 256, 256, 3)
    assert np.array_equal(sampled, full[sample_indices(600, 16)])
    print(f"peak traced memory: full decode {full_peak:.1f} MiB, sampled while decoding {sampled_peak:.1f} MiB")
    assert full_peak > 100 and sampled_peak < 12  # 16 kept frames are 3 MiB


@pytest.mark.parametrize("count", [None, 590, 610], ids=["no-count", "fewer", "more"])
def test_a_wrong_or_missing_packet_count_still_picks_the_right_frames(
    clip: str, long_video: str, count: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    full, _ = decode_video(long_video)
    monkeypatch.setattr(video, "count_frames", lambda path: count)
    frames, total = decode_sampled(long_video, lambda n: sample_indices(n, 5))
    assert total == 600 and np.array_equal(frames, full[sample_indices(600, 5)])


# ---------------------------------------------------------------------------------------------- resume
def test_a_rerun_with_other_settings_is_refused_until_rescore_changed(score: Any, clip: str) -> None:
    """Found by a README walkthrough: rerunning with ``--frames 4`` after ``--frames 2`` kept the old scores."""
    data = [{"id": f"v{i}", "portrait": ASTRONAUT, "video": clip} for i in range(3)]
    first, recs = score(data)
    assert sum(first["counts"].get(k, 0) for k in ("ok", "failed")) == 3
    assert {json.loads(r["metrics_config"])["identity"]["frames"] for r in recs.values()} == {2}
    again, _ = score(data)
    assert again["counts"].get("already_committed") == 3
    changed = "identity.frames: 3 committed rows were made with 2; this run gives 4"
    with pytest.raises(scoring.ChangedScores, match=changed):
        score(data, frames=4)
    rescored, recs = score(data, frames=4, rescore_changed=True)
    assert sum(rescored["counts"].get(k, 0) for k in ("ok", "failed")) == 3
    assert not rescored["counts"].get("already_committed")
    assert {json.loads(r["metrics_config"])["identity"]["frames"] for r in recs.values()} == {4}
