"""Our LoRA reading against an independent implementation: diffusers' own converters for Wan LoRAs in the Wan
(lightx2v, DiffSynth) and musubi/kohya key layouts. diffusers turns such a file into PEFT pairs with ``alpha / rank``
folded into the matrices; the update each layer gets is ``B @ A`` (and ``lora_B.bias``). Our fused application
must change every weight by exactly that.

diffusers drops what it cannot express as pairs (norm deltas, whole-weight ``.diff`` of linears); those are covered
by ``test_lynx_lora.py`` and left out of the files here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from farm.models.lynx.lora import apply_lora, read_lora
from tests.models.test_lynx_lora import load

conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")

ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
WAN_BLOCK = {
    **{f"self_attn.{o}": f"attn1.{d}" for o, d in ATTN.items()},
    **{f"cross_attn.{o}": f"attn2.{d}" for o, d in ATTN.items()},
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
WAN_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
}


def layers(transformer, top: bool) -> dict[str, str]:
    """Wan module path -> diffusers module name, every linear layer a Wan LoRA trains."""
    table = {f"blocks.{i}.{w}": f"blocks.{i}.{d}" for i in range(len(transformer.blocks)) for w, d in WAN_BLOCK.items()}
    return {**table, **(WAN_TOP if top else {})}


def random_pairs(transformer, table: dict[str, str], rank: int, alphas: list[float], gen) -> dict[str, dict]:
    out = {}
    for n, (wan, name) in enumerate(table.items()):
        rows, cols = transformer.get_submodule(name).weight.shape
        out[wan] = {
            "down": torch.randn(rank, cols, generator=gen) * 0.1,
            "up": torch.randn(rows, rank, generator=gen) * 0.1,
            "alpha": torch.tensor(alphas[n % len(alphas)]),
            "bias": torch.randn(rows, generator=gen) * 0.01,
        }
    return out


def diffusers_updates(converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' result as parameter -> delta: ``B @ A`` for each pair, ``lora_B.bias`` for the bias."""
    deltas = {}
    for key, a in converted.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = converted[key.replace(".lora_A.", ".lora_B.")]
            deltas[f"{module}.weight"] = b.double() @ a.double()
        elif key.endswith(".lora_B.bias"):
            deltas[key.removeprefix("transformer.").removesuffix(".lora_B.bias") + ".bias"] = a.double()
    return deltas


def our_updates(path: Path) -> dict[str, torch.Tensor]:
    model = load()
    transformer = model.transformer
    before = {n: p.detach().double().clone() for n, p in transformer.named_parameters()}
    apply_lora(transformer, read_lora(path, len(transformer.blocks)), fuse=True)
    after = {n: p.detach().double() for n, p in transformer.named_parameters()}
    return {n: after[n] - before[n] for n in before if not torch.equal(after[n], before[n])}


def assert_same_updates(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, delta in theirs.items():
        torch.testing.assert_close(ours[name], delta, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("names", [("lora_down", "lora_up"), ("lora_A", "lora_B")])
def test_wan_layout_files_change_what_diffusers_changes(tmp_path: Path, names: tuple[str, str]) -> None:
    """A lightx2v-style file: pairs with alpha (different per layer) and bias deltas on every linear of every block,
    pairs without alpha on the embedders and the time projection; the head as a whole-weight delta (Wan2.2's
    distill LoRAs)."""
    transformer = load().transformer
    gen = torch.Generator().manual_seed(11)
    down, up = names
    tensors: dict[str, torch.Tensor] = {}
    for wan, u in random_pairs(transformer, layers(transformer, top=True), 8, [8.0, 4.0, 16.0, 1.0], gen).items():
        key = f"diffusion_model.{wan}"
        tensors |= {f"{key}.{down}.weight": u["down"], f"{key}.{up}.weight": u["up"]}
        tensors[f"{key}.diff_b"] = u["bias"]
        if wan.startswith("blocks."):  # diffusers reads alpha only inside blocks; without one the scale is 1
            tensors[f"{key}.alpha"] = u["alpha"]
    head = transformer.proj_out.weight
    tensors["diffusion_model.head.head.diff"] = torch.randn(head.shape, generator=gen) * 0.01
    tensors["diffusion_model.head.head.diff_b"] = torch.randn(head.shape[0], generator=gen) * 0.01
    path = tmp_path / "wan.safetensors"
    save_file(tensors, str(path))

    theirs = diffusers_updates(conversion._convert_non_diffusers_wan_lora_to_diffusers(dict(tensors)))
    assert "proj_out.weight" in theirs and "blocks.0.attn2.to_k.weight" in theirs
    assert_same_updates(our_updates(path), theirs)


def test_musubi_files_change_what_diffusers_changes(tmp_path: Path) -> None:
    transformer = load().transformer
    gen = torch.Generator().manual_seed(12)
    tensors: dict[str, torch.Tensor] = {}
    for wan, u in random_pairs(transformer, layers(transformer, top=False), 4, [4.0, 2.0, 32.0], gen).items():
        key = "lora_unet_" + wan.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": u["down"], f"{key}.lora_up.weight": u["up"], f"{key}.alpha": u["alpha"]}
    path = tmp_path / "musubi.safetensors"
    save_file(tensors, str(path))

    theirs = diffusers_updates(conversion._convert_musubi_wan_lora_to_diffusers(dict(tensors)))
    assert len(theirs) == len(transformer.blocks) * len(WAN_BLOCK)
    assert_same_updates(our_updates(path), theirs)
