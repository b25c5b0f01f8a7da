"""How a replica's transformer runs on its device: the attention kernels, regional compilation, and float32 meaning
float32. Each is set once per replica (``LynxPipeline`` calls these) and none changes a weight.

* ``attention_backend``: a name from diffusers' attention dispatch (``native`` = PyTorch's SDPA, which picks its own
  kernel; ``_native_cudnn``, ``_native_flash``, ``_native_efficient``, ``_native_math`` force one of SDPA's kernels;
  ``flash``, ``sage``, ``xformers`` … need their package). Set on every attention processor of the transformer, our
  ID/Ref processors included (they call the same dispatch); diffusers also makes it the process's active backend.
  Backends that fetch kernels from a hub at run time are refused: replicas load code and weights from local files.
* ``compile``: diffusers' ``compile_repeated_blocks`` (``torch.compile`` of one ``WanTransformerBlock``, reused by all
  40), static shapes, so each kind of pass (reference record, guidance read) compiles once.
* fp32 on CUDA: PyTorch lets cuDNN convolutions (Wan's patch embedding, the whole VAE) use TF32 by default, which put
  fp32 frames 1.6e-3 from the CPU's on an H200 (tiny checkpoint); ``strict_fp32`` turns TF32 off for matmuls and
  convolutions: 2.7e-6 (benchmarks/results/lynx_gpu_h200.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

# Kernels downloaded from a hub when first used: not for replicas, which run offline from pinned local files.
_HUB_SUFFIX = "_hub"

log = logging.getLogger("farm")


def attention_backends() -> list[str]:
    """Every backend name diffusers' dispatch knows that a replica may select (hub-downloaded kernels excluded)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted(b.value for b in AttentionBackendName if not b.value.endswith(_HUB_SUFFIX))


def check_attention_backend(name: str) -> str:
    """``name`` lower-cased, or a ValueError naming it and the choices (before any model is loaded)."""
    known = attention_backends()
    value = str(name).lower()
    if value.endswith(_HUB_SUFFIX):
        raise ValueError(
            f"attention_backend={name!r} downloads its kernel from a hub at run time; install the kernel's package "
            f"and choose a local backend instead: {', '.join(known)}"
        )
    if value not in known:
        raise ValueError(f"attention_backend={name!r} is unknown; choose one of {', '.join(known)}")
    return value


def set_attention_backend(transformer: Any, name: str) -> None:
    """Route every attention of ``transformer`` (Wan's and our adapters') through diffusers' backend ``name``."""
    value = check_attention_backend(name)
    try:
        transformer.set_attention_backend(value)
    except (RuntimeError, ImportError) as exc:  # diffusers says which package is missing
        raise RuntimeError(f"attention_backend={name!r} cannot run here: {exc}") from exc


def compile_blocks(transformer: Any, backend: str = "inductor", mode: str | None = None) -> None:
    """``torch.compile`` the transformer's repeated blocks (one compiled graph shared by all of them).

    Static shapes (``dynamic=False``): the reference pass (batch 1, 256 tokens) and the guidance passes (batch 2-3,
    thousands of tokens) each get their own exact graph instead of one symbolic graph slower for both.
    """
    transformer.compile_repeated_blocks(backend=backend, mode=mode, fullgraph=True, dynamic=False)


def fp32_flags() -> dict[str, Any]:
    """The process's float32 precision settings (to restore them after a test or a benchmark)."""
    return {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
    }


def set_fp32_flags(flags: dict[str, Any]) -> None:
    """Apply what ``fp32_flags`` returned. Through the ``allow_tf32`` API on purpose: PyTorch >= 2.9 also has
    ``fp32_precision`` per backend, but once that is set the ``allow_tf32`` getters raise, and libraries read them."""
    torch.set_float32_matmul_precision(flags["matmul_precision"])
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_allow_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_allow_tf32"]


def strict_fp32(dtype: torch.dtype, device: str | torch.device) -> bool:
    """When the replica computes in float32 on CUDA, forbid TF32 in matmuls and cuDNN convolutions (PyTorch allows
    it in convolutions by default). Returns whether it applied.

    Other dtypes keep PyTorch's defaults: bf16/fp16 kernels never use TF32, and a float32 op inside a bf16 model
    (a norm, the scheduler) is left as PyTorch runs it.
    """
    if dtype != torch.float32 or torch.device(device).type != "cuda":
        return False
    set_fp32_flags({"matmul_allow_tf32": False, "cudnn_allow_tf32": False, "matmul_precision": "highest"})
    log.info("lynx: fp32 on %s: TF32 off for matmuls and cuDNN convolutions (process-wide)", device)
    return True
