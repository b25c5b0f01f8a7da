"""Perceiver resampler: one ArcFace vector -> ``num_queries`` ID tokens (our implementation of the IP-Adapter form).

Parameter names follow the official ``resampler.safetensors`` so the file loads unchanged: ``latents``,
``proj_in``, ``proj_out``, ``norm_out``, and per layer ``layers.{i}.0`` (attention: ``norm1``, ``norm2``, ``to_q``,
``to_kv``, ``to_out``) and ``layers.{i}.1`` (feed-forward: LayerNorm, Linear, GELU, Linear, no biases).
"""

from __future__ import annotations

import torch
from torch import nn


class PerceiverAttention(nn.Module):
    """Latent queries attend to ``[inputs; latents]`` (the Flamingo perceiver step)."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        # Scale q and k each by d^-1/4 before the product (fp16-friendly), softmax in fp32: the trained behaviour.
        scale = self.dim_head**-0.25
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class Resampler(nn.Module):
    """``(B, N, embedding_dim)`` face features -> ``(B, num_queries, output_dim)`` tokens for the ID-adapter."""

    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 5120,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
                for _ in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
