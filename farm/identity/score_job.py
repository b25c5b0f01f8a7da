"""Standalone scoring of videos made anywhere: rows ``{id, portrait, video}`` in, one metric record per row out.

This is the body of ``farm score``: the CLI/runtime feed it manifest rows (the ones without a committed record) and
commit what it yields. ``video`` is an mp4 (or any container ffmpeg reads) or a folder of frame images; both, and
the portrait, may be any fsspec URI. Only the ``k`` sampled frames are kept: a folder reads just those files, a video
file is decoded as a stream that drops the others. Bad input is data: a row whose portrait or video can't be used
yields a ``failed`` record with an error code, never an exception. A fault of the machine or the store (``InfraError``,
``MemoryError``) is raised for the caller to retry (``farm.scoring`` retries the row alone, then records it).
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from farm import storage
from farm.identity.faces import DEFAULT_MIN_FACE_SIZE
from farm.identity.recognizer import DEFAULT_FRAMES, Recognizer, empty_metrics, sample_indices
from farm.records import ErrorCode, InfraError, RowError, Status
from farm.video import IMAGE_SUFFIXES, decode_sampled, decode_video

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif")


def _natural_key(uri: str) -> list[Any]:
    """``frame_2.png`` before ``frame_10.png``."""
    name = uri.rsplit("/", 1)[-1].lower()
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The image files directly in a frames folder, in natural order."""
    found: set[str] = set()
    for suffix in IMAGE_SUFFIXES:
        found.update(storage.list_files(uri, suffix, storage_options))
        found.update(storage.list_files(uri, suffix.upper(), storage_options))
    return sorted(found, key=_natural_key)


def _video_source(uri: str, storage_options: dict[str, Any] | None) -> bytes | str:
    """A local video's path (ffmpeg reads it in place; only regular files, so a FIFO can't block), else its bytes."""
    if not storage.is_local(uri):
        return storage.read_bytes(uri, storage_options)  # InfraError (store or network) propagates
    _, path = storage.get_fs(uri)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise RowError(ErrorCode.VIDEO_UNREADABLE, f"video {uri!r} is not a regular file")
    return path


def load_video_frames(
    uri: str, storage_options: dict[str, Any] | None = None, k: int | None = None
) -> tuple[np.ndarray, int]:
    """Frames to score (uint8 ``(F, H, W, 3)``) and the video's total frame count.

    Only the ``k`` frames the scorer samples are read (``k=None``: all): from a folder of images, those files; from
    a video file, those frames of a streamed decode. Raises ``RowError(video_unreadable)`` naming the URI, and
    ``InfraError`` when the store failed or the URI's filesystem is not installed (e.g. ``gs://`` without gcsfs).
    """
    if not uri:
        raise RowError(ErrorCode.VIDEO_UNREADABLE, "the row has no video; give an mp4 or a folder of frames")
    try:
        is_video_file = uri.lower().endswith(VIDEO_SUFFIXES)
        if not is_video_file:
            fs, path = storage.get_fs(uri, storage_options)
            if fs.isdir(path):
                files = frame_files(uri, storage_options)
                if not files:
                    raise RowError(
                        ErrorCode.VIDEO_UNREADABLE,
                        f"video folder {uri!r} has no frame images ({', '.join(IMAGE_SUFFIXES)})",
                    )
                picked = sample_indices(len(files), k) if k else np.arange(len(files))
                frames = [storage.read_image(files[int(i)], storage_options) for i in picked]
                shapes = {f.shape for f in frames}
                if len(shapes) != 1:
                    raise RowError(ErrorCode.VIDEO_UNREADABLE, f"frames in {uri!r} differ in size: {sorted(shapes)}")
                return np.stack(frames), len(files)
        source = _video_source(uri, storage_options)
        if k:
            return decode_sampled(source, lambda total: sample_indices(total, k))
        frames, _ = decode_video(source)
        return frames, len(frames)
    except (RowError, InfraError):
        raise
    except ImportError as exc:  # a protocol whose fsspec package is missing: the machine's fault, not the row's
        raise InfraError(f"video {uri!r} can't be read on this machine: {exc}") from None
    except FileNotFoundError as exc:
        raise RowError(ErrorCode.VIDEO_UNREADABLE, f"video {uri!r} not found: {exc}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise RowError(ErrorCode.VIDEO_UNREADABLE, f"video {uri!r} can't be decoded: {exc}") from None


def _portrait_embedding(
    recognizer: Recognizer, uri: str, storage_options: dict[str, Any] | None, strict: bool, min_face_size: float
) -> np.ndarray:
    image = storage.read_portrait(uri, storage_options)  # an InfraError propagates: no false failed record
    return recognizer.portrait_embedding(image, strict=strict, min_face_size=min_face_size)


def score_row(
    row: Mapping[str, Any],
    recognizer: Recognizer,
    cache: OrderedDict[str, np.ndarray | RowError],
    storage_options: dict[str, Any] | None = None,
    k: int = DEFAULT_FRAMES,
    strict: bool = False,
    min_face_size: float = DEFAULT_MIN_FACE_SIZE,
    portrait_cache: int = 256,
) -> dict[str, Any]:
    """One record: ``id, status, error_code, error_message, portrait, video, score_s`` + metrics.

    Bad input becomes a ``failed`` record; ``InfraError`` and ``MemoryError`` propagate (worth a retry, never
    cached). ``cache`` keeps each portrait's embedding (or its row error) across calls, at most ``portrait_cache``.
    """
    start = time.perf_counter()
    portrait_uri = str(row.get("portrait") or "")
    video_uri = str(row.get("video") or "")
    record: dict[str, Any] = {
        "id": row.get("id"),
        "status": Status.OK.value,
        "error_code": None,
        "error_message": None,
        "portrait": portrait_uri or None,
        "video": video_uri or None,
        **empty_metrics(),
    }
    try:
        if portrait_uri not in cache:
            try:
                cache[portrait_uri] = _portrait_embedding(
                    recognizer, portrait_uri, storage_options, strict, min_face_size
                )
            except RowError as exc:
                cache[portrait_uri] = exc
            while len(cache) > portrait_cache:
                cache.popitem(last=False)
        cache.move_to_end(portrait_uri)
        embedding = cache[portrait_uri]
        if isinstance(embedding, RowError):
            raise embedding
        frames, _total = load_video_frames(video_uri, storage_options, k)
        record.update(recognizer.score_frames(frames, embedding, k=k))
    except RowError as exc:
        record.update(status=Status.FAILED.value, error_code=exc.code.value, error_message=exc.message)
    record["score_s"] = time.perf_counter() - start
    return record


def score_rows(
    rows: Iterable[Mapping[str, Any]],
    recognizer: Recognizer,
    storage_options: dict[str, Any] | None = None,
    k: int = DEFAULT_FRAMES,
    strict: bool = False,
    min_face_size: float = DEFAULT_MIN_FACE_SIZE,
    portrait_cache: int = 256,
) -> Iterator[dict[str, Any]]:
    """Yield one record per row (``score_row``); each portrait is embedded once, so many videos of one person cost
    one detection."""
    cache: OrderedDict[str, np.ndarray | RowError] = OrderedDict()
    for row in rows:
        yield score_row(row, recognizer, cache, storage_options, k, strict, min_face_size, portrait_cache)
