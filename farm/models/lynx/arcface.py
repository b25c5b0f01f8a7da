"""The face embedder the official Lynx inference uses: facexlib's IR-SE50 ArcFace (``recognition_arcface_ir_se50.pth``).

Lynx's resampler was trained on this network's L2-normalised 512-d output, so identity conditioning is only faithful
with it (the insightface pack's ArcFace is another network with ~20x the scale). This is our own module with the
same math and parameter names as the official one, so the official plain-torch state dict loads with every key and
shape checked:

    input_layer  Conv3x3(3, w0) -> BN -> PReLU
    body         units of [BN -> Conv3x3 -> PReLU -> Conv3x3 (stride) -> BN -> SE] + shortcut (MaxPool 1x1 when the
                 width is kept, else Conv1x1 + BN); each stage's first unit has stride 2
    output_layer BN2d -> Dropout -> Flatten -> Linear(w3 * 7 * 7, 512) -> BN1d, then L2 norm

Sizes are configurable (the official [3, 4, 14, 3] units x [64, 128, 256, 512] widths are the default) so the tiny
checkpoint can carry a small random file in the same key layout; the official file has no config, so
``load_irse50`` reads the architecture off the state dict and one loader serves both.

Preprocessing is the official one: insightface's 112 ``norm_crop`` of the 5 keypoints, ``[0, 1]`` then ``[-1, 1]``,
channels swapped to BGR, fp32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from farm.identity.faces import ARCFACE_TEMPLATE, Face, FaceEmbedder, check_image, file_digest, similarity_transform
from farm.models.lynx.weights import LynxWeightsError, check_state_dict, local_file

ARCFACE_FILE = "recognition_arcface_ir_se50.pth"
INPUT_SIZE = 112
EMBED_DIM = 512
SE_REDUCTION = 16
DROP_RATIO = 0.6  # facexlib builds Backbone(50, 0.6, 'ir_se'); dropout is off in eval anyway
BN_COUNTER = "num_batches_tracked"  # BatchNorm's step counter: old checkpoints lack it and it never affects outputs


@dataclass(frozen=True)
class IRSEConfig:
    """Units per stage and stage widths (the stem has the first stage's width, as in the official network)."""

    units: tuple[int, ...] = (3, 4, 14, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    embed_dim: int = EMBED_DIM

    def __post_init__(self) -> None:
        if len(self.units) != len(self.widths) or not self.units or min(self.units) < 1:
            raise ValueError(f"IR-SE needs one unit count >= 1 per stage width, got {self.units} and {self.widths}")
        if min(self.widths) < SE_REDUCTION:
            raise ValueError(f"widths {self.widths} must be >= {SE_REDUCTION} (the SE blocks divide by {SE_REDUCTION})")
        if any(b <= a for a, b in zip(self.widths, self.widths[1:], strict=False)):
            # The state dict only shows a stage boundary where a 1x1 shortcut changes the width.
            raise ValueError(f"widths {self.widths} must increase stage by stage")
        if INPUT_SIZE % (2 ** len(self.units)):
            raise ValueError(f"{len(self.units)} stride-2 stages do not divide the {INPUT_SIZE} px input")

    @property
    def final_size(self) -> int:
        return INPUT_SIZE // 2 ** len(self.units)


OFFICIAL = IRSEConfig()
TINY = IRSEConfig(units=(1, 2, 1, 1), widths=(16, 20, 24, 32))


class SqueezeExcite(nn.Module):
    """Channel gate: global average -> 1x1 down (w/16) -> ReLU -> 1x1 up -> sigmoid, times the input."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class IRSEUnit(nn.Module):
    """A pre-activation residual unit with a squeeze-excite gate (``res_layer`` + ``shortcut_layer``)."""

    def __init__(self, in_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)  # a strided subsample, no parameters
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SqueezeExcite(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE(nn.Module):
    """IR-SE ArcFace backbone: (N, 3, 112, 112) BGR in [-1, 1] -> (N, 512) unit vectors."""

    def __init__(self, config: IRSEConfig = OFFICIAL, drop_ratio: float = DROP_RATIO) -> None:
        super().__init__()
        self.config = config
        stem, last = config.widths[0], config.widths[-1]
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem))
        # Registered before the body, as in the official network: the state dict lists keys in the same order.
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(last),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(last * config.final_size**2, config.embed_dim),
            nn.BatchNorm1d(config.embed_dim),
        )
        units = []
        in_channels = stem
        for count, depth in zip(config.units, config.widths, strict=True):
            for index in range(count):
                units.append(IRSEUnit(in_channels, depth, 2 if index == 0 else 1))
                in_channels = depth
        self.body = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return x / torch.norm(x, 2, 1, True)


def infer_config(path: str, tensors: dict[str, torch.Tensor]) -> IRSEConfig:
    """Read units per stage and widths off an IR-SE state dict (a stage starts where a 1x1 shortcut appears)."""
    indices = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"body\.(\d+)\.", k))})
    if not indices or indices != list(range(len(indices))):
        raise LynxWeightsError(
            f"{path}: no consecutive body.<i>.* units (found {indices[:8]}); is this an IR-SE50 ArcFace state dict "
            f"like {ARCFACE_FILE}?"
        )
    units: list[int] = []
    widths: list[int] = []
    for i in indices:
        key = f"body.{i}.res_layer.1.weight"
        if key not in tensors or tensors[key].ndim != 4:
            raise LynxWeightsError(f"{path}: tensor {key!r} (a unit's first 3x3 conv, (depth, in, 3, 3)) is missing")
        if i == 0 or f"body.{i}.shortcut_layer.0.weight" in tensors:
            units.append(0)
            widths.append(int(tensors[key].shape[0]))
        units[-1] += 1
    embed = tensors.get("output_layer.3.weight")
    embed_dim = int(embed.shape[0]) if embed is not None and embed.ndim == 2 else EMBED_DIM
    try:
        return IRSEConfig(units=tuple(units), widths=tuple(widths), embed_dim=embed_dim)
    except ValueError as exc:
        raise LynxWeightsError(f"{path}: the state dict describes no valid IR-SE network: {exc}") from None


def load_irse50(
    path_or_uri: str, storage_options: dict[str, Any] | None = None, device: str = "cpu"
) -> tuple[IRSE, Path]:
    """Load an IR-SE ArcFace ``.pth`` (local path or fsspec URI, remote files cached once per node).

    The architecture is inferred from the file, then every key and shape is checked (``WrongKeyError`` /
    ``WrongShapeError`` name the file, the tensor and the expected shape). The embedding must be 512-d: Lynx's
    resampler takes nothing else. Returns the eval-mode fp32 module and the local file.
    """
    local = local_file(path_or_uri, storage_options, role="arcface")
    try:
        tensors = torch.load(str(local), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or non-torch file
        raise LynxWeightsError(f"{local}: not a readable torch state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise LynxWeightsError(f"{local}: expected a plain state dict of tensors (as {ARCFACE_FILE} is)")
    config = infer_config(str(local), tensors)
    config = IRSEConfig(units=config.units, widths=config.widths)  # embed_dim is always 512: checked as a shape
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in IRSE(config).state_dict().items()}
    required = {k: s for k, s in expected.items() if not k.endswith(BN_COUNTER)}
    check_state_dict(str(local), {k: v for k, v in tensors.items() if not k.endswith(BN_COUNTER)}, required)
    module = IRSE(config)
    state = module.state_dict()
    state.update({k: v for k, v in tensors.items() if k in expected})
    module.load_state_dict(state, strict=True)
    return module.to(device=device, dtype=torch.float32).eval().requires_grad_(False), local


def official_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """scikit-image's estimator on the float32 points, as the official code calls it (bit-identical matrix).

    Lives here, under the embedder's crop; ``face.py``'s reference crop uses it too (face -> arcface, one way)."""
    try:
        from skimage.transform import SimilarityTransform
    except ImportError:  # pragma: no cover - scikit-image is a dependency; keep working without it
        return similarity_transform(src.astype(np.float64), dst.astype(np.float64))
    if hasattr(SimilarityTransform, "from_estimate"):
        return np.asarray(SimilarityTransform.from_estimate(src, dst).params[0:2, :])
    tform = SimilarityTransform()
    tform.estimate(src, dst)
    return tform.params[0:2, :]


def arcface_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """insightface's ``norm_crop`` at the official precision (float32 template, scikit-image's estimator): the
    embedder's input, bit-identical to what the official ``FaceEncoderArcFace`` feeds its network."""
    if size % 112 != 0:
        raise ValueError(f"the ArcFace crop size must be a multiple of 112, got {size}")
    dst = ARCFACE_TEMPLATE.astype(np.float32) * np.float32(size / 112.0)
    matrix = official_similarity(np.asarray(kps, dtype=np.float32), dst)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), borderValue=0.0)


def preprocess(crop_rgb_uint8: np.ndarray) -> torch.Tensor:
    """The official input: a 112 RGB uint8 crop -> (1, 3, 112, 112) fp32, ``x / 255`` then ``(x - 0.5) / 0.5``
    (the order ToTensor and Normalize apply), channels swapped to BGR."""
    x = torch.from_numpy(np.ascontiguousarray(crop_rgb_uint8)).permute(2, 0, 1).contiguous().to(torch.float32)
    x = x.div(255).sub(0.5).div(0.5)
    return x.unsqueeze(0)[:, [2, 1, 0]].contiguous()


class IRSE50Embedder(FaceEmbedder):
    """The official Lynx face embedder on our module: unit float32 (512,) per face."""

    name = "arcface-irse50"
    dim = EMBED_DIM

    def __init__(self, model: IRSE, weights_file: Path, device: str = "cpu") -> None:
        self.model = model
        self.device = device
        self._fingerprint = file_digest([weights_file])

    def fingerprint(self) -> str:
        return self._fingerprint

    def embed(self, image_rgb_uint8: np.ndarray, face: Face) -> np.ndarray:
        crop = arcface_crop(check_image(image_rgb_uint8), face.kps)
        with torch.inference_mode():
            out = self.model(preprocess(crop).to(self.device))
        return out[0].float().cpu().numpy()


@lru_cache(maxsize=2)
def irse50_embedder(path_or_uri: str, storage_options_json: str | None = None, device: str = "cpu") -> IRSE50Embedder:
    """One embedder per file per process (storage options come as JSON so the call can be cached)."""
    import json

    options = json.loads(storage_options_json) if storage_options_json else None
    model, local = load_irse50(path_or_uri, options, device)
    return IRSE50Embedder(model, local, device)


def _randomize(module: IRSE, seed: int) -> None:
    """Deterministic non-trivial weights, BatchNorm statistics included (so eval-mode BN is not the identity)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 77]).generate_state(1)[0]))
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            leaf = name.rsplit(".", 1)[1]
            if leaf == BN_COUNTER:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if isinstance(owner, nn.BatchNorm1d | nn.BatchNorm2d):
                values = {
                    "weight": 1.0 + 0.1 * noise,
                    "bias": 0.1 * noise,
                    "running_mean": 0.1 * noise,
                    "running_var": 0.75 + 0.5 * torch.rand(tensor.shape, generator=gen),
                }[leaf]
            elif isinstance(owner, nn.PReLU):
                values = 0.25 + 0.05 * noise
            else:
                fan_in = tensor[0].numel() if tensor.ndim > 1 else tensor.shape[0]
                values = noise / max(fan_in, 1) ** 0.5
            tensor.copy_(values)


def write_tiny_irse50(path: str | Path, seed: int = 0, config: IRSEConfig = TINY) -> Path:
    """A random-weight IR-SE file in the official key layout (the real one is ~170 MB); same seed, same bytes."""
    module = IRSE(config)
    _randomize(module, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path
