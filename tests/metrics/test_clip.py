"""CLIPScore with a tiny random CLIP written in transformers' folder layout and loaded like real weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from farm.metrics import build_metric
from farm.metrics.clip import ClipMetric
from tests.metrics.helpers import moving_square

PROMPT = "A woman in an orange flight suit walks along the beach at sunset."


def _metric(weights: Path, frames: int = 4) -> ClipMetric:
    metric = build_metric({"name": "clip", "weights": str(weights), "frames": frames})
    metric.setup("cpu")
    return metric


@pytest.fixture(scope="module")
def clip(tiny_clip: Path) -> ClipMetric:
    return _metric(tiny_clip)


@pytest.fixture(scope="module")
def video(astronaut: np.ndarray) -> np.ndarray:
    return np.stack([astronaut, np.roll(astronaut, 40, axis=1), astronaut[::-1].copy(), astronaut // 2])


def test_score_is_clipped_cosine_times_100(clip: ClipMetric, video) -> None:
    m = clip.score(video, None, PROMPT)
    assert 0.0 <= m["clip_score"] <= 100.0
    cos = clip.cosines(list(video), PROMPT)
    assert cos.shape == (4,) and np.all(np.abs(cos) <= 1.0 + 1e-6)
    assert m["clip_score"] == pytest.approx(float(np.mean(100.0 * np.clip(cos, 0, None))))


def test_deterministic_across_calls_and_loads(clip: ClipMetric, tiny_clip: Path, video) -> None:
    first = clip.score(video, None, PROMPT)
    assert clip.score(video, None, PROMPT) == first
    assert _metric(tiny_clip).score(video, None, PROMPT)["clip_score"] == pytest.approx(first["clip_score"], abs=1e-9)


def test_prompt_and_frames_move_the_score(clip: ClipMetric, video) -> None:
    a = clip.cosines(list(video), PROMPT)
    b = clip.cosines(list(video), "zzz qqq 0123 !!")
    assert not np.allclose(a, b)
    c = clip.cosines(list(moving_square(4, 2)), PROMPT)
    assert not np.allclose(a, c)


def test_long_prompts_are_truncated(clip: ClipMetric, video) -> None:
    assert clip.score(video, None, "a very long prompt " * 60)["clip_score"] is not None


def test_missing_inputs_give_null(clip: ClipMetric, video) -> None:
    assert clip.score(video, None, "")["clip_score"] is None
    assert clip.score(video, None, "   ")["clip_score"] is None
    assert clip.score(video[:0], None, PROMPT)["clip_score"] is None
    assert clip.score(video, None, "")["clip_model"] == clip.fingerprint()


def test_fingerprint_follows_the_weights(tmp_path: Path, tiny_clip: Path) -> None:
    from farm.metrics.tiny_clip import write_tiny_clip

    base = _metric(tiny_clip).fingerprint()
    assert base.startswith("clip:tiny-clip@")
    assert _metric(write_tiny_clip(tmp_path / "tiny-clip", seed=0)).fingerprint() == base
    assert _metric(write_tiny_clip(tmp_path / "other" / "tiny-clip", seed=1)).fingerprint() != base


def test_a_folder_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or pytorch_model.bin.*preprocessor_config"):
        _metric(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _metric(tmp_path / "nowhere")
