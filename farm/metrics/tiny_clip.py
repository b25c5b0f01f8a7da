"""A tiny random-weight CLIP in transformers' folder layout (the layout of ``openai/clip-vit-*`` on the Hub), for tests.

``write_tiny_clip(DIR, seed)`` writes ``config.json`` + ``model.safetensors`` (a 2-layer, 32-wide text and vision
tower on 32 px images), ``vocab.json`` + ``merges.txt`` (a byte-level BPE built here: the 256 byte symbols, their
end-of-word forms, a few merges and CLIP's two special tokens, in CLIP's id order), the tokenizer files transformers
writes from them, and ``preprocessor_config.json``. Nothing is downloaded; the scores mean nothing, but the folder
loads through the same code as real weights. Same seed, same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES = ("t h", "th e</w>", "a n", "o n</w>", "e r", "i n", "a t</w>", "o r")
IMAGE_SIZE = 32
# OpenAI CLIP's pixel statistics, as every official preprocessor_config.json carries them
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table (CLIP's BPE works on these), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's id order: bytes, bytes + ``</w>``, one token per merge, then the start and end tokens."""
    tokens = byte_symbols()
    tokens += [t + "</w>" for t in tokens]
    tokens += [m.replace(" ", "") for m in MERGES]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, list(MERGES)


def write_tiny_tokenizer(folder: Path) -> dict[str, int]:
    """``vocab.json`` + ``merges.txt`` as the Hub's CLIP folders have them, then what transformers saves from them."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}) + "\n")
    CLIPTokenizer.from_pretrained(str(folder), local_files_only=True).save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in ("is_local", "local_files_only")}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return vocab


def tiny_config(vocab: dict[str, int]):
    """A ``CLIPConfig`` with 2-layer, 32-wide towers and a 16-d projection."""
    from transformers import CLIPConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(
        common,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    vision = dict(common, image_size=IMAGE_SIZE, patch_size=8, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def write_preprocessor(folder: Path, size: int = IMAGE_SIZE) -> None:
    """The official preprocessor_config.json shape, at ``size`` (the tiny image size unless told)."""
    config = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny CLIP folder into ``directory`` (created if needed); returns it."""
    from transformers import CLIPModel

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(tiny_config(vocab))
    model.save_pretrained(str(folder), safe_serialization=True)
    write_preprocessor(folder)
    return folder
