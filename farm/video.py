"""H.264 mp4 encoding and decoding through the ffmpeg binary that imageio-ffmpeg ships (no ffprobe needed)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping
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


def decode_video(source: bytes | str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode an mp4 (bytes or local path) to uint8 ``(F, H, W, 3)`` and its fps."""
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory(prefix="farm-dec-") as tmp:
        if isinstance(source, bytes):
            path = os.path.join(tmp, "in.mp4")
            Path(path).write_bytes(source)
        else:
            path = os.fspath(source)
        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        try:
            meta = next(reader)
        except (RuntimeError, StopIteration, OSError) as exc:
            shown = "<bytes>" if isinstance(source, bytes) else path
            raise ValueError(f"cannot decode video {shown}: {exc}") from exc
        width, height = meta["size"]
        frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    if not frames:
        raise ValueError("video has no frames")
    return np.stack(frames), float(meta.get("fps") or 0.0)


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
