"""What the official Lynx on-disk layout holds: one list of folders and file names for the loader and the pre-flight.

Torch-free on purpose: ``farm validate`` checks a checkpoint with it (``precheck.py``) without importing torch, and
the loader (``loader.py``) checks the folder it is about to load with the same rules, so the two never disagree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

VARIANTS = ("full", "lite")
BASE_PARTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # either one
ADAPTER_CONFIG = "lynx_adapter.json"
RESAMPLER_FILE = "resampler.safetensors"
IP_FILE = "ip_layers.safetensors"
REF_FILE = "ref_layers.safetensors"
ADAPTER_DIRS = {"full": "lynx_full", "lite": "lynx_lite"}  # the official README's folder names
IP_INTERVAL = {"full": 1, "lite": 2}  # ID-adapter on every block (full) or every 2nd block (lite)


def part_config(part: str) -> str:
    return "scheduler_config.json" if part == "scheduler" else "config.json"


def adapter_files(variant: str) -> tuple[str, ...]:
    """The adapter files a variant needs (full also has the Ref-adapter)."""
    return (RESAMPLER_FILE, IP_FILE) + ((REF_FILE,) if variant == "full" else ())


def missing_base_files(files: Iterable[str]) -> list[str]:
    """What a base folder lacks, as relative paths (a part folder as ``"vae/"``); ``files``: every file under it,
    relative and ``/``-separated. A part whose weights may have any shard name is reported by the official name."""
    by_part: dict[str, set[str]] = {}
    for name in files:
        part, _, rest = name.partition("/")
        if rest:
            by_part.setdefault(part, set()).add(rest)
    missing = []
    for part in BASE_PARTS:
        inside = by_part.get(part)
        if not inside:
            missing.append(f"{part}/")
        elif part == "tokenizer":
            if not inside & set(TOKENIZER_FILES):
                missing.append(f"{part}/{TOKENIZER_FILES[0]}")
        else:
            if part_config(part) not in inside:
                missing.append(f"{part}/{part_config(part)}")
            if part != "scheduler" and not any(n.endswith(".safetensors") and "/" not in n for n in inside):
                missing.append(f"{part}/diffusion_pytorch_model.safetensors")
    return missing


def missing_shards(index_text: str, files_in_part: Iterable[str]) -> list[str]:
    """The shard files a ``*.safetensors.index.json`` names that are not in the part folder."""
    names = set((json.loads(index_text).get("weight_map") or {}).values())
    return sorted(names - set(files_in_part))
