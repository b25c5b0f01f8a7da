"""``clip``: CLIPScore between the prompt and the video's frames (prompt adherence, the "CLIP-T" of video papers).

``weights`` is a CLIP folder in transformers' layout (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, the tokenizer files and ``preprocessor_config.json``, e.g. a local copy of
``openai/clip-vit-large-patch14``), local or any fsspec URI (fetched once per node). ``clip_score`` is the mean over
``frames`` sampled frames of ``100 * max(cos(image, text), 0)``: CLIPScore as torchmetrics defines it (Hessel et al.
2021 weight the same clipped cosine by 2.5 instead of 100). Frames go through the folder's own preprocessing with the
PIL backend (bicubic resize and centre crop, as OpenAI's CLIP does); prompts longer than the text tower's 77 tokens
are truncated. An empty prompt gives null.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from farm.identity.faces import file_digest
from farm.metrics import Metric
from farm.metrics.sampling import sample_indices

DEFAULT_FRAMES = 16
SCALE = 100.0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
REQUIRED = ("config.json", "preprocessor_config.json")


def weights_file(folder: Path) -> Path:
    """The folder's weight file; a missing one is named with the files the folder does have."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    missing = [n for n in REQUIRED if not (folder / n).is_file()]
    present = sorted(p.name for p in folder.iterdir())[:12]
    raise FileNotFoundError(
        f"CLIP folder {str(folder)!r} has no {' or '.join(WEIGHT_FILES)}"
        + (f" (and no {', '.join(missing)})" if missing else "")
        + f"; it holds {present}. Point weights at a transformers CLIP folder (save_pretrained layout)"
    )


def image_processor(folder: Path):
    """The folder's preprocessing on PIL (CLIP's reference resize), whether or not torchvision is installed."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls.from_pretrained(str(folder), local_files_only=True)


class ClipMetric(Metric):
    """CLIPScore of the prompt against sampled frames with user-given CLIP weights."""

    name = "clip"
    device = "gpu"
    columns: ClassVar[dict[str, pa.DataType]] = {"clip_score": pa.float64(), "clip_model": pa.string()}

    def __init__(
        self, weights: str | None = None, frames: int = DEFAULT_FRAMES, storage_options: dict[str, Any] | None = None
    ) -> None:
        if not weights:
            raise ValueError("needs weights: a transformers CLIP folder (config.json, model.safetensors, tokenizer)")
        if int(frames) < 1:
            raise ValueError(f"frames={frames} must be at least 1 (frames sampled per video)")
        self.weights, self.frames, self.storage_options = weights, int(frames), storage_options
        self.model: Any = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()  # one forward at a time: replicas score in threads

    def setup(self, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPTokenizer

        from farm.models.lynx.weights import local_dir

        folder = local_dir(self.weights, self.storage_options)
        weights = weights_file(folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.processor = image_processor(folder)
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).float().to(device).eval()
        self.device_name = device
        name = Path(str(self.weights).rstrip("/")).name
        self._fingerprint = f"clip:{name}@{file_digest([folder / 'config.json', weights])}"

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            raise RuntimeError("the clip metric is not set up; call setup() before score()")
        return self._fingerprint

    def cosines(self, images: list[np.ndarray], prompt: str) -> np.ndarray:
        """Cosine of each image's CLIP embedding with the prompt's, float64 ``(len(images),)``."""
        import torch

        max_length = self.model.config.text_config.max_position_embeddings
        text = self.tokenizer([prompt], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with self._lock, torch.inference_mode():
            out = self.model(
                input_ids=text["input_ids"].to(self.device_name),
                attention_mask=text["attention_mask"].to(self.device_name),
                pixel_values=pixels.to(self.device_name, torch.float32),
            )
            image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            return (image @ txt.T)[:, 0].double().cpu().numpy()

    def score(self, frames: np.ndarray, portrait: np.ndarray | None, prompt: str) -> dict[str, Any]:
        out = self.empty()
        indices = sample_indices(len(frames), self.frames)
        if not (prompt or "").strip() or len(indices) == 0:
            return out
        if self.model is None:
            raise RuntimeError("the clip metric is not set up; call setup() before score()")
        cos = self.cosines([np.ascontiguousarray(frames[int(i)]) for i in indices], prompt)
        out["clip_score"] = float(np.mean(SCALE * np.clip(cos, 0.0, None)))
        return out
