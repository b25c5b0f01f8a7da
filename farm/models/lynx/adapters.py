"""Lynx's adapters as attention processors on diffusers' ``WanAttention`` (our implementation of the paper's math).

* ID-adapter (full): each cross-attention also attends, with the same normalised query, to the resampler's face
  tokens (plus learned ``registers`` when the checkpoint has them) through ``to_k_ip``/``to_v_ip`` (key normalised by
  the block's own ``norm_k``, no rotary); the result is added, times ``ip_scale``, before ``to_out``.
* ID-adapter (lite): the same on every 2nd block, without biases, and the key normalised by a weightless RMSNorm
  (eps 1e-5) instead of ``norm_k``.
* Ref-adapter (full): a DiT pass over the reference latent *records* each block's self-attention input (the
  modulated, normalised hidden states); in the video passes each self-attention also attends to the recorded
  states through ``to_k_ref``/``to_v_ref`` (key through ``norm_k``, no rotary), added times ``ref_scale``.

diffusers' ``WanTransformer3DModel.forward`` passes nothing but hidden states to the processors, so the per-call
conditioning lives in one ``AdapterState`` shared by all processors of a transformer; the pipeline sets it before
every forward. Every tensor in it has the same batch size as the latents of that forward (guidance passes are
stacked along the batch), which is what makes batched guidance exact.

Nothing a processor reads differs from block to block except its weights and its own ``RefSlot`` (an object, never a
block number): ``torch.compile`` of the repeated blocks then makes one graph per kind of pass (record / read) instead
of one per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import RMSNorm
from torch import nn

LITE_IP_NORM_EPS = 1e-5


class RefSlot:
    """One block's reference states ``(B, L_ref, dim)``. Its Ref processor owns it, so no processor looks its states
    up by block number: a Python int per block is a constant dynamo specialises on (a recompile per block)."""

    def __init__(self) -> None:
        self.states: torch.Tensor | None = None


@dataclass
class AdapterState:
    """Conditioning for the next transformer forward.

    ``ref_mode``: ``"off"`` (no reference), ``"record"`` (each Ref processor stores its input in its slot), ``"read"``
    (each attends to its slot). ``ref_slots`` holds the slots in block order (filled when the adapter is installed);
    ``recorded``/``load_ref`` move a whole reference buffer, one tensor per block, out of and into them.
    """

    ip_tokens: torch.Tensor | None = None
    ip_scale: float = 1.0
    ref_mode: str = "off"
    ref_slots: list[RefSlot] = field(default_factory=list)
    ref_scale: float = 1.0

    def clear(self) -> None:
        self.ip_tokens = None
        self.ref_mode = "off"
        for slot in self.ref_slots:
            slot.states = None

    def recorded(self) -> tuple[torch.Tensor, ...]:
        """The reference buffer a ``record`` pass left in the slots (one tensor per block, in block order)."""
        missing = [i for i, slot in enumerate(self.ref_slots) if slot.states is None]
        if missing or not self.ref_slots:
            raise RuntimeError(f"no reference states recorded for blocks {missing or 'all'}; run a record pass first")
        return tuple(slot.states for slot in self.ref_slots)

    def load_ref(self, buffer: tuple[torch.Tensor, ...]) -> None:
        """Fill the slots from a buffer that ``recorded`` returned (guidance passes may be stacked on the batch)."""
        if len(buffer) != len(self.ref_slots):
            raise ValueError(f"reference buffer has {len(buffer)} blocks; this transformer has {len(self.ref_slots)}")
        for slot, states in zip(self.ref_slots, buffer, strict=True):
            slot.states = states
        self.ref_mode = "read"


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, backend=None) -> torch.Tensor:
    """Full (unmasked) attention over ``(B, L, heads*d)`` projections; returns ``(B, Lq, heads*d)``."""
    q = query.unflatten(2, (heads, -1))
    k = key.unflatten(2, (heads, -1))
    v = value.unflatten(2, (heads, -1))
    out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)
    return out.flatten(2, 3).type_as(query)


def _rotate(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs, ``(B, L, H, D)``."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def _main_attention(attn, hidden_states, encoder_hidden_states, rotary_emb, backend):
    """Wan's own attention (self or text cross), returning the normalised query for the adapter branch too."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query = attn.norm_q(attn.to_q(hidden_states))
    key = attn.norm_k(attn.to_k(context))
    value = attn.to_v(context)
    q = query.unflatten(2, (attn.heads, -1))
    k = key.unflatten(2, (attn.heads, -1))
    v = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        q = _rotate(q, *rotary_emb)
        k = _rotate(k, *rotary_emb)
    out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)
    return out.flatten(2, 3).type_as(query), query


class IPAttnProcessor(nn.Module):
    """Cross-attention + ID-adapter branch. ``lite=True`` selects the lite checkpoint's form (see module doc)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(
        self, state: AdapterState, in_dim: int, dim: int, bias: bool, n_registers: int = 0, lite: bool = False
    ) -> None:
        super().__init__()
        self.state = state
        self.lite = lite
        self.to_k_ip = nn.Linear(in_dim, dim, bias=bias)
        self.to_v_ip = nn.Linear(in_dim, dim, bias=bias)
        self.registers = nn.Parameter(torch.zeros(1, n_registers, in_dim)) if n_registers > 0 else None
        self.norm_ip_k = RMSNorm(dim, eps=LITE_IP_NORM_EPS, elementwise_affine=False) if lite else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.add_k_proj is not None:
            raise ValueError("Lynx runs on the Wan T2V transformer; an image-conditioned (I2V) base is not supported")
        out, query = _main_attention(attn, hidden_states, encoder_hidden_states, None, self._attention_backend)
        tokens = self.state.ip_tokens
        if tokens is not None:
            if self.registers is not None:
                tokens = torch.cat([tokens, self.registers.expand(tokens.shape[0], -1, -1).to(tokens.dtype)], dim=1)
            key = self.to_k_ip(tokens)
            key = self.norm_ip_k(key) if self.lite else attn.norm_k(key)
            value = self.to_v_ip(tokens)
            ip_out = _attend(query, key, value, attn.heads, self._attention_backend)
            out = out + self.state.ip_scale * ip_out
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class RefAttnProcessor(nn.Module):
    """Self-attention + Ref-adapter branch; records its input in ``record`` mode, attends to it in ``read`` mode."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: AdapterState, slot: RefSlot, dim: int) -> None:
        super().__init__()
        self.state = state
        self.slot = slot
        self.to_k_ref = nn.Linear(dim, dim, bias=True)
        self.to_v_ref = nn.Linear(dim, dim, bias=True)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        state = self.state
        if state.ref_mode == "record":
            self.slot.states = hidden_states
        out, query = _main_attention(attn, hidden_states, None, rotary_emb, self._attention_backend)
        if state.ref_mode == "read":
            ref = self.slot.states.to(hidden_states.dtype)
            key = attn.norm_k(self.to_k_ref(ref))
            value = self.to_v_ref(ref)
            out = out + state.ref_scale * _attend(query, key, value, attn.heads, self._attention_backend)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def ip_block_indices(num_blocks: int, interval: int) -> list[int]:
    """Blocks carrying an ID-adapter: every block (full, interval 1) or every 2nd from 0 (lite)."""
    return list(range(0, num_blocks, interval))


def install_ip_adapter(
    transformer, state: AdapterState, in_dim: int, interval: int, bias: bool, n_registers: int, lite: bool
) -> nn.ModuleList:
    """Put ID processors on the cross-attentions; returns them in checkpoint order (keys ``{i}.to_k_ip.weight``)."""
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    layers = []
    for index in ip_block_indices(len(transformer.blocks), interval):
        proc = IPAttnProcessor(state, in_dim, dim, bias=bias, n_registers=n_registers, lite=lite)
        transformer.blocks[index].attn2.set_processor(proc)
        layers.append(proc)
    return nn.ModuleList(layers)


def install_ref_adapter(transformer, state: AdapterState) -> nn.ModuleList:
    """Put Ref processors on every self-attention; returns them in checkpoint order (keys ``{i}.to_k_ref.weight``)."""
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    layers = []
    state.ref_slots = []
    for block in transformer.blocks:
        slot = RefSlot()
        state.ref_slots.append(slot)
        proc = RefAttnProcessor(state, slot, dim)
        block.attn1.set_processor(proc)
        layers.append(proc)
    return nn.ModuleList(layers)
