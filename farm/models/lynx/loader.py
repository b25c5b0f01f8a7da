"""Load a Lynx checkpoint, unchanged, from the official on-disk layout (local folder or any fsspec URI).

Base: a ``Wan2.1-T2V-14B-Diffusers`` folder (``tokenizer/``, ``text_encoder/``, ``vae/``, ``transformer/``,
``scheduler/``). Adapter: ``resampler.safetensors`` + ``ip_layers.safetensors`` (+ ``ref_layers.safetensors`` for
full). The official loaders hard-code the 14B sizes; ours reads every size a tensor tells (resampler width, queries,
input and output widths, depth, feed-forward width, ID-adapter input width, bias, registers, number of ID layers)
and takes the rest (head split, ID-layer interval) from an optional ``lynx_adapter.json`` of ours in the adapter
folder, whose defaults are the official values; official checkpoints have no such file. One loader for real and
tiny checkpoints.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from farm.models.lynx.adapters import AdapterState, install_ip_adapter, install_ref_adapter
from farm.models.lynx.layout import (
    ADAPTER_CONFIG,
    IP_FILE,
    REF_FILE,
    RESAMPLER_FILE,
    VARIANTS,
    missing_base_files,
)
from farm.models.lynx.quiet import no_progress_bars
from farm.models.lynx.resampler import Resampler
from farm.models.lynx.weights import (
    LynxWeightsError,
    MissingWeightsFile,
    WrongKeyError,
    check_state_dict,
    local_dir,
    require_file,
)


@dataclass(frozen=True)
class AdapterConfig:
    """Adapter sizes. ``from_files`` fills the tensor-readable ones; the rest default to the official values."""

    variant: str = "full"
    resampler_dim: int = 1280
    resampler_depth: int = 4
    resampler_dim_head: int = 64
    resampler_heads: int = 20
    resampler_queries: int = 16
    resampler_ff_mult: int = 4
    embedding_dim: int = 512
    ip_dim: int = 5120  # resampler output = ID-adapter input (full 5120, lite 2048)
    ip_interval: int = 1  # full: every block; lite: every 2nd block
    ip_bias: bool = True  # full: with biases; lite: without
    ip_registers: int = 0
    ref_adapter: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def official(cls, variant: str) -> AdapterConfig:
        """The sizes the official loaders hard-code for the 14B checkpoints."""
        check_variant(variant)
        if variant == "lite":
            return cls(variant="lite", ip_dim=2048, ip_interval=2, ip_bias=False, ref_adapter=False)
        return cls(variant="full")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"Lynx variant {variant!r} is unknown; choose one of {VARIANTS}")
    return variant


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> LynxWeightsError:
    return LynxWeightsError(f"{path}: not a readable safetensors file ({exc}); download it again")


def read_adapter_config(adapter_dir: Path, variant: str) -> AdapterConfig:
    """Sizes from the tensors of the adapter files, the rest from ``lynx_adapter.json`` (or the official values)."""
    base = AdapterConfig.official(variant)
    overrides: dict[str, Any] = {}
    config_path = adapter_dir / ADAPTER_CONFIG
    if config_path.is_file():
        overrides = json.loads(config_path.read_text())
        unknown = sorted(set(overrides) - set(asdict(base)))
        if unknown:
            raise ValueError(f"{config_path}: unknown keys {unknown}; known: {sorted(asdict(base))}")
        if overrides.get("variant", variant) != variant:
            raise ValueError(f"{config_path} says variant={overrides['variant']!r} but {variant!r} was asked for")
    res_path = require_file(adapter_dir, RESAMPLER_FILE, "adapter")
    ip_path = require_file(adapter_dir, IP_FILE, "adapter")
    res = _shapes(res_path)
    ip = _shapes(ip_path)
    for key in ("latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"):
        if key not in res:
            raise WrongKeyError(str(res_path), [key], [], {key: ("?",)})
    if "0.to_k_ip.weight" not in ip:
        raise WrongKeyError(str(ip_path), ["0.to_k_ip.weight"], [], {"0.to_k_ip.weight": ("?",)})
    _, queries, dim = res["latents"]
    inner = res["layers.0.0.to_q.weight"][0]
    dim_head = int(overrides.get("resampler_dim_head", base.resampler_dim_head))
    read = dict(
        resampler_dim=dim,
        resampler_queries=queries,
        embedding_dim=res["proj_in.weight"][1],
        ip_dim=res["proj_out.weight"][0],
        resampler_depth=len({m.group(1) for k in res if (m := re.match(r"layers\.(\d+)\.", k))}),
        resampler_ff_mult=res["layers.0.1.1.weight"][0] // dim,
        resampler_dim_head=dim_head,
        resampler_heads=inner // dim_head,
        ip_bias="0.to_k_ip.bias" in ip,
        ip_registers=ip["0.registers"][1] if "0.registers" in ip else 0,
        ref_adapter=variant == "full",
    )
    # What the tensors say wins over the config file; the file only fills what tensors cannot tell.
    return AdapterConfig(**{**asdict(base), **overrides, **read})


@dataclass
class LynxModel:
    """Everything one generation needs, loaded once per replica."""

    variant: str
    config: AdapterConfig
    tokenizer: Any
    text_encoder: Any
    vae: Any
    transformer: Any
    scheduler: Any
    resampler: Resampler
    state: AdapterState
    dtype: torch.dtype
    device: torch.device
    base_dir: Path
    adapter_dir: Path

    def to(self, device: str | torch.device) -> LynxModel:
        self.device = torch.device(device)
        for module in (self.text_encoder, self.vae, self.transformer, self.resampler):
            module.to(self.device)
        return self


def _check_base(base_dir: Path) -> None:
    """The layout's rules (``layout.missing_base_files``, which ``farm validate`` applies too); first gap raised."""
    files = [p.relative_to(base_dir).as_posix() for p in base_dir.rglob("*") if p.is_file()]
    missing = missing_base_files(files)
    if missing:
        raise MissingWeightsFile(str(base_dir / missing[0].rstrip("/")), "base model")


def build_adapters(transformer, config: AdapterConfig, state: AdapterState):
    """Resampler, ID layers and Ref layers for ``transformer`` (installed on it), on whatever device it lives."""
    resampler = Resampler(
        dim=config.resampler_dim,
        depth=config.resampler_depth,
        dim_head=config.resampler_dim_head,
        heads=config.resampler_heads,
        num_queries=config.resampler_queries,
        embedding_dim=config.embedding_dim,
        output_dim=config.ip_dim,
        ff_mult=config.resampler_ff_mult,
    )
    ip_layers = install_ip_adapter(
        transformer,
        state,
        in_dim=config.ip_dim,
        interval=config.ip_interval,
        bias=config.ip_bias,
        n_registers=config.ip_registers,
        lite=config.variant == "lite",
    )
    ref_layers = install_ref_adapter(transformer, state) if config.ref_adapter else None
    return resampler, ip_layers, ref_layers


def expected_adapter_shapes(transformer, config: AdapterConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """file name -> key -> shape our loader expects (works on the meta device: nothing is allocated)."""
    resampler, ip_layers, ref_layers = build_adapters(transformer, config, AdapterState())
    out = {
        RESAMPLER_FILE: {k: tuple(v.shape) for k, v in resampler.state_dict().items()},
        IP_FILE: {k: tuple(v.shape) for k, v in ip_layers.state_dict().items()},
    }
    if ref_layers is not None:
        out[REF_FILE] = {k: tuple(v.shape) for k, v in ref_layers.state_dict().items()}
    return out


def _load_into(module: torch.nn.Module, path: Path) -> None:
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None
    check_state_dict(str(path), tensors, {k: tuple(v.shape) for k, v in module.state_dict().items()})
    module.load_state_dict(tensors, strict=True)


def load_lynx(
    base: str,
    adapter: str,
    variant: str = "full",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> LynxModel:
    """Load base + adapter (local paths or fsspec URIs; remote ones go through the node cache)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    check_variant(variant)
    base_dir = local_dir(base, storage_options)
    adapter_dir = local_dir(adapter, storage_options)
    _check_base(base_dir)
    config = read_adapter_config(adapter_dir, variant)
    if config.ref_adapter:
        require_file(adapter_dir, REF_FILE, "adapter")

    def part(name: str, load):
        try:
            return load(str(base_dir / name))
        except (ValueError, OSError, RuntimeError) as exc:  # diffusers/transformers name the tensor, not the file
            raise LynxWeightsError(f"{base_dir / name}: {exc}") from exc

    with no_progress_bars():
        tokenizer = part("tokenizer", AutoTokenizer.from_pretrained)
        text_encoder = part("text_encoder", lambda p: UMT5EncoderModel.from_pretrained(p, dtype=dtype).eval())
        vae = part("vae", lambda p: AutoencoderKLWan.from_pretrained(p, dtype=dtype).eval())
        transformer = part("transformer", lambda p: WanTransformer3DModel.from_pretrained(p, dtype=dtype).eval())
        scheduler = part("scheduler", UniPCMultistepScheduler.from_pretrained)
    if not scheduler.config.use_flow_sigmas:
        raise LynxWeightsError(f"{base_dir / 'scheduler'}: Lynx needs Wan's flow-sigma UniPC config (use_flow_sigmas)")

    state = AdapterState()
    resampler, ip_layers, ref_layers = build_adapters(transformer, config, state)
    _load_into(resampler, adapter_dir / RESAMPLER_FILE)
    _load_into(ip_layers, adapter_dir / IP_FILE)
    if ref_layers is not None:
        _load_into(ref_layers, adapter_dir / REF_FILE)
    # Adapters run in the model dtype (the official full loader forces the Ref-adapter to bf16; ours does not).
    for module in (resampler, ip_layers) + ((ref_layers,) if ref_layers is not None else ()):
        module.to(dtype)
    resampler.eval()
    for module in (text_encoder, vae, transformer, resampler):
        module.requires_grad_(False)
    model = LynxModel(
        variant=variant,
        config=config,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
        resampler=resampler,
        state=state,
        dtype=dtype,
        device=torch.device("cpu"),
        base_dir=base_dir,
        adapter_dir=adapter_dir,
    )
    return model.to(device)


def apply_cpu_offload(model: LynxModel, device: str | torch.device) -> LynxModel:
    """For GPUs under 80 GB: the text encoder stays on the CPU (prompt embeddings are cached anyway), VAE and
    resampler move to ``device``, and the transformer's blocks stream to ``device`` one at a time (diffusers group
    offloading; the adapter processors live inside the blocks and move with them). Same numbers, less memory."""
    device = torch.device(device)
    model.text_encoder.to("cpu")
    model.vae.to(device)
    model.resampler.to(device)
    model.transformer.to("cpu")
    model.transformer.enable_group_offload(
        onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    model.device = device
    return model
