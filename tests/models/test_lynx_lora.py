"""LoRAs on the tiny checkpoint: one set of random updates written in the diffusers, Wan and kohya key layouts by
the tests' own writers (``lora_files.py``, independent of ``lora_keys``), loaded by the production code, applied fused
and unfused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from farm.models.lynx.loader import load_lynx
from farm.models.lynx.lora import LoraError, apply_lora, read_lora
from farm.models.lynx.pipeline import LynxPipeline, Options
from tests.models.lora_files import ALPHA, BLOCK_PAIRS, RANK, truth, write_diffusers, write_kohya, write_wan
from tests.models.lynx_helpers import FAST, NEGATIVE, PROMPT, adapter_dir, base_dir, inputs


def load(variant: str = "full"):
    return load_lynx(base_dir(), adapter_dir(variant), variant)


def expected_weights(transformer, updates, scale: float = 1.0, with_bias: bool = True) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    for name, u in updates.items():
        state[f"{name}.weight"] += scale * ALPHA / RANK * (u["up"] @ u["down"])
        if with_bias:
            state[f"{name}.bias"] += scale * u["bias"]
    return state


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def generate(model, seed: int = 3) -> np.ndarray:
    embedding, face = inputs(0)
    return LynxPipeline(model, Options()).generate(embedding, face, PROMPT, NEGATIVE, FAST, seed)


@pytest.fixture(scope="module")
def updates():
    return truth(load().transformer)


@pytest.fixture(scope="module")
def base_frames() -> np.ndarray:
    return generate(load())


def test_every_layout_applies_the_same_update(tmp_path: Path, updates) -> None:
    # the Wan file stores its down matrices rounded to bf16, so compare it with the same rounding
    rounded = {k: {**u, "down": u["down"].to(torch.bfloat16).float()} for k, u in updates.items()}
    cases = [
        ("diffusers", write_diffusers(tmp_path / "d.safetensors", updates), updates, True),
        ("wan", write_wan(tmp_path / "w.safetensors", updates), rounded, True),
        ("diffusers", write_kohya(tmp_path / "k.safetensors", updates), updates, False),
    ]
    for layout, path, used, with_bias in cases:
        model = load()
        expected = expected_weights(model.transformer, used, with_bias=with_bias)
        lora = read_lora(path, len(model.transformer.blocks))
        assert lora.layout == ("wan" if path.name != "d.safetensors" else "diffusers")
        assert apply_lora(model.transformer, lora) == len(updates)
        assert max_diff(model.transformer.state_dict(), expected) < 1e-6, (layout, path.name)


def test_a_lora_changes_the_frames_and_scale_zero_is_the_base(tmp_path: Path, updates, base_frames) -> None:
    path = write_wan(tmp_path / "w.safetensors", updates)
    for fuse in (True, False):
        model = load()
        apply_lora(model.transformer, read_lora(path, len(model.transformer.blocks)), scale=0.0, fuse=fuse)
        np.testing.assert_array_equal(generate(model), base_frames)
    model = load()
    apply_lora(model.transformer, read_lora(path, len(model.transformer.blocks)))
    changed = generate(model)
    assert np.abs(changed - base_frames).mean() > 1e-3


def test_unfused_equals_fused_and_keeps_the_base_weights(tmp_path: Path, updates) -> None:
    path = write_diffusers(tmp_path / "d.safetensors", updates, with_bias=False)
    fused = load()
    apply_lora(fused.transformer, read_lora(path, len(fused.transformer.blocks)), scale=0.7, fuse=True)
    unfused = load()
    before = {k: v.clone() for k, v in unfused.transformer.state_dict().items()}
    apply_lora(unfused.transformer, read_lora(path, len(unfused.transformer.blocks)), scale=0.7, fuse=False)
    after = {k: v for k, v in unfused.transformer.state_dict().items() if ".lora_sides." not in k}
    assert max_diff(before, after) == 0.0
    np.testing.assert_allclose(generate(unfused), generate(fused), atol=2e-5)


def test_wan_whole_weight_deltas_apply_to_norms_and_modulation(tmp_path: Path, updates) -> None:
    model = load()
    norm = model.transformer.blocks[0].norm2.weight  # Wan's norm3: the cross-attention norm
    extra = {
        "diffusion_model.blocks.0.norm3.diff": torch.full_like(norm, 0.25),
        "diffusion_model.blocks.1.modulation.diff": torch.full_like(model.transformer.blocks[1].scale_shift_table, 0.5),
        "diffusion_model.blocks.2.diff_m": torch.full_like(model.transformer.blocks[2].scale_shift_table, 0.125),
        "diffusion_model.head.modulation.diff": torch.full_like(model.transformer.scale_shift_table, -1.0),
    }
    path = write_wan(tmp_path / "w.safetensors", {}, extra=extra)
    before_norm = norm.detach().clone()
    before_table = model.transformer.blocks[1].scale_shift_table.detach().clone()
    before_m = model.transformer.blocks[2].scale_shift_table.detach().clone()  # lightx2v's diff_m
    apply_lora(model.transformer, read_lora(path, len(model.transformer.blocks)), scale=2.0)
    torch.testing.assert_close(norm.detach(), before_norm + 0.5)
    torch.testing.assert_close(model.transformer.blocks[1].scale_shift_table.detach(), before_table + 1.0)
    torch.testing.assert_close(model.transformer.blocks[2].scale_shift_table.detach(), before_m + 0.25)


def test_unfused_lora_under_compile_gives_the_same_frames(tmp_path: Path, updates) -> None:
    path = write_kohya(tmp_path / "k.safetensors", updates)
    eager = load()
    apply_lora(eager.transformer, read_lora(path, len(eager.transformer.blocks)), fuse=False)
    compiled = load()
    apply_lora(compiled.transformer, read_lora(path, len(compiled.transformer.blocks)), fuse=False)
    embedding, face = inputs(0)
    pipe = LynxPipeline(compiled, Options(compile=True, compile_backend="aot_eager"))
    frames = pipe.generate(embedding, face, PROMPT, NEGATIVE, FAST, 3)
    np.testing.assert_allclose(frames, generate(eager), atol=1e-5)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": (4, 32)}, "image-to-video"),
        ({"diffusion_model.blocks.35.self_attn.q.lora_down.weight": (4, 32)}, "another Wan size"),
        ({"lora_unet_blocks_0_self_attn_q.dora_scale": (1, 32)}, "DoRA"),
        ({"text_model.encoder.layers.0.q.weight": (4, 32)}, "not a LoRA entry"),
        ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": (4, 32)}, "no up matrix"),
        (
            {
                "diffusion_model.blocks.0.self_attn.q.lora_down.weight": (4, 64),
                "diffusion_model.blocks.0.self_attn.q.lora_up.weight": (32, 4),
            },
            "another Wan size",
        ),
        (
            {
                "diffusion_model.blocks.0.self_attn.q.lora_down.weight": (4, 32),
                "diffusion_model.blocks.0.self_attn.q.lora_up.weight": (32, 4),
                "diffusion_model.blocks.2.ffn.2.diff_b": (64,),  # every earlier entry fits: still nothing changes
            },
            "bias delta of shape",
        ),
        ({"diffusion_model.blocks.0.norm1.diff": (32,)}, "not in the Wan2.1-T2V transformer"),  # norm1: no weight
    ],
)
def test_files_that_cannot_apply_are_refused_by_name(tmp_path: Path, keys, message) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    model = load()
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    with pytest.raises(LoraError, match=message) as info:
        apply_lora(model.transformer, read_lora(path, len(model.transformer.blocks)))
    assert str(path) in str(info.value)
    assert max_diff(before, model.transformer.state_dict()) == 0.0  # nothing half-applied


def test_key_spellings_of_other_tools_map_to_the_same_layer() -> None:
    from farm.models.lynx.lora_keys import map_keys

    keys = [
        "base_model.model.blocks.1.attn2.to_k.lora_A.weight",  # PEFT's own save
        "lora_transformer_blocks_1_attn2_to_k.lora_B.weight",  # kohya-style, diffusers names
        "model.diffusion_model.blocks.1.cross_attn.k.lora_A.default.weight",  # Wan names, a named adapter
    ]
    targets = set()
    for key in keys:
        _, mapped = map_keys([key], 3)
        targets |= {m.target for m in mapped}
    assert targets == {"blocks.1.attn2.to_k"}


def test_only_safetensors_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(LoraError, match="only .safetensors"):
        read_lora(path, 3)
    with pytest.raises(LoraError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors", 3)


# ------------------------------------------------------------------ through the job spec and the backend
def lynx_job(tmp_path: Path, lora) -> dict:
    from tests.models.lynx_helpers import tiny_checkpoint

    weights = {"base": base_dir(), "adapter": adapter_dir("full"), "face_pack": str(tiny_checkpoint() / "insightface")}
    return {
        "manifest": str(tmp_path / "m.parquet"),
        "output": str(tmp_path / "out"),
        "model": {"backend": "lynx", "variant": "full", "weights": {**weights, "lora": lora}},
    }


def test_the_job_spec_reads_lora_entries(tmp_path: Path) -> None:
    from farm.config import SpecError, parse_job
    from farm.types import LoraSpec

    job = parse_job(lynx_job(tmp_path, ["/l/a.safetensors", {"path": "s3://b/c.safetensors", "scale": 0.5}]))
    spec = job.model_spec()
    assert spec.loras == (LoraSpec("/l/a.safetensors"), LoraSpec("s3://b/c.safetensors", 0.5, True))
    assert "lora" not in spec.weights
    assert parse_job(lynx_job(tmp_path, "/l/a.safetensors")).model_spec().loras == (LoraSpec("/l/a.safetensors"),)
    for bad, fragment in [
        ([{"path": "/a.safetensors", "scael": 1}], r"lora\[0\]: unknown key 'scael' \(did you mean 'scale'\?\)"),
        ([{"scale": 0.5}], r"weights.lora\[0\] needs a path"),
        (7, "must be a list of"),
        ([{"path": "/a.safetensors", "scale": float("nan")}], "scale"),
    ]:
        with pytest.raises(SpecError, match=fragment):
            parse_job(lynx_job(tmp_path, bad))
    data = lynx_job(tmp_path, [])
    data["model"]["weights"]["base"] = ["/a", "/b"]
    with pytest.raises(SpecError, match="weights.base must be one path"):
        parse_job(data)
    still = {**lynx_job(tmp_path, ["/a.safetensors"]), "model": {"backend": "still", "weights": {"lora": "/a.s"}}}
    with pytest.raises((SpecError, ValueError), match="takes no LoRAs"):
        from farm.models import build_backend

        build_backend(parse_job(still).model_spec())


def test_relative_lora_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from farm.config import load_job

    spec = tmp_path / "job.yaml"
    spec.write_text(
        "manifest: m.parquet\noutput: out\nmodel: {backend: lynx, weights: {base: b, adapter: a, "
        "lora: [l/x.safetensors, {path: y.safetensors, scale: 0.5}, s3://bk/z.safetensors]}}\n"
    )
    monkeypatch.chdir(tmp_path)
    loras = load_job(spec).model.loras()
    assert [lora.path for lora in loras] == [
        str(tmp_path / "l" / "x.safetensors"),
        str(tmp_path / "y.safetensors"),
        "s3://bk/z.safetensors",
    ]


def test_preflight_names_missing_and_foreign_loras(tmp_path: Path, updates) -> None:
    from farm.config import parse_job
    from farm.models import build_backend

    good = write_wan(tmp_path / "w.safetensors", updates)
    i2v = tmp_path / "i2v.safetensors"
    save_file({"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(4, 32)}, str(i2v))
    entries = [str(good), str(tmp_path / "gone.safetensors"), str(tmp_path / "x.ckpt"), str(i2v)]
    backend = build_backend(parse_job(lynx_job(tmp_path, entries)).model_spec())
    shallow = backend.check_weights()
    assert len(shallow) == 2
    assert "weights.lora[1]" in shallow[0] and "does not exist" in shallow[0]
    assert "weights.lora[2]" in shallow[1] and "not a .safetensors file" in shallow[1]
    deep = backend.check_weights(deep=True)
    assert len(deep) == 3 and "weights.lora[3]" in deep[2] and "image-to-video" in deep[2]


def test_the_backend_applies_loras_and_records_them(tmp_path: Path, updates) -> None:
    from farm.config import parse_job
    from farm.models import build_backend
    from farm.types import GenerationRequest

    path = str(write_wan(tmp_path / "w.safetensors", updates))
    plain = build_backend(parse_job(lynx_job(tmp_path, [])).model_spec())
    scaled = [build_backend(parse_job(lynx_job(tmp_path, [{"path": path, "scale": s}])).model_spec()) for s in (1, 2)]
    unfused = build_backend(parse_job(lynx_job(tmp_path, [{"path": path, "fuse": False}])).model_spec())
    assert len({plain.output_config(), scaled[0].output_config(), scaled[1].output_config()}) == 3
    assert unfused.output_config() == scaled[0].output_config()  # merged or beside: the same update
    embedding, face = inputs(0)
    from farm.models.lynx.face import LynxSubject

    subject = LynxSubject(embedding=embedding, aligned_face=face, num_faces=1, kps=np.zeros((5, 2)))
    request = GenerationRequest(id="r", prompt=PROMPT, negative_prompt=NEGATIVE, params=FAST, seed=3)
    frames = []
    for backend in (plain, scaled[0]):
        backend.setup("cpu")
        frames.append(backend.generate(subject, request))
    assert np.abs(frames[0] - frames[1]).mean() > 1e-3
    assert plain.fingerprint() != scaled[0].fingerprint()


def test_guidance_scale_one_makes_a_step_one_pass() -> None:
    """A CFG-distilled LoRA runs with guidance_scale 1.0: one transformer pass per step, no negative prompt."""
    import dataclasses

    model = load()
    pipe = LynxPipeline(model, Options())
    embedding, face = inputs(0)
    params = dataclasses.replace(FAST, num_inference_steps=4, guidance_scale=1.0)
    pipe.generate(embedding, face, PROMPT, NEGATIVE, params, 3)
    record_passes = 2  # the Ref-adapter's reference and unconditional-reference passes
    assert pipe.dit_samples == 4 + record_passes


def test_a_lightx2v_shaped_file_applies_every_kind_of_entry(tmp_path: Path) -> None:
    """The step-distilled LoRAs carry, beside the pairs, bias deltas on every linear layer, whole-weight deltas of
    the norms, the patch embedding and the modulation tables (``diff_m``), and entries on the embedders and head."""
    model = load()
    transformer = model.transformer
    gen = torch.Generator().manual_seed(3)
    tensors: dict[str, torch.Tensor] = {}
    expect: dict[str, str] = {}  # file key -> the parameter it must change

    def add(key: str, param: str) -> None:
        tensors[f"diffusion_model.{key}"] = torch.randn(transformer.get_parameter(param).shape, generator=gen) * 0.01
        expect[f"diffusion_model.{key}"] = param

    for i in range(len(transformer.blocks)):
        for wan, diffusers in [*BLOCK_PAIRS, ("cross_attn.k", "attn2.to_k")]:
            out, inp = transformer.get_parameter(f"blocks.{i}.{diffusers}.weight").shape
            key = f"diffusion_model.blocks.{i}.{wan}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(8, inp, generator=gen)
            tensors[f"{key}.lora_up.weight"] = torch.randn(out, 8, generator=gen)
            tensors[f"{key}.alpha"] = torch.tensor(8.0)
            add(f"blocks.{i}.{wan}.diff_b", f"blocks.{i}.{diffusers}.bias")
        add(f"blocks.{i}.norm3.diff", f"blocks.{i}.norm2.weight")
        add(f"blocks.{i}.norm3.diff_b", f"blocks.{i}.norm2.bias")
        add(f"blocks.{i}.self_attn.norm_q.diff", f"blocks.{i}.attn1.norm_q.weight")
        add(f"blocks.{i}.cross_attn.norm_k.diff", f"blocks.{i}.attn2.norm_k.weight")
        add(f"blocks.{i}.diff_m", f"blocks.{i}.scale_shift_table")
    for key, param in [
        ("patch_embedding.diff", "patch_embedding.weight"),
        ("patch_embedding.diff_b", "patch_embedding.bias"),
        ("text_embedding.0.diff_b", "condition_embedder.text_embedder.linear_1.bias"),
        ("time_embedding.2.diff", "condition_embedder.time_embedder.linear_2.weight"),
        ("time_projection.1.diff_b", "condition_embedder.time_proj.bias"),
        ("head.head.diff_b", "proj_out.bias"),
        ("head.modulation.diff", "scale_shift_table"),
    ]:
        add(key, param)
    path = tmp_path / "lightx2v_like.safetensors"
    save_file(tensors, str(path))
    before = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    lora = read_lora(path, len(transformer.blocks))
    assert lora.layout == "wan"
    apply_lora(transformer, lora)
    after = dict(transformer.named_parameters())
    for key, param in expect.items():
        assert not torch.equal(after[param], before[param]), key
    pairs = {f"{name}.weight" for name in lora.layers if lora.layers[name].down is not None}
    changed = {n for n in before if not torch.equal(after[n], before[n])}
    assert changed == set(expect.values()) | pairs  # and nothing else


def test_a_lora_on_object_storage_loads_through_the_node_cache(
    s3_endpoint: dict, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, updates
) -> None:
    import s3fs

    from farm.models.lynx.lora import load_loras
    from farm.models.lynx.precheck import check_loras
    from farm.types import LoraSpec

    options = s3_endpoint["storage_options"]
    local = write_wan(tmp_path / "w.safetensors", updates)
    s3fs.S3FileSystem(**options).put(str(local), f"{s3_bucket}/loras/w.safetensors")
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    remote = LoraSpec(f"{s3_bucket}/loras/w.safetensors", 0.5)
    weights = {"base": base_dir()}
    assert check_loras([remote], weights, options, deep=True) == []
    gone = LoraSpec(f"{s3_bucket}/loras/gone.safetensors")
    assert "does not exist" in check_loras([gone], weights, options)[0]
    from_s3, from_disk = load(), load()
    assert load_loras(from_s3.transformer, [remote], options)[0].endswith("scale 0.5, fused")
    apply_lora(from_disk.transformer, read_lora(local, len(from_disk.transformer.blocks)), scale=0.5)
    assert max_diff(from_s3.transformer.state_dict(), from_disk.transformer.state_dict()) == 0.0
    assert list((tmp_path / "cache").rglob("w.safetensors"))  # fetched once into the node's cache


def test_a_truncated_lora_file_is_named(tmp_path: Path, updates) -> None:
    path = write_wan(tmp_path / "w.safetensors", updates)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LoraError, match="not a readable safetensors file"):
        read_lora(path, 3)
