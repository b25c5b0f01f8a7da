"""``quantize: fp8`` (farm.models.lynx.quantize): the option's validation, the device check (GPUs played on a CPU
by replacing ``gpu_capability``), the choice of layers on a tiny real Wan transformer, and, where torchao is
installed, the quantization itself run on the CPU."""

from __future__ import annotations

import sys

import pytest
import torch
from diffusers import WanTransformer3DModel

from farm.models.lynx import quantize
from farm.models.lynx.adapters import AdapterState, install_ref_adapter
from farm.models.lynx.quantize import (
    QUANTIZE_MODES,
    apply_fp8,
    check_quantize,
    fp8_layer_filter,
    fp8_layers,
    fp8_support,
    quantize_transformer,
)

DIM = 32  # 2 heads x 16
FFN_DIM = 40  # not a multiple of 16: the feed-forward layers stay out of fp8
ATTENTION_LINEARS = 8  # per block: to_q, to_k, to_v, to_out.0 of the self- and the cross-attention
LAYERS = 2


def tiny_transformer(dtype: torch.dtype = torch.bfloat16) -> WanTransformer3DModel:
    """A 2-block Wan transformer with a Ref adapter on each self-attention (the adapter's layers sit in the blocks)."""
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=DIM // 2,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=FFN_DIM,
        num_layers=LAYERS,
        rope_max_seq_len=32,
    )
    install_ref_adapter(transformer, AdapterState())
    return transformer.to(dtype).eval()


def play_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(quantize, "gpu_capability", lambda device: (capability, name))


def hide_torchao(monkeypatch) -> None:
    for name in ("torchao", "torchao.quantization"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import raises ImportError


@pytest.mark.parametrize(
    ("value", "mode"), [(None, None), (False, None), ("none", None), ("None", None), ("fp8", "fp8"), (" FP8 ", "fp8")]
)
def test_check_quantize_normalises(value, mode):
    assert check_quantize(value) == mode


@pytest.mark.parametrize("value", ["int8", "fp4", True, 8, ""])
def test_check_quantize_rejects_naming_value_and_choices(value):
    with pytest.raises(ValueError) as info:
        check_quantize(value)
    assert repr(value) in str(info.value)
    assert all(mode in str(info.value) for mode in QUANTIZE_MODES)


def test_fp8_support_says_cpu_cannot():
    reason = fp8_support("cpu")
    assert "cpu" in reason and "8.9" in reason and "\n" not in reason


def test_fp8_support_names_a_gpu_too_old(monkeypatch):
    play_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    reason = fp8_support("cuda:0")
    assert "cuda:0" in reason and "NVIDIA A100-SXM4-80GB" in reason and "8.0" in reason
    assert "drop quantize" in reason


def test_fp8_support_needs_torchao(monkeypatch):
    play_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    hide_torchao(monkeypatch)
    reason = fp8_support("cuda:0")
    assert "torchao" in reason and "pip install torchao" in reason


def test_fp8_support_on_hopper_with_torchao(monkeypatch):
    play_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(quantize, "_fp8_api", lambda: (None, None, None))  # torchao present, installed or not here
    assert fp8_support("cuda:0") is None
    assert fp8_support(torch.device("cuda", 1)) is None


def test_layer_filter_takes_block_linears_with_fp8_sizes_only():
    transformer = tiny_transformer()
    chosen = fp8_layers(transformer)
    assert len(chosen) == LAYERS * ATTENTION_LINEARS
    assert all(name.startswith("blocks.") and ".attn" in name for name in chosen)
    modules = dict(transformer.named_modules())
    # outside the blocks: skipped whatever their sizes (all multiples of 16 here)
    for name in ("proj_out", "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1"):
        assert modules[name].in_features % 16 == 0 and not fp8_layer_filter(modules[name], name)
    # in the blocks: the adapters' branches, and the feed-forward (40 features) are skipped
    for name in ("blocks.0.attn1.processor.to_k_ref", "blocks.1.ffn.net.0.proj", "blocks.1.ffn.net.2"):
        assert not fp8_layer_filter(modules[name], name)
    assert not fp8_layer_filter(modules["blocks.0.norm2"], "blocks.0.norm2")


def test_quantize_transformer_off_changes_nothing():
    transformer = tiny_transformer()
    weight = transformer.blocks[0].attn1.to_q.weight
    assert quantize_transformer(transformer, None, "cpu") == 0
    assert quantize_transformer(transformer, "none", "cuda:0") == 0
    assert transformer.blocks[0].attn1.to_q.weight is weight


def test_quantize_transformer_refuses_cpu():
    with pytest.raises(RuntimeError, match="this replica runs on cpu"):
        quantize_transformer(tiny_transformer(), "fp8", "cpu")


def test_quantize_transformer_refuses_an_a100(monkeypatch):
    play_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match="A100"):
        quantize_transformer(tiny_transformer(), "fp8", "cuda:0")


def test_fp8_needs_a_bf16_transformer():
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn1\.to_q is torch\.float32"):
        apply_fp8(tiny_transformer(torch.float32))


def test_fp8_on_cpu_stays_close(monkeypatch):
    """The real torchao fp8 path on the CPU: torchao refuses CPUs in ``_check_hardware_support`` (an assert on the
    CUDA capability), but with that bypassed its fp8 quantization and ``torch._scaled_mm`` run on CPU tensors."""
    pytest.importorskip("torchao")
    from torchao.quantization import quant_api

    if not hasattr(quant_api, "_check_hardware_support"):
        pytest.skip("this torchao checks the hardware elsewhere; the CPU run needs that check bypassed")
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(quantize, "fp8_support", lambda device: None)
    transformer = tiny_transformer()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 3, 8, 8, generator=generator).bfloat16()
    text = torch.randn(1, 8, 32, generator=generator).bfloat16()
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        before = transformer(latents, timestep, text, return_dict=False)[0].float()
        assert quantize_transformer(transformer, "fp8", "cpu") == LAYERS * ATTENTION_LINEARS
        after = transformer(latents, timestep, text, return_dict=False)[0].float()
    assert transformer.blocks[0].attn1.to_q.weight.qdata.dtype == torch.float8_e4m3fn
    assert transformer.blocks[0].ffn.net[2].weight.dtype == torch.bfloat16  # skipped: 40 features
    assert transformer.proj_out.weight.dtype == torch.bfloat16  # outside the blocks
    # Measured (torchao 0.18.0, torch 2.13.0 CPU): max |delta| 0.023, mean 0.0045, against a mean |output| of 0.49.
    delta = (after - before).abs()
    assert 0 < delta.mean() < 0.02 and delta.max() < 0.1


# ------------------------------------------------------------------ the backend's option
def lynx_spec(dtype: str = "auto", **options):
    from farm.types import ModelSpec
    from tests.models.lynx_helpers import adapter_dir, base_dir

    weights = {"base": base_dir(), "adapter": adapter_dir("full")}
    return ModelSpec(backend="lynx", variant="full", weights=weights, dtype=dtype, options=options)


def test_the_backend_checks_quantize_when_the_job_is_read():
    from farm.models.lynx.backend import LynxBackend

    assert LynxBackend(lynx_spec(quantize="FP8")).quantize == "fp8"
    with pytest.raises(ValueError, match="quantize='int3'"):
        LynxBackend(lynx_spec(quantize="int3"))
    with pytest.raises(ValueError, match="needs dtype bf16"):
        LynxBackend(lynx_spec("fp32", quantize="fp8"))
    # it shapes videos: a run that turns it on does not silently reuse committed rows
    assert LynxBackend(lynx_spec(quantize="fp8")).output_config() != LynxBackend(lynx_spec()).output_config()


def test_a_replica_that_cannot_run_fp8_fails_before_loading_weights(monkeypatch):
    from farm.models.lynx import loader
    from farm.models.lynx.backend import LynxBackend

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the device check")

    monkeypatch.setattr(loader, "load_lynx", no_load)
    with pytest.raises(RuntimeError, match="runs on cpu"):
        LynxBackend(lynx_spec(quantize="fp8")).setup("cpu")
    monkeypatch.setattr(quantize, "gpu_capability", lambda device: ((8, 0), "NVIDIA A100-SXM4-80GB"))
    with pytest.raises(RuntimeError, match="A100"):
        LynxBackend(lynx_spec("bf16", quantize="fp8")).setup("cuda:0")
