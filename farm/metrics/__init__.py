"""Video metrics as plug-ins: one contract, one registry, one module per metric.

A ``Metric`` scores one video from its frames (uint8 ``(F, H, W, 3)``), the row's portrait (RGB uint8, or None) and
its prompt, and returns exactly the columns it declares. An input it needs but lacks (no portrait, no face, fewer
than 2 frames, an empty prompt) makes the affected columns null, never 0: a null says "not measured", a 0 would
say "measured and bad". Counts (``motion_pairs``, ``identity_facexlib_frames``) stay counts.

Job specs list metrics as entries like ``{"name": "motion", "frame_pairs": 16}``; ``build_metrics`` checks each entry
(unknown names and options get a did-you-mean) and constructs the metrics without loading weights; ``setup`` loads
them on the replica. The modules load lazily, so importing this package pulls in neither torch nor OpenCV.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from farm.config import SpecError, did_you_mean

# name -> "module:Class"; a metric module is imported only when a spec names it.
REGISTRY: dict[str, str] = {
    "identity": "farm.metrics.identity:IdentityMetric",
    "identity_facexlib": "farm.metrics.facexlib:FacexlibIdentityMetric",
    "motion": "farm.metrics.motion:MotionMetric",
    "clip": "farm.metrics.clip:ClipMetric",
}
DEVICES = ("cpu", "gpu")


class Metric(ABC):
    """One video metric. Subclasses set ``name``, ``columns`` and ``device`` and take their options as keywords."""

    name: ClassVar[str]
    columns: ClassVar[dict[str, pa.DataType]]  # every column ``score`` returns, with its Arrow type
    device: ClassVar[str] = "cpu"  # where it runs best: "cpu" or "gpu" (the runtime maps it onto resources)
    uses_portrait: ClassVar[bool] = False  # whether ``score`` reads the portrait (else the caller may pass None)
    weights: str | None = None  # what it loads (a file, folder or URI the user gives); None: nothing

    @property
    def model_column(self) -> str:
        """The column the fingerprint goes into."""
        return f"{self.name}_model"

    @abstractmethod
    def fingerprint(self) -> str:
        """Model name and weights digest (e.g. ``clip:ViT-B-32@1a2b3c4d5e6f``): the ``<name>_model`` column."""

    @abstractmethod
    def setup(self, device: str = "cpu") -> None:
        """Load the weights onto a torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``); called once per replica."""

    @abstractmethod
    def score(self, frames: np.ndarray, portrait: np.ndarray | None, prompt: str) -> dict[str, Any]:
        """Exactly ``columns`` for one video (nulls where an input is missing)."""

    def empty(self) -> dict[str, Any]:
        """Every column null (a video that could not be measured), the fingerprint excepted."""
        out: dict[str, Any] = dict.fromkeys(self.columns)
        if self.model_column in out:
            out[self.model_column] = self.fingerprint()
        return out


def check_frames(frames: np.ndarray) -> np.ndarray:
    """The contract's input: uint8 ``(F, H, W, 3)``; raise ``ValueError`` naming what was passed."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(
            f"metrics take uint8 frames (F, H, W, 3), got dtype={arr.dtype} shape={arr.shape}; "
            "decode with farm.video.decode_video"
        )
    return arr


def _metric_class(name: str) -> type[Metric]:
    if name not in REGISTRY:
        raise SpecError(f"unknown metric {name!r}{did_you_mean(name, REGISTRY)}; choose one of {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _options(cls: type[Metric]) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def build_metric(spec: Mapping[str, Any], storage_options: dict[str, Any] | None = None) -> Metric:
    """One metric from a spec entry ``{"name": ..., <option>: ...}`` (weights are not loaded yet)."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise SpecError(f"a metrics entry needs a name, e.g. {{'name': 'motion'}}; got {spec!r}")
    cls = _metric_class(str(spec["name"]))
    options = {k: v for k, v in spec.items() if k != "name"}
    allowed = _options(cls)
    for key in options:
        if key not in allowed or key == "storage_options":
            choices = [a for a in allowed if a != "storage_options"]
            raise SpecError(
                f"metric {spec['name']!r} has no option {key!r}{did_you_mean(key, choices)}; its options are {choices}"
            )
    if "storage_options" in allowed:
        options["storage_options"] = storage_options
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"metric {spec['name']!r}: {exc}") from exc


def build_metrics(specs: Iterable[Mapping[str, Any]], storage_options: dict[str, Any] | None = None) -> list[Metric]:
    """The job's ``metrics`` list as metrics, in order; two metrics may not write the same column."""
    metrics = [build_metric(spec, storage_options) for spec in specs]
    owner: dict[str, str] = {}
    for metric in metrics:
        for column in metric.columns:
            if column in owner:
                raise SpecError(
                    f"metrics {owner[column]!r} and {metric.name!r} both write column {column!r}; list each metric once"
                )
            owner[column] = metric.name
    return metrics


def metric_fields(metrics: Iterable[Metric]) -> list[pa.Field]:
    """The result-table fields the metrics write (for the schema)."""
    return [pa.field(name, dtype) for metric in metrics for name, dtype in metric.columns.items()]


def score_all(
    metrics: Iterable[Metric], frames: np.ndarray, portrait: np.ndarray | None, prompt: str
) -> dict[str, Any]:
    """Every metric's columns for one video; a metric returning other columns than it declares is a bug (raised)."""
    frames = check_frames(frames)
    out: dict[str, Any] = {}
    for metric in metrics:
        values = metric.score(frames, portrait, prompt)
        if set(values) != set(metric.columns):
            missing, extra = sorted(set(metric.columns) - set(values)), sorted(set(values) - set(metric.columns))
            raise RuntimeError(f"metric {metric.name!r} broke its contract: missing {missing}, undeclared {extra}")
        out.update(values)
    return out


__all__ = [
    "DEVICES",
    "REGISTRY",
    "Metric",
    "build_metric",
    "build_metrics",
    "check_frames",
    "metric_fields",
    "score_all",
]
