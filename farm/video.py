"""H.264 mp4 encoding and decoding through the ffmpeg binary that imageio-ffmpeg ships (no ffprobe needed).

``decode_sampled`` streams frames from ffmpeg and keeps only the ones asked for, so scoring 16 frames of a long video
holds 16 frames in memory, not the whole decoded video.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """float frames in [0, 1] (or uint8 already) -> uint8 ``(F, H, W, 3)``."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_mp4(
    frames: np.ndarray,
    fps: float,
    metadata: Mapping[str, str] | None = None,
    crf: int = 18,
    preset: str = "medium",
) -> bytes:
    """Encode ``(F, H, W, 3)`` frames as H.264 (yuv420p, faststart) and return the mp4 bytes.

    ``metadata`` goes into the container (e.g. ``comment``/``description`` saying the video is AI-generated).
    Odd sizes are padded by one pixel, since yuv420p needs even dimensions.
    """
    import ffmpeg

    data = to_uint8(frames)
    if data.ndim != 4 or data.shape[-1] != 3 or data.shape[0] == 0:
        raise ValueError(f"frames must be (F, H, W, 3) with F > 0, got shape {data.shape}")
    _, height, width, _ = data.shape
    out_kwargs: dict[str, object] = {
        "vcodec": "libx264",
        "pix_fmt": "yuv420p",
        "crf": crf,
        "preset": preset,
        "movflags": "+faststart",
        "vf": "pad=ceil(iw/2)*2:ceil(ih/2)*2",
    }
    for i, (key, value) in enumerate((metadata or {}).items()):
        out_kwargs[f"metadata:g:{i}"] = f"{key}={value}"
    with tempfile.TemporaryDirectory(prefix="farm-enc-") as tmp:
        target = os.path.join(tmp, "out.mp4")
        stream = (
            ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
            .output(target, **out_kwargs)
            .global_args("-loglevel", "error", "-threads", "1")
            .overwrite_output()
        )
        try:
            stream.run(cmd=ffmpeg_exe(), input=data.tobytes(), capture_stdout=True, capture_stderr=True)
        except ffmpeg.Error as exc:
            raise RuntimeError(f"ffmpeg failed to encode {data.shape}: {exc.stderr.decode(errors='replace')}") from exc
        return Path(target).read_bytes()


@contextmanager
def _local_path(source: bytes | str | os.PathLike[str], prefix: str) -> Iterator[str]:
    """A path ffmpeg can read: ``source`` itself, or its bytes written to a temporary file."""
    if not isinstance(source, bytes):
        yield os.fspath(source)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        path = os.path.join(tmp, "in.mp4")
        Path(path).write_bytes(source)
        yield path


def _stream(path: str, shown: str) -> tuple[dict[str, object], Iterator[np.ndarray]]:
    """ffmpeg's metadata and a generator of uint8 ``(H, W, 3)`` frames, one decoded frame in memory at a time."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
    try:
        meta = next(reader)
    except (RuntimeError, StopIteration, OSError) as exc:
        raise ValueError(f"cannot decode video {shown}: {exc}") from exc
    width, height = meta["size"]

    def frames() -> Iterator[np.ndarray]:
        try:
            for buf in reader:
                yield np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3)
        finally:
            reader.close()  # stops ffmpeg when the caller stops early

    return meta, frames()


def decode_video(source: bytes | str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode an mp4 (bytes or local path) to uint8 ``(F, H, W, 3)`` and its fps (every frame: see ``decode_sampled``
    to keep only some)."""
    with _local_path(source, "farm-dec-") as path:
        meta, stream = _stream(path, "<bytes>" if isinstance(source, bytes) else path)
        frames = list(stream)
    if not frames:
        raise ValueError("video has no frames")
    return np.stack(frames), float(meta.get("fps") or 0.0)


def count_frames(path: str) -> int | None:
    """Frames in the first video stream, counted from its packets without decoding (``-c copy``: a fraction of a
    second for a long mp4); None when ffmpeg reports no count. Raises ``ValueError`` when ffmpeg can't read it."""
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "null"]
    done = subprocess.run([*cmd, "-progress", "pipe:1", "-nostats", "-"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"cannot read video {path}: {done.stderr.strip()[-500:]}")
    counts = [line.partition("=")[2] for line in done.stdout.splitlines() if line.startswith("frame=")]
    return int(counts[-1]) if counts and counts[-1].strip().isdigit() and int(counts[-1]) > 0 else None


def _keep(path: str, shown: str, wanted: Sequence[int]) -> tuple[np.ndarray | None, int, list[int]]:
    """One decoding pass: the frames at ``wanted`` (in order, those that exist), the number decoded, their indices."""
    want = set(int(i) for i in wanted)
    kept: list[np.ndarray] = []
    indices: list[int] = []
    _, stream = _stream(path, shown)
    total = 0
    for index, frame in enumerate(stream):
        total = index + 1
        if index in want:
            kept.append(frame.copy())
            indices.append(index)
    return (np.stack(kept) if kept else None), total, indices


def decode_sampled(
    source: bytes | str | os.PathLike[str], pick: Callable[[int], Sequence[int]]
) -> tuple[np.ndarray, int]:
    """The frames ``pick(total)`` selects (uint8 ``(len, H, W, 3)``, in order) and the video's frame count ``total``.

    Frames are decoded as a stream and dropped unless picked. ``total`` comes from the packet count
    (``count_frames``); a decoder that yields a different number of frames is caught at the end of the pass and the
    frames are picked again with the true count, so the result always equals picking from a full decode.
    """
    with _local_path(source, "farm-dec-") as path:
        shown = "<bytes>" if isinstance(source, bytes) else path
        expected = count_frames(path)
        if expected is None:  # no packet count: a first pass counts decoded frames (time, not memory)
            expected = _keep(path, shown, [])[1]
        frames, total, indices = _keep(path, shown, pick(expected))
        if total != expected and indices != [int(i) for i in pick(total)]:
            frames, total, indices = _keep(path, shown, pick(total))
    if total == 0 or frames is None:
        raise ValueError(f"video {shown} has no frames")
    return frames, total


def read_metadata(source: bytes | str | os.PathLike[str]) -> dict[str, str]:
    """Container-level metadata tags of an mp4 (via ``ffmpeg -f ffmetadata``; there is no ffprobe)."""
    with tempfile.TemporaryDirectory(prefix="farm-meta-") as tmp:
        path = os.path.join(tmp, "in.mp4")
        if isinstance(source, bytes):
            Path(path).write_bytes(source)
        else:
            path = os.fspath(source)
        target = os.path.join(tmp, "meta.txt")
        subprocess.run(
            [ffmpeg_exe(), "-loglevel", "error", "-i", path, "-f", "ffmetadata", target],
            check=True,
            capture_output=True,
        )
        tags: dict[str, str] = {}
        for line in Path(target).read_text().splitlines()[1:]:
            key, sep, value = line.partition("=")
            if sep and not key.startswith("["):
                tags[key] = value
        return tags
