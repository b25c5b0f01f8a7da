"""A tiny random-weight Lynx checkpoint in exactly the official on-disk layout, for tests, demos and fidelity runs.

``make_tiny_checkpoint(DIR, seed)`` writes::

    DIR/Wan2.1-T2V-14B-Diffusers/  model_index.json, tokenizer/ (sentencepiece unigram trained here, offline),
                     text_encoder/ (UMT5), vae/ (AutoencoderKLWan), transformer/, scheduler/
    DIR/lynx_full/   resampler.safetensors, ip_layers.safetensors (with registers), ref_layers.safetensors
    DIR/lynx_lite/   resampler.safetensors, ip_layers.safetensors (every 2nd block, no biases)
    DIR/insightface/ a tiny random-weight ArcFace (and detector) in insightface's format
    DIR/arcface/recognition_arcface_ir_se50.pth  the official face embedder's file: random weights in the exact
                     official key layout, on a small IR-SE (units 1,2,1,1; widths 16..32; still 512-d), ~3.4 MB

Same seed, same bytes. Sizes that no official file can tell (head split) go into ``lynx_adapter.json``, which
our loader reads and the official code ignores. One 64x96, 9-frame, 4-step video takes about a second on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from farm.models.lynx.loader import (
    ADAPTER_CONFIG,
    IP_FILE,
    REF_FILE,
    RESAMPLER_FILE,
    AdapterConfig,
    build_adapters,
    check_variant,
)
from farm.models.lynx.pipeline import OFFICIAL_NEGATIVE_PROMPT, REF_PROMPT
from farm.models.lynx.quiet import no_progress_bars

BASE_DIRNAME = "Wan2.1-T2V-14B-Diffusers"  # the official README's folder names: this, lynx_full, lynx_lite
ARCFACE_DIRNAME = "arcface"
TEXT_DIM = 32
HEADS = 2
HEAD_DIM = 16
LAYERS = 3
LITE_IP_DIM = 24

# Wan 2.1's scheduler config (flow-sigma UniPC, shift 3.0), as the official base folder ships it.
SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "WanPipeline",
    "_diffusers_version": "0.33.0.dev0",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}

CORPUS = [
    REF_PROMPT,
    OFFICIAL_NEGATIVE_PROMPT,
    "A woman in an orange flight suit walks along a beach at sunset, waves behind her, cinematic light.",
    "A woman smiles at her laptop in a bright modern office, handheld camera.",
    "A man drinks coffee in a cozy cafe and looks out of the window, soft morning light.",
    "A person laughs with friends at a party, warm light.",
    "A person holds a cup of coffee.",
    "A portrait of a person talking to the camera in a studio, close-up, natural light, smiling.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def write_tiny_tokenizer(folder: Path) -> int:
    """Train a sentencepiece unigram model offline (T5 ids: pad 0, eos 1, unk 2); save it as Wan's folder has it."""
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=160,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(buffer.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(str(folder), extra_ids=0)
    tokenizer.save_pretrained(str(folder))
    # The config the Wan folder ships (readable by older transformers too), not the one this version writes.
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        **special,
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
        "extra_ids": 0,
        "legacy": True,
        "model_max_length": 512,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True))
    return len(tokenizer)


# Config keys newer diffusers write with their default values; the official folders predate them.
NEWER_VAE_KEYS = (
    "decoder_base_dim",
    "in_channels",
    "is_residual",
    "out_channels",
    "patch_size",
    "scale_factor_spatial",
    "scale_factor_temporal",
)
NEWER_TRANSFORMER_KEYS = ("pos_embed_seq_len",)


def _drop_config_keys(folder: Path, keys: tuple[str, ...]) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in keys:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def tiny_text_config(vocab: int) -> dict:
    """``UMT5Config`` arguments of the tiny text encoder (width ``TEXT_DIM``)."""
    return dict(
        vocab_size=vocab,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def tiny_vae_config() -> dict:
    """``AutoencoderKLWan`` arguments of the tiny VAE (Wan's 16 latent channels, 8x spatial / 4x temporal)."""
    return dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[])


def tiny_transformer_config() -> dict:
    """``WanTransformer3DModel`` arguments of the tiny DiT (``LAYERS`` blocks of ``HEADS`` x ``HEAD_DIM``)."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=LAYERS,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )


def tiny_adapter_config(variant: str) -> AdapterConfig:
    """The tiny adapters: full with biases, 2 registers and a Ref-adapter; lite every 2nd block, no biases."""
    full = AdapterConfig(
        variant="full",
        resampler_dim=32,
        resampler_depth=2,
        resampler_dim_head=8,
        resampler_heads=4,
        resampler_queries=4,
        resampler_ff_mult=2,
        ip_dim=HEADS * HEAD_DIM,
        ip_interval=1,
        ip_bias=True,
        ip_registers=2,
        ref_adapter=True,
    )
    if check_variant(variant) == "full":
        return full
    return dataclasses.replace(
        full, variant="lite", ip_dim=LITE_IP_DIM, ip_interval=2, ip_bias=False, ip_registers=0, ref_adapter=False
    )


def _seeded(seed: int, part: int):
    torch.manual_seed(np.random.SeedSequence([seed, part]).generate_state(1)[0])


def _randomize(module: torch.nn.Module, seed: int, part: int, std_scale: float = 1.0) -> None:
    """Deterministic, non-zero random weights (the adapters' official init is zeros, which would test nothing)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, part]).generate_state(1)[0]))
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            fan_in = param.shape[-1] if param.ndim > 1 else param.shape[0]
            std = std_scale / max(fan_in, 1) ** 0.5
            if name.endswith("bias"):
                std *= 0.1
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def _save(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sorted(module.state_dict().items())}, str(path))


def make_tiny_checkpoint(
    directory: str | Path, seed: int = 0, with_insightface: bool = True, with_arcface: bool = True
) -> Path:
    """Write base + lynx_full + lynx_lite (+ a tiny insightface pack, + a tiny IR-SE ArcFace) under ``directory``."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    root = Path(directory)
    base = root / BASE_DIRNAME
    base.mkdir(parents=True, exist_ok=True)
    (base / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    vocab = write_tiny_tokenizer(base / "tokenizer")

    with torch.random.fork_rng(devices=[]), no_progress_bars():
        _seeded(seed, 1)
        encoder = UMT5EncoderModel(UMT5Config(**tiny_text_config(vocab)))
        encoder.save_pretrained(str(base / "text_encoder"))

        _seeded(seed, 2)
        vae = AutoencoderKLWan(**tiny_vae_config())
        vae.save_pretrained(str(base / "vae"))
        _drop_config_keys(base / "vae", NEWER_VAE_KEYS)

        _seeded(seed, 3)
        transformer = WanTransformer3DModel(**tiny_transformer_config())
        _randomize(transformer.blocks, seed, 4, std_scale=1.0)  # non-trivial norms, modulation and attention
        transformer.save_pretrained(str(base / "transformer"))
        _drop_config_keys(base / "transformer", NEWER_TRANSFORMER_KEYS)
    (base / "scheduler").mkdir(exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))

    variants = {variant: tiny_adapter_config(variant) for variant in ("full", "lite")}
    for index, (variant, config) in enumerate(variants.items()):
        folder = root / f"lynx_{variant}"
        folder.mkdir(parents=True, exist_ok=True)
        from farm.models.lynx.adapters import AdapterState

        resampler, ip_layers, ref_layers = build_adapters(transformer, config, AdapterState())
        _randomize(resampler, seed, 10 + index)
        _randomize(ip_layers, seed, 20 + index, std_scale=2.0)
        _save(resampler, folder / RESAMPLER_FILE)
        _save(ip_layers, folder / IP_FILE)
        if ref_layers is not None:
            _randomize(ref_layers, seed, 30 + index, std_scale=2.0)
            _save(ref_layers, folder / REF_FILE)
        (folder / ADAPTER_CONFIG).write_text(
            json.dumps({"variant": variant, "resampler_dim_head": config.resampler_dim_head}, indent=2)
        )
    if with_insightface:
        from farm.identity.tiny_pack import write_tiny_insightface_pack

        write_tiny_insightface_pack(root / "insightface", seed)
    if with_arcface:
        from farm.models.lynx.arcface import ARCFACE_FILE, write_tiny_irse50

        write_tiny_irse50(root / ARCFACE_DIRNAME / ARCFACE_FILE, seed)
    return root
