"""Analytic floating-point operations of a Lynx denoising step, for MFU: what the GPU must compute at least.

A multiply-add counts 2. Counted: every linear layer and every attention product (QK^T and AV, no causal savings:
Wan attends everywhere) of the blocks, the Ref/ID adapter branches, and the patch embedding / output projection.
Not counted: norms, modulation, rotary, softmax, the time embedding (each linear in the tokens and small next to
the matmuls). The reference buffer, ID tokens and prompt embeddings are made once per video, not per step.
"""

from __future__ import annotations

from math import prod
from typing import Any

from farm.models.lynx.loader import AdapterConfig
from farm.models.lynx.pipeline import MAX_TEXT_TOKENS, REF_FACE_SIZE

VAE_SPATIAL = 8  # Wan 2.1's VAE: 8x spatial, 4x temporal compression
VAE_TEMPORAL = 4


def video_tokens(config: dict[str, Any], frames: int, height: int, width: int) -> int:
    """Transformer tokens of one video: latent frames x patches per latent frame."""
    pt, ph, pw = config.get("patch_size", (1, 2, 2))
    latent = ((frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL)
    return (latent[0] // pt) * (latent[1] // ph) * (latent[2] // pw)


def forward_flops(
    config: dict[str, Any], adapter: AdapterConfig, tokens: int, text_tokens: int = MAX_TEXT_TOKENS
) -> dict[str, float]:
    """FLOPs of one transformer forward of one sample (a guidance pass), split by kind."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    ffn = config["ffn_dim"]
    patch = prod(config.get("patch_size", (1, 2, 2)))
    ref_tokens = video_tokens(config, 1, REF_FACE_SIZE, REF_FACE_SIZE) if adapter.ref_adapter else 0
    ip_tokens = adapter.resampler_queries + adapter.ip_registers
    ip_blocks = len(range(0, layers, adapter.ip_interval))
    mm = 2.0  # FLOPs per multiply-add
    per_block_linear = mm * tokens * dim * dim * 4  # self-attention q, k, v, out
    per_block_linear += mm * tokens * dim * dim * 2 + mm * text_tokens * dim * dim * 2  # cross q, out; k, v on text
    per_block_linear += mm * tokens * dim * ffn * 2  # feed-forward in and out
    self_attn = mm * 2 * tokens * tokens * dim  # QK^T and AV over all heads
    cross_attn = mm * 2 * tokens * text_tokens * dim
    ref = layers * (mm * ref_tokens * dim * dim * 2 + mm * 2 * tokens * ref_tokens * dim) if ref_tokens else 0.0
    ip = ip_blocks * (mm * ip_tokens * adapter.ip_dim * dim * 2 + mm * 2 * tokens * ip_tokens * dim)
    text_embed = mm * text_tokens * (config["text_dim"] * dim + dim * dim)
    io = mm * tokens * config["in_channels"] * patch * dim + mm * tokens * dim * config["out_channels"] * patch
    parts = {
        "linear": layers * per_block_linear,
        "self_attention": layers * self_attn,
        "cross_attention": layers * cross_attn,
        "ref_adapter": ref,
        "id_adapter": ip,
        "embed_and_head": text_embed + io,
    }
    parts["total"] = sum(parts.values())
    return parts


def step_flops(
    config: dict[str, Any], adapter: AdapterConfig, frames: int, height: int, width: int, passes: int
) -> dict[str, float]:
    """FLOPs of one denoising step: ``passes`` guidance passes (3 full, 2 lite) over the video's tokens."""
    tokens = video_tokens(config, frames, height, width)
    return {key: value * passes for key, value in forward_flops(config, adapter, tokens).items()} | {
        "tokens": tokens,
        "passes": passes,
    }
