"""``lynx``: the farm backend for Lynx full and lite (``model.variant``), on our implementation in this package.

Weights (``model.weights``): ``base`` (a ``Wan2.1-T2V-14B-Diffusers`` folder), ``adapter`` (``lynx_full`` or
``lynx_lite``), ``arcface`` (facexlib's ``recognition_arcface_ir_se50.pth``: the face embedder Lynx was trained on),
``face_pack`` (an insightface model pack: the SCRFD detector, and the fallback ArcFace when ``arcface`` is not given,
L2-normalised with a warning: identity conditioning is then not the official one); each a local path or fsspec URI
(remote files and folders are fetched once per node into a verified cache). ``face_pack`` may be left out when
``arcface`` is given and ``face_detector`` is ``dlib``. ``dtype``: auto = bf16 on GPU, fp32 on CPU; fp32 on a GPU
turns TF32 off in the replica (matmuls and cuDNN convolutions), so fp32 frames are fp32 frames.

LoRAs (``model.weights.lora``: a list of ``{path, scale: 1.0, fuse: true}``): Wan2.1-T2V LoRAs in the diffusers, Wan
(e.g. the 4-step distilled LoRAs) or kohya key layouts, applied in order once per replica before anything runs
(``lora.py``). With a CFG-distilled LoRA, ``guidance_scale: 1.0`` makes each step one transformer pass.

Options (``model.options``), all optional:

* ``face_detector``: ``insightface`` (default, the pack's detector, as the official code) or ``dlib``.
* ``batch_guidance`` (default true): run the 2-3 guidance passes as one batched forward (same numbers, more memory).
* ``schedule``: ``official`` (default; diffusers 0.33.1's UniPC sigmas, as the official code ran) or ``diffusers``.
* ``sampler``: ``unipc`` (default, official), ``euler`` or ``distill`` (the sampler step-distilled LoRAs were trained
  for); ``flow_shift``: the sigma shift (default: the base's scheduler config, 3.0; distilled LoRAs: 5.0). Both
  change the frames (``samplers.py``).
* ``cpu_offload`` (default false): keep the text encoder on the CPU and stream the transformer's blocks to the GPU
  (diffusers group offloading) for GPUs under 80 GB. ``vae_tiling`` (default false): tiled VAE decode.
* ``step_cache``: a FirstBlockCache threshold (e.g. 0.05). Opt-in; it CHANGES the frames (skips blocks when the
  first block's residual barely moves), so fidelity to the official code no longer holds.
* ``attention_backend``: a diffusers attention-dispatch name for every attention, ours included (``native`` =
  PyTorch SDPA's own choice, the default; ``_native_cudnn``, ``_native_flash``, ``_native_efficient``; ``flash``,
  ``sage``, ``xformers`` need their package on the workers). Unknown names fail when the job is validated.
* ``compile`` (default false): ``torch.compile`` the transformer's repeated blocks once per replica (the first video
  pays the compilation; each kind of pass compiles one graph, shared by all 40 blocks). A new ``ip_scale`` or
  ``ref_scale`` value compiles once more (dynamo specialises on Python floats).
* ``quantize``: ``fp8`` (torchao float8 dynamic quantization of the transformer blocks' linear layers; opt-in, it
  CHANGES the frames; needs bf16, compute capability >= 8.9 (H100/H200) and ``torchao`` on the workers: a replica on
  other hardware fails at start with the reason, before loading weights; ``quantize.py``).
* ``prompt_cache_size`` (64), ``subject_cache_size`` (64), ``ref_cache_size`` (8): the per-replica LRU caches
  (lossless reuse; a 14B bf16 reference buffer is ~105 MB of GPU memory, two per portrait and seed).
* ``safety_classifier``: ``"module:attr"`` of a callable ``frames (F,H,W,3) float32 -> bool`` (True = blocked), or
  of a factory called with ``safety_model`` (a user-supplied model path/URI) that returns such a callable. Blocked
  rows fail with ``error_code=safety_blocked`` (never silently dropped). Off unless configured.
* ``storage_options``: fsspec options for remote weights (the job's ``storage_options`` are used when set).

Guidance across GPUs: a replica given 2 or 3 GPUs (``resources.gpus_per_replica``) holds a transformer copy on each
and runs a step's guidance passes on them at the same time (``multi_gpu.py``): less time per video, not more videos
per GPU. A 4th GPU would idle. Not with ``cpu_offload`` or ``step_cache``.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from farm.models.base import Backend
from farm.models.lynx.api import default_params, resolve_dtype
from farm.models.lynx.execution import check_attention_backend
from farm.models.lynx.face import LynxSubject, face_models, subject_from_image
from farm.models.lynx.pipeline import OFFICIAL_NEGATIVE_PROMPT, Options
from farm.models.lynx.quantize import check_quantize
from farm.models.lynx.samplers import check_sampler
from farm.models.lynx.weights import safetensors_header
from farm.params import SamplingParams
from farm.records import ErrorCode, RowError
from farm.types import GenerationRequest

log = logging.getLogger("farm")

KNOWN_OPTIONS = frozenset(
    {
        "face_detector",
        "batch_guidance",
        "schedule",
        "sampler",
        "flow_shift",
        "cpu_offload",
        "vae_tiling",
        "step_cache",
        "attention_backend",
        "compile",
        "quantize",
        "prompt_cache_size",
        "subject_cache_size",
        "ref_cache_size",
        "safety_classifier",
        "safety_model",
        "storage_options",
    }
)


def load_safety_classifier(target: str, model: str | None):
    """Resolve ``module:attr``; with a ``model`` the attribute is a factory taking it."""
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ValueError(f"safety_classifier={target!r} must look like 'package.module:callable'")
    obj = getattr(importlib.import_module(module), attr)
    return obj(model) if model is not None else obj


class LynxBackend(Backend):
    name = "lynx"
    TAKES_LORAS = True
    OPTIONS = KNOWN_OPTIONS
    SPEED_OPTIONS = frozenset(
        {
            "batch_guidance",
            "attention_backend",
            "compile",
            "cpu_offload",
            "prompt_cache_size",
            "subject_cache_size",
            "ref_cache_size",
        }
    )

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.variant = spec.variant or "full"
        if self.variant not in ("full", "lite"):
            raise ValueError(f"lynx variant {self.variant!r} is unknown; choose 'full' or 'lite'")
        for role in ("base", "adapter"):
            if role not in spec.weights:
                raise ValueError(f"lynx needs model.weights.{role} (see the README's Lynx section)")
        check_sampler(
            str(spec.options.get("sampler", "unipc")),
            str(spec.options.get("schedule", "official")),
            spec.options.get("flow_shift"),
        )
        if spec.options.get("attention_backend") is not None:
            check_attention_backend(spec.options["attention_backend"])
        if not isinstance(spec.options.get("compile", False), bool):
            raise ValueError(f"lynx option compile={spec.options['compile']!r} must be true or false")
        self.quantize = check_quantize(spec.options.get("quantize"))
        if self.quantize and spec.dtype not in ("auto", "bf16"):
            raise ValueError(f"lynx option quantize: {self.quantize} needs dtype bf16 (or auto), not {spec.dtype!r}")
        self.pipeline = None
        self._face = None
        self._safety = None

    # ------------------------------------------------------------------ declared
    def default_params(self) -> SamplingParams:
        return default_params(self.variant)

    def default_negative_prompt(self) -> str:
        return OFFICIAL_NEGATIVE_PROMPT

    def describe(self) -> str:
        return f"Lynx {self.variant} (Wan2.1-T2V-14B)"

    def check_weights(self, deep: bool = False) -> list[str]:
        """Every weights role exists and holds what the loader needs (``precheck.py``; deep: safetensors headers and
        the adapter's layers against the variant), without loading anything."""
        from farm.models.lynx.precheck import check_loras, check_lynx_weights

        detector = str(self._option("face_detector", "insightface"))
        options = self._storage_options()
        problems = check_lynx_weights(dict(self.spec.weights), self.variant, detector, options, deep)
        return problems + check_loras(self.spec.loras, dict(self.spec.weights), options, deep)

    def approximations(self) -> list[str]:
        """What makes these videos differ from the official Lynx inference (each opt-in)."""
        options = self.spec.options
        found = [f"LoRA {lora.path} at scale {lora.scale:g}" for lora in self.spec.loras if lora.scale != 0]
        if options.get("sampler", "unipc") != "unipc":
            found.append(f"sampler {options['sampler']}")
        if options.get("schedule", "official") != "official":
            found.append(f"schedule {options['schedule']}")
        if options.get("flow_shift") is not None:
            found.append(f"flow_shift {options['flow_shift']}")
        if self.quantize:
            found.append(f"quantize {self.quantize}")
        if options.get("step_cache") is not None:
            found.append(f"step_cache {options['step_cache']}")
        if str(options.get("attention_backend") or "").lower().startswith("sage"):
            found.append(f"attention_backend {options['attention_backend']} (8-bit attention)")
        return found

    def _option(self, name: str, default: Any) -> Any:
        return self.spec.options.get(name, default)

    def _storage_options(self) -> dict[str, Any] | None:
        """The job's storage options (``ModelSpec.storage_options``), or ``options.storage_options``."""
        return getattr(self.spec, "storage_options", None) or self._option("storage_options", None)

    # ------------------------------------------------------------------ per replica
    def setup(self, device: str) -> None:
        from farm.models.lynx.pipeline import LynxPipeline
        from farm.models.lynx.quantize import fp8_support

        self.device = device
        if self.quantize and (reason := fp8_support(device)):
            raise RuntimeError(reason)  # before 30 GB of weights load onto a GPU that cannot run it
        offload = bool(self._option("cpu_offload", False)) and device.startswith("cuda")
        extra_gpus = self._guidance_devices(device, offload)
        model = self._load_model(device, offload)
        self.pipeline = LynxPipeline(model, self._pipeline_options(extra_gpus))
        target = self._option("safety_classifier", None)
        if target:
            self._safety = load_safety_classifier(target, self._option("safety_model", None))

    def _load_model(self, device: str, offload: bool):
        """The weights on ``device`` (the transformer streamed from the CPU with ``offload``), changed by the LoRAs,
        then quantized: offloading, compiling and quantizing all see the LoRAs' weights."""
        from farm.models.lynx.loader import apply_cpu_offload, load_lynx
        from farm.models.lynx.quantize import apply_fp8

        model = load_lynx(
            self.spec.weights["base"],
            self.spec.weights["adapter"],
            self.variant,
            dtype=resolve_dtype(self.spec.dtype, device),
            device="cpu" if offload else device,
            storage_options=self._storage_options(),
        )
        if self.spec.loras:
            from farm.models.lynx.lora import load_loras

            load_loras(model.transformer, self.spec.loras, self._storage_options())
        if self.quantize:  # the only mode, fp8; setup checked the device before anything loaded
            apply_fp8(model.transformer)
        if offload:
            apply_cpu_offload(model, device)
        if self._option("vae_tiling", False):
            model.vae.enable_tiling()
        return model

    def _pipeline_options(self, extra_gpus: list[str]) -> Options:
        return Options(
            batch_guidance=bool(self._option("batch_guidance", True)),
            schedule=str(self._option("schedule", "official")),
            sampler=str(self._option("sampler", "unipc")),
            flow_shift=self._option("flow_shift", None),
            step_cache=self._option("step_cache", None),
            prompt_cache_size=int(self._option("prompt_cache_size", 64)),
            subject_cache_size=int(self._option("subject_cache_size", 64)),
            ref_cache_size=int(self._option("ref_cache_size", 8)),
            attention_backend=self._option("attention_backend", None),
            compile=bool(self._option("compile", False)),
            guidance_devices=tuple(extra_gpus),
        )

    def _guidance_devices(self, device: str, offload: bool) -> list[str]:
        """The replica's other GPUs (``resources.gpus_per_replica`` 2 or 3), for guidance passes 2 and 3."""
        from farm.models.lynx.multi_gpu import guidance_devices

        extra = guidance_devices(device)
        if extra and offload:
            raise ValueError("cpu_offload streams one transformer copy: drop it, or use gpus_per_replica: 1")
        if extra:
            log.info("lynx: guidance passes on %s and %s", device, ", ".join(extra))
        return extra

    def fingerprint(self) -> str:
        """Digest of the checkpoint's structure: safetensors headers, sizes and configs (cheap even for 14B)."""
        if self.pipeline is None:
            return ""
        model = self.pipeline.model
        digest = hashlib.sha256(self.variant.encode())
        for folder in (model.base_dir, model.adapter_dir):
            for path in sorted(Path(folder).rglob("*")):
                if not path.is_file() or path.name.startswith("."):
                    continue
                digest.update(str(path.relative_to(folder)).encode() + str(path.stat().st_size).encode())
                if path.suffix == ".safetensors":
                    digest.update(safetensors_header(path))
                elif path.suffix == ".json":
                    digest.update(path.read_bytes())
        # The face embedding conditions every frame: name the embedder (and the official file's bytes).
        arcface = self.spec.weights.get("arcface")
        if arcface:
            from farm.models.lynx.arcface import irse50_embedder

            options = self._storage_options()
            embedder = irse50_embedder(arcface, json.dumps(options, sort_keys=True) if options else None)
            digest.update(b"face:irse50@" + embedder.fingerprint().encode())
        else:
            digest.update(b"face:pack-arcface-unit")
        for lora in self.spec.loras:
            digest.update(f"lora:{self._lora_fingerprint(lora.path)}:{lora.scale!r}".encode())
        return digest.hexdigest()[:16]

    def _lora_fingerprint(self, uri: str) -> str:
        from farm.models.lynx.lora import file_fingerprint
        from farm.models.lynx.weights import local_file

        return file_fingerprint(local_file(uri, self._storage_options(), role="weights.lora"))

    def _face_models(self):
        """(detector, embedder), loaded on first use: CPU workers call ``prepare_subject`` without ``setup``."""
        if self._face is None:
            storage_options = self._storage_options()
            key = json.dumps(storage_options, sort_keys=True) if storage_options else None
            self._face = face_models(
                self.spec.weights.get("face_pack"),
                str(self._option("face_detector", "insightface")),
                key,
                self.spec.weights.get("arcface"),
            )
        return self._face

    def prepare_subject(self, image: np.ndarray) -> LynxSubject:
        detector, embedder = self._face_models()
        return subject_from_image(image, detector, embedder)

    def generate(self, subject: LynxSubject, request: GenerationRequest) -> np.ndarray:
        if self.pipeline is None:
            raise RuntimeError("LynxBackend.generate called before setup(device)")
        return self.pipeline.generate(
            subject.embedding,
            subject.aligned_face,
            request.prompt,
            request.negative_prompt,
            request.params,
            request.seed,
        )

    def postprocess(self, frames: np.ndarray, request: GenerationRequest) -> np.ndarray:
        if self._safety is not None and bool(self._safety(frames)):
            raise RowError(ErrorCode.SAFETY_BLOCKED, "the configured safety classifier blocked this video")
        return frames

    def teardown(self) -> None:
        self.pipeline = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
