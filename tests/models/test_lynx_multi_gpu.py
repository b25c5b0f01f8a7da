"""Guidance passes across a replica's devices (``multi_gpu.py``), played on the CPU: every "device" is ``cpu`` (or
``meta`` where only placement matters), so the copies, the split of the passes, the threads and the gathering run
as on GPUs, and the frames must equal one device's."""

from __future__ import annotations

import numpy as np
import pytest

from farm.models.lynx.loader import load_lynx
from farm.models.lynx.multi_gpu import PassModel, copy_to, guidance_devices, split_passes
from farm.models.lynx.pipeline import LynxPipeline, Options
from tests.models.lynx_helpers import FAST, FAST_2PASS, NEGATIVE, PROMPT, adapter_dir, base_dir, inputs


def frames(variant: str, params, **options) -> tuple[np.ndarray, LynxPipeline]:
    pipe = LynxPipeline(load_lynx(base_dir(), adapter_dir(variant), variant), Options(**options))
    embedding, face = inputs(0)
    return pipe.generate(embedding, face, PROMPT, NEGATIVE, params, 3), pipe


@pytest.mark.parametrize(
    ("variant", "params", "devices", "batched"),
    [
        ("full", FAST, ("cpu", "cpu"), True),  # 3 passes on 3 devices
        ("full", FAST, ("cpu",), True),  # 3 passes on 2: [cond, id-only] stacked on the first, uncond on the second
        ("full", FAST, ("cpu",), False),
        ("lite", FAST_2PASS, ("cpu",), True),
    ],
)
def test_passes_on_several_devices_give_one_devices_frames(variant, params, devices, batched) -> None:
    one, single = frames(variant, params)
    split, pipe = frames(variant, params, guidance_devices=devices, batch_guidance=batched)
    np.testing.assert_allclose(split, one, atol=1e-5)
    assert len(pipe.pass_models) == len(devices) + 1
    passes = 3 if params.guidance_scale_i is not None else 2
    record = 2 if variant == "full" else 0
    assert pipe.dit_samples == single.dit_samples == params.num_inference_steps * passes + record
    again = pipe.generate(*inputs(0), PROMPT, NEGATIVE, params, 3)  # a second video: moved conditioning renewed
    np.testing.assert_array_equal(again, split)


def test_each_copy_reads_its_own_adapter_state() -> None:
    model = load_lynx(base_dir(), adapter_dir("full"), "full")
    primary = PassModel(model.transformer, model.state, model.device)
    copy = copy_to(primary, "meta")
    assert copy.state is not model.state
    assert all(p.device.type == "meta" for p in copy.transformer.parameters())
    assert all(p.device.type == "cpu" for p in model.transformer.parameters())
    for block, original in zip(copy.transformer.blocks, model.transformer.blocks, strict=True):
        assert block.attn1.processor.state is copy.state and block.attn2.processor.state is copy.state
        assert block.attn1.processor.slot in copy.state.ref_slots
        assert original.attn1.processor.state is model.state
    assert len(copy.state.ref_slots) == len(model.state.ref_slots)


def test_which_devices_and_which_passes() -> None:
    assert guidance_devices("cpu", visible=4) == []
    assert guidance_devices("cuda", visible=1) == []
    assert guidance_devices("cuda", visible=2) == ["cuda:1"]
    assert guidance_devices("cuda:0", visible=4) == ["cuda:1", "cuda:2"]  # at most 3 passes: a 4th GPU idles
    assert split_passes(3, 3) == [[0], [1], [2]]
    assert split_passes(3, 2) == [[0, 2], [1]]
    assert split_passes(2, 3) == [[0], [1]]
    assert split_passes(1, 2) == [[0]]


def test_step_cache_does_not_combine_with_several_devices() -> None:
    model = load_lynx(base_dir(), adapter_dir("lite"), "lite")
    with pytest.raises(ValueError, match="step_cache"):
        LynxPipeline(model, Options(step_cache=0.1, guidance_devices=("cpu",)))


def test_the_backend_uses_the_replicas_other_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica given 3 GPUs: the backend asks for 2 more pass devices (here played by the CPU)."""
    from farm.models.lynx import multi_gpu
    from farm.models.lynx.backend import LynxBackend
    from farm.types import ModelSpec

    asked = []

    def three_gpus(device, visible=None):
        asked.append(device)
        return ["cpu", "cpu"]

    monkeypatch.setattr(multi_gpu, "guidance_devices", three_gpus)
    weights = {"base": base_dir(), "adapter": adapter_dir("full")}
    backend = LynxBackend(ModelSpec(backend="lynx", variant="full", weights=weights))
    backend.setup("cpu")
    assert asked == ["cpu"] and len(backend.pipeline.pass_models) == 3
    offload = LynxBackend(ModelSpec(backend="lynx", variant="full", weights=weights, options={"cpu_offload": True}))
    with pytest.raises(ValueError, match="cpu_offload"):
        offload._guidance_devices("cuda", offload=True)


def test_compiled_copies_give_the_same_frames() -> None:
    """Each copy compiles its own blocks; the first step compiles them one after another (dynamo is not
    thread-safe), later steps run in threads."""
    one, _ = frames("full", FAST)
    split, pipe = frames("full", FAST, guidance_devices=("cpu",), compile=True, compile_backend="aot_eager")
    np.testing.assert_allclose(split, one, atol=1e-5)
    assert pipe._split_warm and pipe._pool is not None
