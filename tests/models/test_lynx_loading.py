"""Loading Lynx checkpoints: named errors, sizes from tensors, the node cache for s3:// weights, the tiny
checkpoint's layout and determinism, and the full-size key/shape contract checked on the meta device."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from farm.models.lynx.loader import AdapterConfig, expected_adapter_shapes, load_lynx, read_adapter_config
from farm.models.lynx.pipeline import LynxPipeline
from farm.models.lynx.tiny import BASE_DIRNAME, make_tiny_checkpoint
from farm.models.lynx.weights import (
    MANIFEST,
    LynxWeightsError,
    MissingWeightsFile,
    WrongKeyError,
    WrongShapeError,
    local_dir,
)
from tests.models.lynx_helpers import FAST_2PASS, NEGATIVE, PROMPT, WAN14B, adapter_dir, base_dir, inputs, pipeline


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_tiny_checkpoint_layout_and_determinism(tmp_path: Path) -> None:
    ours = Path(base_dir()).parent
    for rel in (
        f"{BASE_DIRNAME}/model_index.json",
        f"{BASE_DIRNAME}/tokenizer/spiece.model",
        f"{BASE_DIRNAME}/tokenizer/tokenizer.json",
        f"{BASE_DIRNAME}/text_encoder/config.json",
        f"{BASE_DIRNAME}/vae/diffusion_pytorch_model.safetensors",
        f"{BASE_DIRNAME}/transformer/config.json",
        f"{BASE_DIRNAME}/scheduler/scheduler_config.json",
        "lynx_full/resampler.safetensors",
        "lynx_full/ip_layers.safetensors",
        "lynx_full/ref_layers.safetensors",
        "lynx_lite/resampler.safetensors",
        "lynx_lite/ip_layers.safetensors",
    ):
        assert (ours / rel).is_file(), rel
    assert not (ours / "lynx_lite/ref_layers.safetensors").exists()
    assert any((ours / "insightface").glob("*.onnx"))
    again = make_tiny_checkpoint(tmp_path / "again", seed=0, with_insightface=False)
    other = make_tiny_checkpoint(tmp_path / "other", seed=1, with_insightface=False)
    same = {k: v for k, v in _tree_digest(ours).items() if not k.startswith("insightface")}
    assert _tree_digest(again) == same
    differs = _tree_digest(other)
    assert (
        differs[f"{BASE_DIRNAME}/transformer/diffusion_pytorch_model.safetensors"]
        != same[f"{BASE_DIRNAME}/transformer/diffusion_pytorch_model.safetensors"]
    )
    assert differs[f"{BASE_DIRNAME}/tokenizer/spiece.model"] == same[f"{BASE_DIRNAME}/tokenizer/spiece.model"]


def test_sizes_are_read_from_tensors() -> None:
    full = read_adapter_config(Path(adapter_dir("full")), "full")
    lite = read_adapter_config(Path(adapter_dir("lite")), "lite")
    assert (full.resampler_dim, full.resampler_queries, full.ip_dim, full.ip_registers, full.ip_bias) == (
        32,
        4,
        32,
        2,
        True,
    )
    assert (lite.ip_dim, lite.ip_interval, lite.ip_bias, lite.ref_adapter) == (24, 2, False, False)
    assert full.resampler_heads * full.resampler_dim_head == 32
    model = pipeline("lite").model
    ip_blocks = [i for i, b in enumerate(model.transformer.blocks) if hasattr(b.attn2.processor, "to_k_ip")]
    assert ip_blocks == [0, 2]  # every 2nd block, as the official lite loader


def _copy_adapter(tmp_path: Path, variant: str) -> Path:
    target = tmp_path / f"lynx_{variant}"
    shutil.copytree(adapter_dir(variant), target)
    return target


def test_missing_adapter_file_is_named(tmp_path: Path) -> None:
    adapter = _copy_adapter(tmp_path, "full")
    (adapter / "ref_layers.safetensors").unlink()
    with pytest.raises(MissingWeightsFile, match="ref_layers.safetensors"):
        load_lynx(base_dir(), str(adapter), "full")
    with pytest.raises(MissingWeightsFile, match="checkpoint folder"):
        load_lynx(base_dir(), str(tmp_path / "nowhere"), "full")


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    adapter = _copy_adapter(tmp_path, "full")
    tensors = load_file(str(adapter / "ref_layers.safetensors"))
    tensors["1.to_v_ref.weight"] = torch.zeros(32, 16)
    save_file(tensors, str(adapter / "ref_layers.safetensors"))
    with pytest.raises(WrongShapeError) as info:
        load_lynx(base_dir(), str(adapter), "full")
    message = str(info.value)
    assert "ref_layers.safetensors" in message and "1.to_v_ref.weight" in message
    assert "(32, 16)" in message and "(32, 32)" in message


def test_wrong_base_shape_names_the_folder_and_tensor(tmp_path: Path) -> None:
    base = tmp_path / BASE_DIRNAME
    shutil.copytree(base_dir(), base)
    path = base / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["blocks.1.attn1.to_q.weight"] = torch.zeros(32, 16)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(LynxWeightsError) as info:
        load_lynx(str(base), adapter_dir("full"), "full")
    assert "transformer" in str(info.value) and "blocks.1.attn1.to_q.weight" in str(info.value)
    (base / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsFile, match="vae"):
        load_lynx(str(base), adapter_dir("full"), "full")


def test_wrong_key_is_named(tmp_path: Path) -> None:
    adapter = _copy_adapter(tmp_path, "full")
    tensors = load_file(str(adapter / "ip_layers.safetensors"))
    tensors["2.to_k_ipx.weight"] = tensors.pop("2.to_k_ip.weight")
    save_file(tensors, str(adapter / "ip_layers.safetensors"))
    with pytest.raises(WrongKeyError) as info:
        load_lynx(base_dir(), str(adapter), "full")
    assert "2.to_k_ip.weight (32, 32)" in str(info.value) and "2.to_k_ipx.weight" in str(info.value)


def test_lite_adapter_loaded_as_full_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="variant='lite'"):
        load_lynx(base_dir(), adapter_dir("lite"), "full")
    adapter = _copy_adapter(tmp_path, "lite")
    (adapter / "lynx_adapter.json").unlink()  # as the official folders: no config of ours
    with pytest.raises(MissingWeightsFile, match="ref_layers"):
        load_lynx(base_dir(), str(adapter), "full")


def test_s3_checkpoint_goes_through_the_node_cache(
    s3_endpoint: dict, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_endpoint["storage_options"])
    root = Path(base_dir()).parent
    fs.put(str(root / BASE_DIRNAME), f"{s3_bucket}/w/{BASE_DIRNAME}", recursive=True)
    fs.put(str(root / "lynx_lite"), f"{s3_bucket}/w/lynx_lite", recursive=True)
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    options = s3_endpoint["storage_options"]
    base_uri, adapter_uri = f"{s3_bucket}/w/{BASE_DIRNAME}", f"{s3_bucket}/w/lynx_lite"

    # Two replicas on one node ask at once: one copy, both get a complete, verified folder.
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(local_dir(base_uri, options))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and (results[0] / MANIFEST).is_file()
    stamp = (results[0] / "transformer/diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    model = load_lynx(base_uri, adapter_uri, "lite", storage_options=options)
    assert (model.base_dir / "transformer/diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    emb, face = inputs(0)
    remote = LynxPipeline(model).generate(emb, face, PROMPT, NEGATIVE, FAST_2PASS, 42)
    local = pipeline("lite").generate(emb, face, PROMPT, NEGATIVE, FAST_2PASS, 42)
    np.testing.assert_array_equal(remote, local)

    # A truncated cached file is noticed and fetched again.
    victim = results[0] / "vae/config.json"
    victim.write_text("{}")
    assert local_dir(base_uri, options) == results[0]
    assert victim.read_text() != "{}"


def test_full_size_keys_and_shapes_on_meta_device() -> None:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        transformer = WanTransformer3DModel(**WAN14B)
        params = sum(p.numel() for p in transformer.parameters())
        assert 14.0e9 < params < 14.5e9  # Wan2.1-T2V-14B
        shapes = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
        # Keys and shapes of the Diffusers-format 14B transformer files.
        assert shapes["patch_embedding.weight"] == (5120, 16, 1, 2, 2)
        assert shapes["condition_embedder.text_embedder.linear_1.weight"] == (5120, 4096)
        assert shapes["condition_embedder.time_proj.weight"] == (30720, 5120)
        assert shapes["blocks.39.attn1.to_q.weight"] == (5120, 5120)
        assert shapes["blocks.39.attn2.norm_k.weight"] == (5120,)
        assert shapes["blocks.0.ffn.net.0.proj.weight"] == (13824, 5120)
        assert shapes["blocks.0.scale_shift_table"] == (1, 6, 5120)
        assert shapes["proj_out.weight"] == (64, 5120)
        # The official 14B adapter sizes, read off the official loaders (resampler 1280 wide, 20 heads x 64,
        # 16 queries, 512 -> 5120 for full / 2048 for lite; full ID-adapter on all 40 blocks with biases, lite on
        # every 2nd block without). test_lynx_fidelity checks the same against the official code itself.
        full = expected_adapter_shapes(transformer, AdapterConfig.official("full"))
    res = full["resampler.safetensors"]
    assert res["latents"] == (1, 16, 1280)
    assert res["proj_in.weight"] == (1280, 512)
    assert res["proj_out.weight"] == (5120, 1280)
    assert res["layers.3.0.to_q.weight"] == (1280, 1280) and res["layers.3.0.to_kv.weight"] == (2560, 1280)
    assert res["layers.3.1.1.weight"] == (5120, 1280) and "layers.4.0.to_q.weight" not in res
    ip = full["ip_layers.safetensors"]
    assert len([k for k in ip if k.endswith("to_k_ip.weight")]) == 40
    assert ip["39.to_k_ip.weight"] == (5120, 5120) and ip["39.to_v_ip.bias"] == (5120,)
    ref = full["ref_layers.safetensors"]
    assert set(ref) == {f"{i}.{n}.{p}" for i in range(40) for n in ("to_k_ref", "to_v_ref") for p in ("weight", "bias")}
    assert ref["0.to_k_ref.weight"] == (5120, 5120)

    with torch.device("meta"):
        transformer = WanTransformer3DModel(**WAN14B)
        lite = expected_adapter_shapes(transformer, AdapterConfig.official("lite"))
    assert set(lite) == {"resampler.safetensors", "ip_layers.safetensors"}
    assert lite["resampler.safetensors"]["proj_out.weight"] == (2048, 1280)
    assert set(lite["ip_layers.safetensors"]) == {f"{i}.to_{kv}_ip.weight" for i in range(20) for kv in "kv"}
    assert lite["ip_layers.safetensors"]["19.to_k_ip.weight"] == (5120, 2048)


@pytest.mark.parametrize("name", ["resampler.safetensors", "ref_layers.safetensors"])
def test_a_truncated_adapter_file_is_named(tmp_path: Path, name: str) -> None:
    adapter = tmp_path / "lynx_full"
    shutil.copytree(adapter_dir("full"), adapter)
    (adapter / name).write_bytes((adapter / name).read_bytes()[:-64])
    with pytest.raises(LynxWeightsError, match=f"{name}: not a readable safetensors file"):
        load_lynx(base_dir(), str(adapter), "full")
