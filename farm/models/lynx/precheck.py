"""Check a Lynx checkpoint before any GPU time, without loading it or importing torch (``LynxBackend.check_weights``).

Shallow: every weights role points at something that exists (a misspelled folder gets a did-you-mean from its
siblings) and holds the files the loader needs (``layout.py``, the loader's own rules; shard indexes are followed).
Deep: every ``.safetensors`` header is read (8-byte length + JSON, two range reads, remote too) and checked against
the file's size (a truncated file), and the adapter's key structure is checked against the variant and the base
transformer's config (the other variant's adapter, an adapter for another base). Each problem is one line naming
the role, the URI, what is wrong and the fix.
"""

from __future__ import annotations

import difflib
import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any

from farm import storage
from farm.models.lynx.layout import (
    ADAPTER_CONFIG,
    ADAPTER_DIRS,
    IP_FILE,
    IP_INTERVAL,
    REF_FILE,
    RESAMPLER_FILE,
    adapter_files,
    missing_base_files,
    missing_shards,
)

MAX_DEPTH = 3  # a base folder is two levels deep; a misplaced root should not list a whole bucket
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2}
DTYPE_BYTES |= {"I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class HeaderError(ValueError):
    """A safetensors file whose header cannot be read or does not match the file."""


@dataclass(frozen=True)
class Folder:
    """A weights folder as listed once: its URI and every file under it (relative path -> size in bytes)."""

    uri: str
    files: dict[str, int]

    def file_uri(self, name: str) -> str:
        return storage.join(self.uri, name)


def _fix(role: str) -> str:
    return f"fix model.weights.{role} in the job spec"


def did_you_mean(uri: str, storage_options: dict[str, Any] | None) -> str:
    """`` (did you mean '<sibling>'?)`` when the parent folder holds a close name, else ``""``."""
    parent, name = posixpath.split(uri.rstrip("/"))
    try:
        fs, path = storage.get_fs(parent, storage_options)
        siblings = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except Exception:  # noqa: BLE001 - no parent to list: no suggestion
        return ""
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    return f" (did you mean {storage.join(parent, close[0])!r}?)" if close else ""


def list_folder(role: str, uri: str, storage_options: dict[str, Any] | None) -> Folder | str:
    """The folder at ``uri``, or the problem that it is missing / not a folder / unreadable."""
    try:
        fs, path = storage.get_fs(uri, storage_options)
        if not fs.isdir(path):
            what = "is a file, not a folder" if fs.exists(path) else "does not exist"
            return f"weights.{role}: {uri!r} {what}{did_you_mean(uri, storage_options)}; {_fix(role)}"
        root = path.rstrip("/") + "/"
        found = fs.find(path, maxdepth=MAX_DEPTH, detail=True)
    except Exception as exc:  # noqa: BLE001 - a storage fault is a finding, not a traceback
        return f"weights.{role}: cannot list {uri!r} ({type(exc).__name__}: {exc}); check the URI and credentials"
    files = {name[len(root) :]: int(info.get("size") or 0) for name, info in found.items() if name.startswith(root)}
    return Folder(uri, files)


def check_base(folder: Folder, storage_options: dict[str, Any] | None) -> list[str]:
    problems = [
        f"weights.base: {folder.file_uri(name)!r} is missing (the Wan2.1-T2V-14B-Diffusers layout needs "
        f"{name.rstrip('/')}){_part_hint(folder, name)}; point weights.base at the complete Diffusers folder"
        for name in missing_base_files(folder.files)
    ]
    for index in (n for n in folder.files if n.endswith(".safetensors.index.json")):
        part = posixpath.dirname(index)
        in_part = [posixpath.relpath(n, part) for n in folder.files if posixpath.dirname(n) == part]
        try:
            shards = missing_shards(storage.read_bytes(folder.file_uri(index), storage_options).decode(), in_part)
        except (OSError, ValueError) as exc:
            problems.append(f"weights.base: cannot read the shard index {folder.file_uri(index)!r} ({exc})")
            continue
        problems.extend(
            f"weights.base: shard {folder.file_uri(posixpath.join(part, s))!r} named by {index} is missing; "
            "download the complete checkpoint again"
            for s in shards
        )
    return problems


def _part_hint(folder: Folder, name: str) -> str:
    """A did-you-mean for a misspelled part folder (``transfomer/`` -> ``transformer/``)."""
    if not name.endswith("/"):
        return ""
    parts = sorted({n.split("/", 1)[0] for n in folder.files if "/" in n})
    close = difflib.get_close_matches(name.rstrip("/"), parts, n=1, cutoff=0.6)
    return f" (a folder {close[0]!r} is there: misspelled?)" if close else ""


def check_adapter(folder: Folder, variant: str, storage_options: dict[str, Any] | None) -> list[str]:
    problems = []
    for name in adapter_files(variant):
        if name not in folder.files:
            problems.append(
                f"weights.adapter: {folder.file_uri(name)!r} is missing (Lynx {variant} needs {name}); point "
                f"weights.adapter at the {ADAPTER_DIRS[variant]} folder"
            )
    declared = _adapter_config(folder, storage_options).get("variant", variant)
    if declared != variant:
        problems.append(
            f"weights.adapter: {folder.file_uri(ADAPTER_CONFIG)!r} says variant={declared!r} but model.variant is "
            f"{variant!r}; point weights.adapter at the {ADAPTER_DIRS[variant]} folder or set model.variant"
        )
    return problems


def _adapter_config(folder: Folder, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    if ADAPTER_CONFIG not in folder.files:
        return {}
    try:
        data = json.loads(storage.read_bytes(folder.file_uri(ADAPTER_CONFIG), storage_options))
    except (OSError, ValueError):
        return {}  # the loader names a broken config file; the pre-flight only reads what it can
    return data if isinstance(data, dict) else {}


def check_file(role: str, uri: str, storage_options: dict[str, Any] | None) -> str | None:
    try:
        fs, path = storage.get_fs(uri, storage_options)
        if fs.isfile(path):
            return None
        what = "is a folder, not a file" if fs.exists(path) else "does not exist"
    except Exception as exc:  # noqa: BLE001
        return f"weights.{role}: cannot check {uri!r} ({type(exc).__name__}: {exc}); check the URI and credentials"
    return f"weights.{role}: {uri!r} {what}{did_you_mean(uri, storage_options)}; {_fix(role)}"


def check_face_pack(uri: str, storage_options: dict[str, Any] | None) -> str | None:
    """An insightface pack: a folder with ``.onnx`` files (maybe one level down) or a zip of one."""
    if uri.endswith(".zip"):
        return check_file("face_pack", uri, storage_options)
    folder = list_folder("face_pack", uri, storage_options)
    if isinstance(folder, str):
        return folder
    if not any(n.endswith(".onnx") for n in folder.files):
        return f"weights.face_pack: no .onnx files under {uri!r}; point it at an insightface model pack folder"
    return None


# ------------------------------------------------------------------ deep: safetensors headers
def read_header(uri: str, size: int, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """A safetensors header (two range reads), checked against the file size: every tensor's bytes must lie in the
    file and match its dtype and shape."""
    fs, path = storage.get_fs(uri, storage_options)
    if size < 8:
        raise HeaderError(f"{uri!r} has {size} bytes, too short for a safetensors header")
    length = int.from_bytes(fs.cat_file(path, start=0, end=8), "little")
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise HeaderError(
            f"{uri!r}: the header says {length} bytes but the file has {size}: truncated or not safetensors"
        )
    try:
        header = json.loads(fs.cat_file(path, start=8, end=8 + length))
    except ValueError as exc:
        raise HeaderError(f"{uri!r}: the header is not valid JSON ({exc}): truncated or not safetensors") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{uri!r}: the header is not a JSON object")
    header.pop("__metadata__", None)
    _check_offsets(uri, header, size - 8 - length)
    return header


def _check_offsets(uri: str, header: dict[str, Any], data_bytes: int) -> None:
    end = 0
    for key, entry in header.items():
        try:
            start, stop = (int(x) for x in entry["data_offsets"])
            expected = math.prod(int(d) for d in entry["shape"]) * DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"{uri!r}: tensor {key!r} has a malformed entry {entry!r}") from None
        if stop - start != expected:
            need = f"its shape and dtype need {expected}"
            raise HeaderError(f"{uri!r}: tensor {key!r} spans {stop - start} bytes, {need}")
        end = max(end, stop)
    if end > data_bytes:
        raise HeaderError(f"{uri!r}: tensors need {end} data bytes, the file holds {data_bytes}: truncated")


def deep_problems(role: str, folder: Folder, storage_options: dict[str, Any] | None) -> tuple[list[str], dict]:
    """Read every safetensors header of a folder; returns (problems, name -> header of the readable ones)."""
    problems, headers = [], {}
    for name, size in sorted(folder.files.items()):
        if not name.endswith(".safetensors"):
            continue
        try:
            headers[name] = read_header(folder.file_uri(name), size, storage_options)
        except HeaderError as exc:
            problems.append(f"weights.{role}: {exc}; download the file again")
        except Exception as exc:  # noqa: BLE001 - a storage fault while reading
            problems.append(f"weights.{role}: cannot read {folder.file_uri(name)!r} ({type(exc).__name__}: {exc})")
    return problems, headers


def adapter_structure(
    adapter: Folder, headers: dict[str, dict], variant: str, transformer: dict[str, Any], interval: int
) -> list[str]:
    """The adapter's layers against the variant and the base transformer: ID layers on every ``interval``-th block,
    a Ref layer per block for full, widths that fit the transformer; tensors in a float dtype."""
    problems = []
    blocks = int(transformer.get("num_layers", 0))
    width = int(transformer.get("num_attention_heads", 0)) * int(transformer.get("attention_head_dim", 0))
    where = f"weights.adapter {adapter.uri!r}"
    other = "lite" if variant == "full" else "full"
    ip = headers.get(IP_FILE)
    if ip is not None and blocks:
        layers = {k.split(".", 1)[0] for k in ip if k.endswith(".to_k_ip.weight")}
        wanted = len(range(0, blocks, interval))
        every = "every block" if interval == 1 else f"one every {interval} blocks"
        if len(layers) != wanted:
            problems.append(
                f"{where}: {IP_FILE} has ID layers for {len(layers)} blocks, Lynx {variant} on this {blocks}-block "
                f"base needs {wanted} ({every}); is this the "
                f"{ADAPTER_DIRS[other]} adapter? point weights.adapter at {ADAPTER_DIRS[variant]} or set "
                f"model.variant: {other}"
            )
        shape = tuple(ip.get("0.to_k_ip.weight", {}).get("shape", ()))
        if width and shape and shape[0] != width:
            problems.append(f"{where}: {IP_FILE} layers are {shape[0]} wide, the base transformer {width}: wrong base?")
    ref = headers.get(REF_FILE)
    if variant == "full" and ref is not None and blocks:
        layers = {k.split(".", 1)[0] for k in ref}
        if len(layers) != blocks:
            problems.append(f"{where}: {REF_FILE} has {len(layers)} layers, the base transformer {blocks} blocks")
    for name in (RESAMPLER_FILE, IP_FILE, REF_FILE):
        odd = sorted({e["dtype"] for e in headers.get(name, {}).values()} - FLOAT_DTYPES)
        if odd:
            problems.append(f"{where}: {name} holds {odd} tensors, adapter weights are floating point")
    return problems


def check_arcface_file(uri: str, storage_options: dict[str, Any] | None) -> str | None:
    """``recognition_arcface_ir_se50.pth`` is a torch zip archive: its first bytes are ``PK``."""
    try:
        fs, path = storage.get_fs(uri, storage_options)
        magic = fs.cat_file(path, start=0, end=2)
    except Exception as exc:  # noqa: BLE001
        return f"weights.arcface: cannot read {uri!r} ({type(exc).__name__}: {exc})"
    if magic != b"PK":
        return f"weights.arcface: {uri!r} is not a torch checkpoint (zip archive); download the file again"
    return None


def read_transformer_config(base: Folder, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    try:
        data = json.loads(storage.read_bytes(base.file_uri("transformer/config.json"), storage_options))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def ip_interval(adapter: Folder, variant: str, storage_options: dict[str, Any] | None) -> int:
    return int(_adapter_config(adapter, storage_options).get("ip_interval", IP_INTERVAL[variant]))


# ------------------------------------------------------------------ the whole checkpoint
def check_lynx_weights(
    weights: dict[str, str],
    variant: str,
    face_detector: str = "insightface",
    storage_options: dict[str, Any] | None = None,
    deep: bool = False,
) -> list[str]:
    """Every problem of a Lynx job's ``model.weights`` (base, adapter, arcface, face_pack); empty = loadable."""
    problems: list[str] = []
    folders: dict[str, Folder] = {}
    for role in ("base", "adapter"):
        if role not in weights:
            problems.append(f"weights.{role} is not set; Lynx needs it (see the README's Lynx section)")
            continue
        folder = list_folder(role, weights[role], storage_options)
        if isinstance(folder, str):
            problems.append(folder)
            continue
        folders[role] = folder
        check = check_base if role == "base" else lambda f, so: check_adapter(f, variant, so)
        problems.extend(check(folder, storage_options))
    problems.extend(_face_problems(weights, face_detector, storage_options, deep))
    if deep:
        problems.extend(_deep(folders, variant, storage_options))
    return problems


def _face_problems(
    weights: dict[str, str], face_detector: str, storage_options: dict[str, Any] | None, deep: bool
) -> list[str]:
    arcface, pack = weights.get("arcface"), weights.get("face_pack")
    found = []
    if arcface:
        found.append(check_file("arcface", arcface, storage_options))
        if deep and found[-1] is None:
            found.append(check_arcface_file(arcface, storage_options))
    if face_detector == "insightface" or not arcface:
        if not pack:
            need = "its face detector" if face_detector == "insightface" else "its ArcFace (or give weights.arcface)"
            found.append(f"weights.face_pack is not set; Lynx needs an insightface pack for {need}")
        else:
            found.append(check_face_pack(pack, storage_options))
    return [p for p in found if p]


def _deep(folders: dict[str, Folder], variant: str, storage_options: dict[str, Any] | None) -> list[str]:
    problems, headers = [], {}
    for role, folder in folders.items():
        found, headers[role] = deep_problems(role, folder, storage_options)
        problems.extend(found)
    if "base" in folders and "adapter" in folders:
        transformer = read_transformer_config(folders["base"], storage_options)
        interval = ip_interval(folders["adapter"], variant, storage_options)
        problems.extend(adapter_structure(folders["adapter"], headers["adapter"], variant, transformer, interval))
    return problems


# ------------------------------------------------------------------ LoRAs
def check_loras(
    loras, weights: dict[str, str], storage_options: dict[str, Any] | None = None, deep: bool = False
) -> list[str]:
    """Every ``model.weights.lora`` entry is a ``.safetensors`` file; deep: its keys name layers of the base."""
    problems = []
    blocks = _base_blocks(weights.get("base"), storage_options) if deep and loras else None
    for index, lora in enumerate(loras):
        role = f"lora[{index}]"
        if not lora.path.endswith(".safetensors"):
            problems.append(f"weights.{role}: {lora.path!r} is not a .safetensors file; LoRAs are read as safetensors")
            continue
        problem = check_file(role, lora.path, storage_options)
        if problem is None and deep:
            problem = _lora_keys_problem(role, lora.path, blocks, storage_options)
        if problem:
            problems.append(problem)
    return problems


def _base_blocks(base: str | None, storage_options: dict[str, Any] | None) -> int | None:
    """The base transformer's block count, or None when its config cannot be read (the base's own check says so)."""
    config = read_transformer_config(Folder(base, {}), storage_options) if base else {}
    return int(config["num_layers"]) if "num_layers" in config else None


def _lora_keys_problem(role: str, uri: str, blocks: int | None, storage_options: dict[str, Any] | None) -> str | None:
    from farm.models.lynx.lora_keys import LoraKeyError, map_keys

    try:
        fs, path = storage.get_fs(uri, storage_options)
        header = read_header(uri, int(fs.size(path)), storage_options)
    except HeaderError as exc:
        return f"weights.{role}: {exc}; download the file again"
    except Exception as exc:  # noqa: BLE001 - a storage fault while reading
        return f"weights.{role}: cannot read {uri!r} ({type(exc).__name__}: {exc})"
    if blocks is None:
        return None  # the base's own check names a missing config
    try:
        map_keys(header, blocks, where=f"weights.{role} {uri!r}")
    except LoraKeyError as exc:
        return str(exc)
    return None
