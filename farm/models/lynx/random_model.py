"""Random-weight Lynx models of any size, built in memory directly on their device, for GPU benchmarks.

The real sizes (Wan2.1-T2V-14B + the official adapters) need no 60 GB of files this way: random weights change no
shape and no kernel, so time and memory per step are those of the real model (the frames are noise). ``TINY`` runs
the same code on a CPU in seconds. Parameters diffusers keeps in float32 when it loads a checkpoint in bf16
(``_keep_in_fp32_modules``: norms, modulation tables, time embedder) are kept in float32 here too, so the kernels
match a real load. The text encoder is a one-layer UMT5 stand-in of the right width (prompt embeddings are computed
once per prompt and cached, so its size does not show in a step).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from farm.models.lynx import tiny
from farm.models.lynx.adapters import AdapterState
from farm.models.lynx.loader import AdapterConfig, LynxModel, build_adapters, check_variant

# Wan2.1-T2V-14B's transformer config (what its transformer/config.json says).
WAN_T2V_14B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
# A one-layer UMT5 with Wan's text width (4096); the vocabulary comes from the tiny tokenizer.
TEXT_STANDIN = dict(
    d_model=4096,
    d_kv=64,
    d_ff=1024,
    num_layers=1,
    num_heads=8,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


@dataclass(frozen=True)
class ModelSizes:
    """Everything that sizes a Lynx model; ``videos`` is each variant's benchmark video (frames, height, width)."""

    name: str
    transformer: dict
    vae: dict
    text: dict
    adapters: dict[str, AdapterConfig]
    videos: dict[str, tuple[int, int, int]] = field(default_factory=dict)


REAL = ModelSizes(
    name="14B",
    transformer=WAN_T2V_14B,
    vae={},  # AutoencoderKLWan's defaults are Wan 2.1's VAE
    text=TEXT_STANDIN,
    adapters={v: AdapterConfig.official(v) for v in ("full", "lite")},
    videos={"full": (81, 480, 832), "lite": (121, 480, 832)},  # the official scripts' defaults
)
TINY = ModelSizes(
    name="tiny",
    transformer=tiny.tiny_transformer_config(),
    vae=tiny.tiny_vae_config(),
    text={k: v for k, v in tiny.tiny_text_config(0).items() if k != "vocab_size"},
    adapters={v: tiny.tiny_adapter_config(v) for v in ("full", "lite")},
    videos={"full": (9, 64, 96), "lite": (9, 64, 96)},
)


def _keep_fp32(module: torch.nn.Module) -> None:
    """Put the parameters diffusers' loader keeps in float32 (by path component) back into float32."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, param in module.named_parameters():
            if keep & set(name.split(".")):
                param.data = param.data.float()


def build_random_lynx(
    variant: str,
    sizes: ModelSizes,
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
) -> LynxModel:
    """A ``LynxModel`` with random weights at ``sizes``, allocated on ``device`` in ``dtype`` (nothing read from disk
    but the tiny tokenizer, written to ``tokenizer_dir`` or a temporary folder when not given)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    check_variant(variant)
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else Path(tempfile.mkdtemp(prefix="lynx-tok-"))
    if not (folder / "spiece.model").is_file():
        tiny.write_tiny_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    device = torch.device(device)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = WanTransformer3DModel(**sizes.transformer)
            vae = AutoencoderKLWan(**sizes.vae)
            text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **sizes.text))
            state = AdapterState()
            resampler, _, _ = build_adapters(transformer, sizes.adapters[variant], state)
    finally:
        torch.set_default_dtype(previous)
    _keep_fp32(transformer)
    for module in (text_encoder, vae, transformer, resampler):
        module.eval().requires_grad_(False)
    return LynxModel(
        variant=variant,
        config=sizes.adapters[variant],
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=UniPCMultistepScheduler.from_config(tiny.SCHEDULER_CONFIG),
        resampler=resampler,
        state=state,
        dtype=dtype,
        device=device,
        base_dir=Path(f"<random {sizes.name} base, seed {seed}>"),
        adapter_dir=Path(f"<random {sizes.name} {variant} adapter, seed {seed}>"),
    )
