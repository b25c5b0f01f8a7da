"""Which layer of our Wan transformer each key of a LoRA file changes, whatever tool wrote the file (no torch: the
pre-flight maps a file's keys from its safetensors header alone).

Three key layouts are in use for Wan2.1 LoRAs, and one file may carry several kinds of entries:

* **wan**: the module names of Wan's own code, as the step-distilled LoRAs users run with Wan-14B (lightx2v),
  DiffSynth and most trainers write them: ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` (or
  ``lora_A``), ``.lora_up.weight`` (or ``lora_B``), ``.alpha``, ``.diff_b`` (a bias delta), ``.diff`` (a whole
  weight delta, e.g. of a norm), ``blocks.0.diff_m`` (a delta of the block's modulation table);
* **diffusers** (PEFT): ``transformer.blocks.0.attn1.to_q.lora_A.weight``, ``.lora_B.weight``, ``.lora_B.bias``
  (a bias delta); alpha in the safetensors metadata (``lora.py`` reads it);
* **kohya** (musubi-tuner, ai-toolkit): ``lora_unet_blocks_0_self_attn_q.lora_down.weight``, ``.alpha`` — the
  same module names with underscores (Wan's names, or diffusers' names by some tools).

Every key is mapped to a ``LoraKey``: the diffusers name of the module (or parameter) it changes and which part of
the update it holds. Keys that name no layer of the base raise ``LoraKeyError`` naming them and, where the keys
tell, why (an image-to-video LoRA, a LoRA for a base with other blocks, DoRA).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Prefixes tools put before the module path (tried in this order, repeatedly).
PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
    "lora_unet_",
    "lora_transformer_",
    "unet.",
)

# Wan's module names -> diffusers' ``WanTransformer3DModel`` names, inside every block and at the top level.
BLOCK_NAMES = {
    **{f"self_attn.{o}": f"attn1.{d}" for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    **{f"cross_attn.{o}": f"attn2.{d}" for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm3": "norm2",  # Wan's norm3 is the cross-attention norm, diffusers' norm2
    "modulation": "scale_shift_table",
}
TOP_NAMES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
LAYOUTS = ("wan", "diffusers")

_PAIR = re.compile(
    r"^(?P<path>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$"
)
_SINGLE = re.compile(r"^(?P<path>.+)\.(?P<kind>alpha|diff_b|diff_m|diff|dora_scale)$")
_DOWN, _UP = ("lora_A", "lora_down"), ("lora_B", "lora_up")
_I2V_MARKS = ("k_img", "v_img", "img_emb", "norm_k_img")


class LoraKeyError(ValueError):
    """Keys of a LoRA file that name no layer of the base transformer, or that no layout explains."""


@dataclass(frozen=True)
class LoraKey:
    key: str  # as written in the file
    target: str  # the diffusers name of the module (or parameter, for ``scale_shift_table``) it changes
    part: str  # down | up | alpha | bias | diff


def split_key(key: str) -> tuple[str, str]:
    """``(module path without prefixes, part)``; raises ``LoraKeyError`` for a key that is no LoRA entry."""
    pair = _PAIR.match(key)
    if pair:
        kind, param = pair["kind"], pair["param"]
        if param == "bias" and kind in _DOWN:
            raise LoraKeyError(f"{key!r}: a bias on the down projection is not a LoRA update we can apply")
        part = "bias" if param == "bias" else ("down" if kind in _DOWN else "up")
        return strip_prefixes(pair["path"]), part
    single = _SINGLE.match(key)
    if single:
        if single["kind"] == "dora_scale":
            raise LoraKeyError(f"{key!r}: DoRA LoRAs (dora_scale) are not supported; use a plain LoRA")
        path = strip_prefixes(single["path"])
        if single["kind"] == "diff_m":  # a delta of the block's (or head's) modulation table, named on the block
            return f"{path}.modulation", "diff"
        return path, {"alpha": "alpha", "diff_b": "bias", "diff": "diff"}[single["kind"]]
    raise LoraKeyError(
        f"{key!r} is not a LoRA entry (expected .lora_A/.lora_B/.lora_down/.lora_up weights, .alpha, .diff, .diff_b)"
    )


def strip_prefixes(path: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if path.startswith(prefix):
                path, changed = path[len(prefix) :], True
    return path


def name_table(layout: str, num_blocks: int) -> dict[str, str]:
    """Every spelling of a module path in ``layout`` (dotted, and with underscores as kohya writes it) -> target."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown; choose one of {LAYOUTS}")
    pairs = [(o, d) for o, d in TOP_NAMES.items()]
    pairs += [(f"blocks.{i}.{o}", f"blocks.{i}.{d}") for i in range(num_blocks) for o, d in BLOCK_NAMES.items()]
    if layout == "diffusers":
        pairs = [(d, d) for _, d in pairs]
    table = {}
    for alias, target in pairs:
        table[alias] = target
        table[alias.replace(".", "_")] = target
    return table


def map_keys(keys: Iterable[str], num_blocks: int, where: str = "LoRA") -> tuple[str, list[LoraKey]]:
    """``(layout, one LoraKey per key)`` for a file's keys against a base of ``num_blocks`` blocks."""
    try:
        split = [(key, *split_key(key)) for key in keys if key != "__metadata__"]
    except LoraKeyError as exc:
        raise LoraKeyError(f"{where}: {exc}") from None
    if not split:
        raise LoraKeyError(f"{where}: the file holds no tensors")
    best: tuple[str, list[str]] | None = None
    for layout in LAYOUTS:
        table = name_table(layout, num_blocks)
        unknown = sorted({path for _, path, _ in split if path not in table})
        if not unknown:
            return layout, [LoraKey(key, table[path], part) for key, path, part in split]
        if best is None or len(unknown) < len(best[1]):
            best = (layout, unknown)
    assert best is not None
    raise LoraKeyError(f"{where}: {explain_unknown(best[1], num_blocks)}")


def explain_unknown(paths: list[str], num_blocks: int) -> str:
    """What the unknown module paths say about the file (an I2V LoRA, another base size) and the fix."""
    shown = ", ".join(repr(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    message = f"{len(paths)} layer(s) are not in the Wan2.1-T2V transformer Lynx runs on: {shown}"
    if any(mark in p for p in paths for mark in _I2V_MARKS):
        return message + "; this is an image-to-video (Wan2.1-I2V) LoRA: use a LoRA trained on Wan2.1-T2V"
    blocks = [int(m.group(1)) for p in paths if (m := re.match(r"blocks[._](\d+)[._]", p))]
    if blocks and max(blocks) >= num_blocks:
        return (
            message + f"; it has blocks up to {max(blocks)}, the base {num_blocks} (0..{num_blocks - 1}): a LoRA for "
            "another Wan size (14B has 40 blocks, 1.3B 30)"
        )
    return message + "; is this a LoRA for Wan2.1-T2V (diffusers, Wan or kohya key layout)?"
