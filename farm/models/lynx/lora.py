"""LoRAs on the Wan transformer under Lynx (``model.weights.lora: [{path, scale, fuse}]``): read a ``.safetensors``
LoRA in any common key layout (``lora_keys.py``), check it against the loaded transformer, and apply it once per
replica, after the weights load and before anything runs (so the Ref-adapter's reference pass sees it too).

Each low-rank pair changes a layer's weight by ``scale * alpha / rank * up @ down`` (rsLoRA: ``alpha / sqrt(rank)``);
``alpha`` comes from the file's ``.alpha`` entries, else the diffusers/PEFT metadata (``lora_alpha``,
``alpha_pattern``, ``use_rslora``), else it equals the rank. ``.diff`` (a whole weight delta) and ``.diff_b`` /
``lora_B.bias`` (a bias delta) are added times ``scale``.

* ``fuse: true`` (default): the update is merged into the weights in float32 and cast back: no cost per step.
* ``fuse: false``: each linear layer keeps its base weight and runs the low-rank pair beside it (two thin matmuls
  per layer and step): the base weights stay bit-exact. Whole-weight and bias deltas, and pairs on non-linear
  layers (the patch embedding), are always merged.

``scale: 0`` leaves the model as it was. Several LoRAs apply in the order listed. Remote files come through the
node's verified cache (``weights.local_file``), once per node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from farm.models.lynx.lora_keys import LoraKeyError, map_keys
from farm.models.lynx.weights import LynxWeightsError, local_file, safetensors_header

log = logging.getLogger("farm")
METADATA_KEY = "lora_adapter_metadata"  # where diffusers and PEFT write the adapter config (alpha, rank)


class LoraError(LynxWeightsError):
    """A LoRA file that cannot apply to this transformer; the message names the file, the layer and the fix."""


@dataclass
class LoraLayer:
    """Everything one file holds for one layer (or parameter) of the transformer."""

    target: str
    down: torch.Tensor | None = None  # (rank, in ...)
    up: torch.Tensor | None = None  # (out, rank ...)
    alpha: float | None = None
    bias: torch.Tensor | None = None  # (out,)
    diff: torch.Tensor | None = None  # the weight's shape

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down is not None else 0


@dataclass
class Lora:
    """A LoRA file mapped onto the transformer's layers (tensors on the CPU, as stored)."""

    path: str
    layout: str
    layers: dict[str, LoraLayer]
    config: dict[str, Any] = field(default_factory=dict)  # the diffusers/PEFT adapter metadata, if any

    def scaling(self, layer: LoraLayer) -> float:
        """``alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``) of one layer's pair."""
        alpha = layer.alpha
        if alpha is None:
            alpha = _pattern_value(self.config.get("alpha_pattern"), layer.target)
        if alpha is None:
            alpha = self.config.get("lora_alpha")
        if alpha is None:
            return 1.0
        rank = layer.rank
        return float(alpha) / (math.sqrt(rank) if self.config.get("use_rslora") else rank)


def _pattern_value(patterns: Any, target: str) -> float | None:
    """PEFT's ``alpha_pattern``: a key matches a layer whose name ends with it (or matches it as a regex)."""
    for pattern, value in (patterns or {}).items():
        name = pattern.removeprefix("transformer.")
        if target == name or target.endswith("." + name) or re.fullmatch(name, target):
            return float(value)
    return None


def _adapter_config(metadata: dict[str, str] | None) -> dict[str, Any]:
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    # diffusers' pipelines prefix the transformer's config keys with "transformer."
    return {k.removeprefix("transformer."): v for k, v in data.items()} if isinstance(data, dict) else {}


def read_lora(path: str | Path, num_blocks: int) -> Lora:
    """Read a LoRA file and map every key onto a transformer of ``num_blocks`` blocks (``LoraError`` if not)."""
    where = str(path)
    if not where.endswith(".safetensors"):
        raise LoraError(f"LoRA {where!r}: only .safetensors LoRA files are read (pickled .pt/.ckpt files can run code)")
    try:
        with safe_open(where, framework="pt") as fh:
            keys, metadata = list(fh.keys()), fh.metadata()
            tensors = {key: fh.get_tensor(key) for key in keys}
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise LoraError(f"LoRA {where!r} does not exist; check model.weights.lora") from None
        raise LoraError(f"LoRA {where!r} is not a readable safetensors file ({exc}); download it again") from None
    try:
        layout, mapped = map_keys(keys, num_blocks, where=f"LoRA {where!r}")
    except LoraKeyError as exc:
        raise LoraError(str(exc)) from None
    layers: dict[str, LoraLayer] = {}
    for entry in mapped:
        layer = layers.setdefault(entry.target, LoraLayer(entry.target))
        value = tensors[entry.key]
        if entry.part == "alpha":
            layer.alpha = float(value.float().reshape(-1)[0])
        else:
            setattr(layer, entry.part, value)
    lora = Lora(where, layout, layers, _adapter_config(metadata))
    for layer in layers.values():
        _check_pair(lora, layer)
    return lora


def _check_pair(lora: Lora, layer: LoraLayer) -> None:
    if (layer.down is None) != (layer.up is None):
        have, missing = ("down", "up") if layer.down is not None else ("up", "down")
        raise LoraError(f"LoRA {lora.path!r}: layer {layer.target} has a {have} matrix but no {missing} matrix")
    if layer.down is not None and layer.up.shape[1] != layer.rank:
        raise LoraError(
            f"LoRA {lora.path!r}: layer {layer.target} has rank {layer.rank} down but an up matrix of shape "
            f"{tuple(layer.up.shape)}"
        )


# ------------------------------------------------------------------ applying
def _weight_of(lora: Lora, transformer: torch.nn.Module, target: str):
    """(module, the parameter a LoRA changes): a layer's weight, or a parameter such as ``scale_shift_table``."""
    try:
        module = transformer.get_submodule(target)
    except AttributeError:
        try:
            return None, transformer.get_parameter(target)
        except AttributeError:
            raise LoraError(f"LoRA {lora.path!r}: the transformer has no layer {target!r}") from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        raise LoraError(
            f"LoRA {lora.path!r}: layer {target!r} ({type(module).__name__}) has no weight a LoRA could change"
        )
    return module, weight


def _check_pair_fits(lora: Lora, layer: LoraLayer, weight: torch.Tensor) -> None:
    """The pair's ``up @ down`` has the weight's shape (a linear layer, or a convolution's flattened kernel)."""
    out, rank = weight.shape[0], layer.rank
    fits_out = layer.up.shape[0] == out and math.prod(layer.up.shape) == out * rank
    if not fits_out or math.prod(layer.down.shape) // rank * out != weight.numel():
        raise LoraError(
            f"LoRA {lora.path!r}: layer {layer.target} is {tuple(weight.shape)} in this transformer, the LoRA pair "
            f"is {tuple(layer.up.shape)} @ {tuple(layer.down.shape)}: a LoRA for another Wan size?"
        )


def _pair_delta(lora: Lora, layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """``alpha / rank * up @ down`` in float32 on the weight's device, in the weight's shape."""
    up = layer.up.to(weight.device, torch.float32).reshape(weight.shape[0], layer.rank)
    down = layer.down.to(weight.device, torch.float32).reshape(layer.rank, -1)
    return (up @ down).reshape(weight.shape) * lora.scaling(layer)


def _add(param: torch.Tensor, delta: torch.Tensor) -> None:
    """``param += delta`` computed in float32 and cast back to the parameter's dtype (shapes checked beforehand)."""
    with torch.no_grad():
        param.copy_((param.float() + delta.to(param.device, torch.float32)).to(param.dtype))


class LowRankSide(torch.nn.Module):
    """An unfused LoRA pair beside a linear layer: ``scaling * up(down(x))`` added to its output."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scaling: float, like: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("down", down.to(like.device, like.dtype).contiguous())
        self.register_buffer("up", up.to(like.device, like.dtype).contiguous())
        self.scaling = float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.down), self.up) * self.scaling


def _add_side_paths(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    for side in module.lora_sides:
        output = output + side(inputs[0])
    return output


def _attach_side(module: torch.nn.Linear, side: LowRankSide) -> None:
    if not hasattr(module, "lora_sides"):
        module.lora_sides = torch.nn.ModuleList()
        module.register_forward_hook(_add_side_paths)
    module.lora_sides.append(side)


def apply_lora(transformer: torch.nn.Module, lora: Lora, scale: float = 1.0, fuse: bool = True) -> int:
    """Change ``transformer`` by ``lora`` times ``scale``; returns the number of layers changed. Every entry is
    checked against the transformer first: a file that cannot apply changes nothing."""
    checked = []
    for layer in lora.layers.values():
        module, weight = _weight_of(lora, transformer, layer.target)
        _check_layer(lora, layer, module, weight)
        checked.append((layer, module, weight))
    for layer, module, weight in checked:
        _apply_layer(lora, layer, module, weight, float(scale), fuse)
    return len(checked)


def _check_layer(lora: Lora, layer: LoraLayer, module, weight: torch.Tensor) -> None:
    where = f"LoRA {lora.path!r}: {layer.target}"
    if layer.down is not None:
        _check_pair_fits(lora, layer, weight)
    if layer.diff is not None and tuple(layer.diff.shape) != tuple(weight.shape):
        shapes = f"{tuple(layer.diff.shape)}, the weight is {tuple(weight.shape)}"
        raise LoraError(f"{where}: a weight delta of shape {shapes}")
    if layer.bias is not None:
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.nn.Parameter):
            raise LoraError(f"{where} carries a bias delta but the layer has no bias")
        if tuple(layer.bias.shape) != tuple(bias.shape):
            shapes = f"{tuple(layer.bias.shape)}, the bias is {tuple(bias.shape)}"
            raise LoraError(f"{where}: a bias delta of shape {shapes}")


def _apply_layer(lora, layer: LoraLayer, module, weight, scale: float, fuse: bool) -> None:
    if layer.down is not None:
        if fuse or not isinstance(module, torch.nn.Linear):
            _add(weight, _pair_delta(lora, layer, weight) * scale)
        elif scale != 0.0:
            _attach_side(module, LowRankSide(layer.down, layer.up, lora.scaling(layer) * scale, weight))
    if layer.diff is not None:
        _add(weight, layer.diff.float() * scale)
    if layer.bias is not None:
        _add(module.bias, layer.bias.float() * scale)


def file_fingerprint(path: str | Path) -> str:
    """A digest of a safetensors file's header (names, shapes, dtypes, offsets, metadata) and size."""
    path = Path(path)
    return hashlib.sha256(safetensors_header(path) + str(path.stat().st_size).encode()).hexdigest()[:16]


def load_loras(transformer: torch.nn.Module, entries, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Apply every ``LoraSpec`` of ``entries`` in order; returns one line per LoRA for the replica's log."""
    lines = []
    blocks = len(transformer.blocks)
    for index, entry in enumerate(entries):
        path = local_file(entry.path, storage_options, role=f"weights.lora[{index}]")
        lora = read_lora(path, blocks)
        changed = apply_lora(transformer, lora, entry.scale, entry.fuse)
        how = "fused" if entry.fuse else "unfused"
        lines.append(f"LoRA {entry.path} ({lora.layout} keys): {changed} layers, scale {entry.scale:g}, {how}")
        log.info("lynx: %s", lines[-1])
    return lines
