"""How the transformer runs (``farm.models.lynx.execution``) on the tiny checkpoint, CPU: regional compilation
without recompiles, attention backends through diffusers' dispatch, fp32 without TF32; plus the analytic FLOPs and
the random-weight builder the GPU benchmark uses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from farm.models.lynx import execution
from farm.models.lynx.adapters import AdapterState, RefAttnProcessor
from farm.models.lynx.backend import LynxBackend
from farm.models.lynx.flops import step_flops, video_tokens
from farm.models.lynx.loader import load_lynx
from farm.models.lynx.pipeline import LynxPipeline, Options
from farm.models.lynx.random_model import REAL, TINY, build_random_lynx
from farm.types import ModelSpec
from tests.models.lynx_helpers import FAST, FAST_2PASS, NEGATIVE, PROMPT, adapter_dir, base_dir, inputs, pipeline


def fresh(variant: str, **options) -> LynxPipeline:
    """A pipeline on its own model (compiling and attention backends change the transformer in place)."""
    return LynxPipeline(load_lynx(base_dir(), adapter_dir(variant), variant), Options(**options))


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("variant", ["full", "lite"])
def test_compile_makes_one_graph_per_kind_of_pass_and_never_recompiles(variant: str) -> None:
    """Full: one graph for the reference record pass, one for the guidance read pass (3 blocks share them); lite:
    one for blocks with an ID-adapter, one for those without. A second video (new prompt, new seed, so new
    reference passes) compiles nothing. aot_eager: the same dynamo graphs and guards as inductor, no codegen."""
    torch._dynamo.reset()
    emb, face = inputs(0)
    params = FAST if variant == "full" else FAST_2PASS
    expected = pipeline(variant).generate(emb, face, PROMPT, NEGATIVE, params, 42)
    pipe = fresh(variant, compile=True, compile_backend="aot_eager")
    before = graphs()
    frames = pipe.generate(emb, face, PROMPT, NEGATIVE, params, 42)
    assert graphs() - before == 2, "one graph per kind of pass, not per block"
    assert len(pipe.model.transformer.blocks) == 3
    np.testing.assert_allclose(frames, expected, atol=1e-6, rtol=0)
    first = graphs()
    pipe.generate(emb, face, "A person holds a cup of coffee.", NEGATIVE, params, 7)
    assert graphs() == first, "a second video recompiled"


def test_ref_processors_hold_no_block_number() -> None:
    """What made dynamo recompile per block: an int index per processor. Each owns its slot instead."""
    pipe = fresh("full")
    procs = [b.attn1.processor for b in pipe.model.transformer.blocks]
    assert all(isinstance(p, RefAttnProcessor) for p in procs)
    assert not any(isinstance(v, int) and not isinstance(v, bool) for p in procs for v in vars(p).values())
    assert [p.slot for p in procs] == pipe.model.state.ref_slots
    assert len({id(p.slot) for p in procs}) == len(procs)


def test_reference_buffer_errors_name_the_problem() -> None:
    state = fresh("full").model.state
    with pytest.raises(RuntimeError, match="run a record pass"):
        state.recorded()
    with pytest.raises(ValueError, match="2 blocks; this transformer has 3"):
        state.load_ref((torch.zeros(1), torch.zeros(1)))
    assert AdapterState().ref_slots == []


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lite"])
def test_compile_with_inductor_keeps_the_frames(variant: str) -> None:
    torch._dynamo.reset()
    emb, face = inputs(0)
    expected = pipeline(variant).generate(emb, face, PROMPT, NEGATIVE, FAST, 42)
    frames = fresh(variant, compile=True).generate(emb, face, PROMPT, NEGATIVE, FAST, 42)
    np.testing.assert_allclose(frames, expected, atol=1e-5, rtol=0)


def test_generate_latents_stops_after_max_steps() -> None:
    pipe = pipeline("full")
    emb, face = inputs(0)
    whole = pipe.generate_latents(emb, face, PROMPT, NEGATIVE, FAST, 42)
    np.testing.assert_array_equal(pipe.decode(whole), pipe.generate(emb, face, PROMPT, NEGATIVE, FAST, 42))
    one = pipe.generate_latents(emb, face, PROMPT, NEGATIVE, FAST, 42, max_steps=1)
    assert one.shape == whole.shape and not torch.equal(one, whole)


# ------------------------------------------------------------------------------------------------ attention
def test_attention_backend_reaches_our_processors_and_keeps_the_frames() -> None:
    emb, face = inputs(0)
    expected = pipeline("full").generate(emb, face, PROMPT, NEGATIVE, FAST, 42)
    pipe = fresh("full", attention_backend="_native_math")
    blocks = pipe.model.transformer.blocks
    names = {str(getattr(b.attn1.processor._attention_backend, "value", None)) for b in blocks}
    names |= {str(getattr(b.attn2.processor._attention_backend, "value", None)) for b in blocks}
    assert names == {"_native_math"}  # Ref (attn1) and ID (attn2) processors alike
    frames = pipe.generate(emb, face, PROMPT, NEGATIVE, FAST, 42)
    np.testing.assert_allclose(frames, expected, atol=1e-5, rtol=0)
    execution.set_attention_backend(pipe.model.transformer, "native")  # the process-wide default again


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("tea", ValueError, "attention_backend='tea' is unknown; choose one of .*_native_cudnn"),
        ("flash_hub", ValueError, "downloads its kernel from a hub"),
    ],
)
def test_attention_backend_errors_name_the_value(name: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        execution.check_attention_backend(name)
    spec = ModelSpec(
        backend="lynx", variant="full", weights={"base": "b", "adapter": "a"}, options={"attention_backend": name}
    )
    with pytest.raises(error, match=match):
        LynxBackend(spec)  # at job validation, before any weight is read


def test_attention_backend_without_its_package_says_which() -> None:
    from diffusers.models.attention_dispatch import _CAN_USE_FLASH_ATTN

    if _CAN_USE_FLASH_ATTN:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(RuntimeError, match="attention_backend='flash' cannot run here: .*flash-attn"):
        execution.set_attention_backend(fresh("lite").model.transformer, "flash")


def test_compile_option_must_be_a_bool() -> None:
    spec = ModelSpec(backend="lynx", variant="full", weights={"base": "b", "adapter": "a"}, options={"compile": "yes"})
    with pytest.raises(ValueError, match="compile='yes' must be true or false"):
        LynxBackend(spec)


# ------------------------------------------------------------------------------------------------ fp32
@pytest.fixture
def restore_fp32_flags():
    flags = execution.fp32_flags()
    yield
    execution.set_fp32_flags(flags)


def test_strict_fp32_only_for_fp32_on_cuda(restore_fp32_flags) -> None:
    """No GPU needed: the flags are process settings. bf16 and CPU runs leave them alone."""
    found = execution.fp32_flags()
    assert not execution.strict_fp32(torch.bfloat16, "cuda")
    assert not execution.strict_fp32(torch.float32, "cpu")
    assert execution.fp32_flags() == found
    assert execution.strict_fp32(torch.float32, "cuda:0")
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    if hasattr(torch.backends.cudnn, "conv"):  # PyTorch >= 2.9 reads the same setting through its newer API
        assert torch.backends.cudnn.conv.fp32_precision != "tf32"
        assert torch.backends.cuda.matmul.fp32_precision != "tf32"


def test_set_fp32_flags_restores_what_was_found(restore_fp32_flags) -> None:
    found = execution.fp32_flags()
    execution.strict_fp32(torch.float32, "cuda")
    execution.set_fp32_flags(found)
    assert execution.fp32_flags() == found


# ------------------------------------------------------------------------------------------------ sizes and FLOPs
def test_analytic_flops_of_the_official_videos() -> None:
    """Full 81x480x832: 32,760 tokens, 3 passes, ~5.06 PFLOP per step with self-attention ~52 % of it (the issue's
    hand count: 5,050 TFLOP); lite 121x480x832: 48,360 tokens, 2 passes, ~6.19 PFLOP."""
    full = step_flops(REAL.transformer, REAL.adapters["full"], 81, 480, 832, passes=3)
    lite = step_flops(REAL.transformer, REAL.adapters["lite"], 121, 480, 832, passes=2)
    assert (full["tokens"], lite["tokens"]) == (32760, 48360)
    assert full["total"] == pytest.approx(5.06e15, rel=0.01)
    assert lite["total"] == pytest.approx(6.19e15, rel=0.01)
    assert full["self_attention"] / full["total"] == pytest.approx(0.52, abs=0.01)
    assert lite["ref_adapter"] == 0 and full["ref_adapter"] > 0
    assert video_tokens(TINY.transformer, 9, 64, 96) == 3 * 4 * 6


def test_random_model_runs_and_keeps_diffusers_fp32_parameters() -> None:
    model = build_random_lynx("lite", TINY, "cpu", torch.bfloat16)
    transformer = model.transformer
    assert transformer.blocks[0].scale_shift_table.dtype == torch.float32  # as a bf16 checkpoint load keeps it
    assert transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.resampler.latents.dtype == torch.bfloat16
    emb, face = inputs(0)
    params = dataclasses.replace(FAST_2PASS, num_inference_steps=1)
    frames = LynxPipeline(model, Options()).generate(emb, face, PROMPT, NEGATIVE, params, 1)
    assert frames.shape == (5, 32, 48, 3) and np.isfinite(frames).all()
