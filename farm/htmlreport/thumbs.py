"""Small JPEG thumbnails as ``data:`` URIs: a strip of sampled frames per video, and its portrait.

Only the sampled frames are kept (``farm.video.decode_sampled``); videos are read on a thread pool (ffmpeg runs in
its own process, so threads overlap). A video or portrait that cannot be read gets a note, never an exception; once
the thumbnails reach ``max_bytes`` the remaining rows are left out (and say so), which caps the page's size.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from farm import storage, video


@dataclass(frozen=True)
class ThumbSpec:
    """How thumbnails are made: frames per strip, the box they fit in (px), JPEG quality, the byte budget."""

    frames: int = 4
    px: int = 96
    quality: int = 70
    max_bytes: int = 20_000_000
    workers: int = 8


@dataclass
class Thumbs:
    """One row's pictures (``data:`` URIs) and what went wrong getting them (``notes``, shown on the card)."""

    portrait: str | None = None
    frames: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def size(self) -> int:
        return len(self.portrait or "") + sum(len(f) for f in self.frames)


def jpeg_uri(image: np.ndarray, box: tuple[int, int], quality: int) -> str:
    """An RGB uint8 image shrunk to fit ``box`` (never enlarged), as a ``data:image/jpeg;base64,...`` URI."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    picture.thumbnail(box)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def spread(count: int) -> Callable[[int], list[int]]:
    """A ``decode_sampled`` picker: ``count`` frame indices spread evenly from the first frame to the last."""

    def pick(total: int) -> list[int]:
        return sorted({int(round(i)) for i in np.linspace(0, max(0, total - 1), num=min(count, max(total, 1)))})

    return pick


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def video_strip(uri: str, options: dict[str, Any] | None, spec: ThumbSpec) -> list[str]:
    frames, _ = video.decode_sampled(storage.read_bytes(uri, options), spread(spec.frames))
    box = (spec.px * 3 // 2, spec.px)  # video frames are mostly landscape: a wider box keeps them legible
    return [jpeg_uri(frame, box, spec.quality) for frame in frames]


class PortraitCache:
    """Portrait thumbnails by URI: many rows share a portrait, and each is read once per report."""

    def __init__(self, options: dict[str, Any] | None, spec: ThumbSpec) -> None:
        self.options, self.spec = options, spec
        self.done: dict[str, tuple[str | None, str | None]] = {}
        self.lock = threading.Lock()

    def get(self, uri: str) -> tuple[str | None, str | None]:
        """(thumbnail, None) or (None, why it could not be read)."""
        with self.lock:
            if uri in self.done:
                return self.done[uri]
        try:
            image = storage.read_image(uri, self.options)
            found: tuple[str | None, str | None] = (
                jpeg_uri(image, (self.spec.px, self.spec.px), self.spec.quality),
                None,
            )
        except Exception as exc:  # noqa: BLE001 - a missing or broken portrait is a note on the card, not a crash
            found = (None, f"portrait unreadable: {_reason(exc)}")
        with self.lock:
            self.done[uri] = found
        return found


def row_thumbs(row: dict[str, Any], options: dict[str, Any] | None, spec: ThumbSpec, cache: PortraitCache) -> Thumbs:
    out = Thumbs()
    if row.get("portrait"):
        out.portrait, note = cache.get(row["portrait"])
        out.notes += [note] if note else []
    else:
        out.notes.append("no portrait recorded")
    try:
        out.frames = video_strip(row["video"], options, spec)
    except Exception as exc:  # noqa: BLE001 - an unreadable video is a placeholder and a note, not a crash
        out.notes.append(f"video unreadable: {_reason(exc)}")
    return out


def make_thumbs(
    rows: Sequence[dict[str, Any]], options: dict[str, Any] | None, spec: ThumbSpec
) -> tuple[dict[str, Thumbs], int]:
    """Thumbnails per row id, in ``rows`` order until ``spec.max_bytes`` is spent; the count left out by the cap."""
    cache = PortraitCache(options, spec)
    found: dict[str, Thumbs] = {}
    spent, left_out = 0, 0
    with ThreadPoolExecutor(max_workers=max(1, spec.workers), thread_name_prefix="farm-thumbs") as pool:
        futures = [pool.submit(row_thumbs, row, options, spec, cache) for row in rows]
        for row, future in zip(rows, futures):
            if spent >= spec.max_bytes:
                future.cancel()
                left_out += 1
                found[row["id"]] = Thumbs(notes=["left out: the report reached its size cap"])
                continue
            found[row["id"]] = future.result()
            spent += found[row["id"]].size()
    return found, left_out
