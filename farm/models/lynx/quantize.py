"""Opt-in weight/activation quantization of a replica's transformer (``options.quantize``; today only ``fp8``).

``fp8``: torchao's float8 dynamic quantization (``Float8DynamicActivationFloat8WeightConfig`` with per-row scales) of
the ``nn.Linear`` layers inside the transformer's repeated blocks (``transformer.blocks``: the attention
projections and the feed-forward, 10 per block, 400 in the 14B model). Each weight is stored as float8 (e4m3) with
one scale per output row; each activation is scaled per row and cast to float8 on the fly, and the product runs as
a scaled fp8 GEMM with bf16 output. Layers whose in/out features are not multiples of 16 (what fp8 GEMMs require)
are left alone, and so is everything outside the blocks (patch embedding, condition embedders, ``proj_out``) and
our adapters' branches inside them (``…processor.to_k_ip`` etc.: a few hundred tokens at most, nothing to gain,
and they carry the identity), which stay in bf16.

It CHANGES the numbers: an opt-in approximation, like ``step_cache``, so fidelity to the official code no longer
holds; ``benchmarks/bench_lynx_gpu.py`` reports its deviation from the default path on the same inputs.

Needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper: H100/H200, Blackwell), a bf16 transformer
(per-row scaling is bf16-only) and the ``torchao`` package on the workers (an optional dependency, imported only
here, lazily; tested with torchao 0.18.0). ``fp8_support`` says why a device cannot run it, in one line, so a job
fails before it loads 30 GB of weights on the wrong GPUs.

With ``compile``: quantize first, then compile. torchao's fp8 is fastest under ``torch.compile``, which fuses the
activations' amax, scale and cast into the neighbouring kernels; in eager mode those run as separate kernels and
eat much of the fp8 GEMM's gain. torchao's global inductor tuning (``set_inductor_config``) is not applied: it would
change process-wide settings for every later compile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANTIZE_MODES = ("fp8",)
FP8_MIN_CAPABILITY = (8, 9)  # Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)
FP8_ALIGNMENT = 16  # fp8 GEMMs (torch._scaled_mm) need both matrix dims divisible by 16
BLOCKS_PREFIX = "blocks."  # transformer.blocks: the repeated WanTransformerBlocks
ADAPTER_PART = ".processor."  # our ID/Ref adapters live in the attention processors (adapters.py)
FP8_NEEDS = "quantize: fp8 needs an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper: H100/H200)"
TORCHAO_NEEDED = "quantize: fp8 needs the torchao package on the workers (pip install torchao)"


def check_quantize(value: Any) -> str | None:
    """The quantization mode a job asks for: ``None`` (off: unset, ``none``, ``false``) or one of ``QUANTIZE_MODES``.

    Called when a job spec is validated, before anything loads."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        mode = value.strip().lower()
        if mode == "none":
            return None
        if mode in QUANTIZE_MODES:
            return mode
    choices = ", ".join(QUANTIZE_MODES)
    raise ValueError(f"lynx option quantize={value!r} is unknown; choose {choices} or none (off)")


def gpu_capability(device: torch.device) -> tuple[tuple[int, int], str]:
    """``((major, minor), name)`` of a CUDA device. Tests replace this to play a GPU on a CPU machine."""
    return tuple(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device)


def fp8_support(device: str | torch.device) -> str | None:
    """``None`` when ``quantize: fp8`` can run on ``device``; otherwise a one-line reason naming the device and fix."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{FP8_NEEDS}; this replica runs on {device}: drop quantize or run on such GPUs"
    try:
        (major, minor), name = gpu_capability(device)
    except (RuntimeError, AssertionError) as exc:  # no CUDA here, or no such device
        return f"{FP8_NEEDS}; {device} cannot be queried here ({_first_line(exc)}): drop quantize or use such GPUs"
    if (major, minor) < FP8_MIN_CAPABILITY:
        return f"{FP8_NEEDS}; {device} is {name} (compute capability {major}.{minor}): drop quantize or use such GPUs"
    return torchao_problem()


def torchao_problem() -> str | None:
    """``None`` when torchao's float8 API imports; otherwise why not, with the fix."""
    try:
        _fp8_api()
    except Exception as exc:  # ImportError, or whatever a torchao built for another torch raises while importing
        return f"{TORCHAO_NEEDED}; importing it failed here: {_first_line(exc)}"
    return None


def fp8_layer_filter(module: nn.Module, fqn: str) -> bool:
    """Whether the layer named ``fqn`` (relative to the transformer) is quantized to fp8: a ``nn.Linear`` of the
    repeated blocks, not an adapter's, with in and out features that fp8 GEMMs accept."""
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith(BLOCKS_PREFIX)
        and ADAPTER_PART not in f".{fqn}."
        and module.in_features % FP8_ALIGNMENT == 0
        and module.out_features % FP8_ALIGNMENT == 0
    )


def fp8_layers(transformer: nn.Module) -> dict[str, nn.Linear]:
    """The layers ``fp8_layer_filter`` selects, by name."""
    return {name: module for name, module in transformer.named_modules() if fp8_layer_filter(module, name)}


def quantize_transformer(transformer: nn.Module, mode: str | None, device: str | torch.device) -> int:
    """Quantize ``transformer`` in place as ``mode`` says (``None``: nothing); returns how many layers were quantized.

    Call it once the weights (adapters included) are loaded and on ``device``, and before ``compile``. Raises
    ``RuntimeError`` with ``fp8_support``'s reason when ``device`` cannot run it."""
    if check_quantize(mode) is None:
        return 0
    reason = fp8_support(device)
    if reason is not None:
        raise RuntimeError(reason)
    return apply_fp8(transformer)


def apply_fp8(transformer: nn.Module) -> int:
    """torchao fp8 (dynamic activations, per-row scales) on the layers ``fp8_layer_filter`` selects, with no device
    check (``quantize_transformer`` makes it); returns how many layers now hold fp8 weights."""
    _require_bf16(fp8_layers(transformer))
    quantize_, Float8Config, PerRow = _fp8_api()
    config = Float8Config(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=fp8_layer_filter)
    return sum(_holds_fp8(module) for module in transformer.modules())


def _require_bf16(layers: dict[str, nn.Linear]) -> None:
    for name, layer in layers.items():
        if layer.weight.dtype != torch.bfloat16:
            raise RuntimeError(
                f"quantize: fp8 scales per row and needs a bfloat16 transformer; {name} is {layer.weight.dtype}: "
                "use dtype bf16 (auto is bf16 on GPUs) or drop quantize"
            )


def _holds_fp8(module: nn.Module) -> bool:
    qdata = getattr(getattr(module, "weight", None), "qdata", None)  # torchao's Float8Tensor keeps its fp8 data here
    return isinstance(module, nn.Linear) and qdata is not None and qdata.dtype == torch.float8_e4m3fn


def _fp8_api():
    """torchao's ``quantize_``, ``Float8DynamicActivationFloat8WeightConfig`` and ``PerRow`` (imported lazily)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    return quantize_, Float8DynamicActivationFloat8WeightConfig, PerRow


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
