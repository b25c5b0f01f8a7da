"""LoRA files for the tests, written by the tests' own code (independent of ``farm.models.lynx.lora_keys``): one set
of random updates in the diffusers, Wan and kohya key layouts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK, ALPHA = 4, 8.0  # scaling alpha / rank = 2
# (Wan name, diffusers name) of the pairs written into every block, and the top-level ones.
BLOCK_PAIRS = [
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.o", "attn1.to_out.0"),
    ("cross_attn.v", "attn2.to_v"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
]
TOP_PAIRS = [("head.head", "proj_out"), ("time_projection.1", "condition_embedder.time_proj")]


def truth(transformer, seed: int = 7) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers layer name -> {down, up, bias}: the updates every layout below writes."""
    gen = torch.Generator().manual_seed(seed)
    names = [(f"blocks.{i}.{w}", f"blocks.{i}.{d}") for i in range(len(transformer.blocks)) for w, d in BLOCK_PAIRS]
    out = {}
    for wan, diffusers in names + TOP_PAIRS:
        weight = transformer.get_submodule(diffusers).weight
        out[diffusers] = {
            "wan": wan,
            "down": torch.randn(RANK, weight.shape[1], generator=gen) * 0.1,
            "up": torch.randn(weight.shape[0], RANK, generator=gen) * 0.1,
            "bias": torch.randn(weight.shape[0], generator=gen) * 0.01,
        }
    return out


def write_diffusers(path: Path, updates, with_bias: bool = True) -> Path:
    tensors = {}
    for name, u in updates.items():
        tensors[f"transformer.{name}.lora_A.weight"] = u["down"]
        tensors[f"transformer.{name}.lora_B.weight"] = u["up"]
        if with_bias:
            tensors[f"transformer.{name}.lora_B.bias"] = u["bias"]
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}
    save_file(tensors, str(path), metadata={"format": "pt", **meta})
    return path


def write_wan(path: Path, updates, with_bias: bool = True, extra: dict | None = None) -> Path:
    tensors = {}
    for u in updates.values():
        key = f"diffusion_model.{u['wan']}"
        tensors[f"{key}.lora_down.weight"] = u["down"].to(torch.bfloat16).float()
        tensors[f"{key}.lora_up.weight"] = u["up"]
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
        if with_bias:
            tensors[f"{key}.diff_b"] = u["bias"]
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


def write_kohya(path: Path, updates) -> Path:
    tensors = {}
    for u in updates.values():
        key = "lora_unet_" + u["wan"].replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = u["down"]
        tensors[f"{key}.lora_up.weight"] = u["up"]
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path))
    return path
