"""Lynx at the GPU's limit: real-size full and lite models with random weights, built directly on the GPU, every
speed option side by side in one run, each with its numeric deviation from the default path on the same inputs.

    python benchmarks/bench_lynx_gpu.py --out DIR                 # a CUDA GPU: 14B full (81x480x832) + lite (121x...)
    python benchmarks/bench_lynx_gpu.py --tiny --out DIR          # the same code at tiny sizes on the CPU (smoke)
    bash benchmarks/gpu_session.sh                                # on a lent GPU machine (carried wheels, $OUT)

Per variant and option it reports: the warm-up step (first-call costs, compilation), the timed steps' median
seconds, analytic TFLOP per step (``farm.models.lynx.flops``) and MFU against ``--peak-tflops`` (default 790: dense
bf16 matrix products measured on this workplace's H100/H200), guidance passes per step, the VAE decode, the peak GPU
memory of the option (weights included), graphs compiled, and max/mean |delta| of the latents after the timed steps
and of the decoded frames against the default option. Steps are the first ``--warmup + --steps`` steps of a real
``--schedule``-step schedule. Random weights change no shape or kernel, so times and memory are the real model's;
the frames are noise.

Options (``OPTIONS``): the default (bf16, batched guidance, SDPA), forced attention kernels, unbatched guidance,
``compile`` (regional ``torch.compile``), and
  * ``fp8``: torchao float8 (per-row) of the transformer blocks' linears (``farm.models.lynx.quantize``), applied
    after the build; it changes the numbers (its Δ is the approximation). Needs bf16, compute capability >= 8.9
    (H100/H200) and torchao; elsewhere it is listed as not run with ``fp8_support``'s reason;
  * ``fp8+compile``: fp8, then compile; ``best``: sage attention + fp8 + compile, the best opt-in path without
    distillation (not run where diffusers' ``sage`` backend cannot: sageattention missing or too old);
  * ``lora-unfused``: the benchmark's random rank-64 LoRA beside the weights (side paths): an unfused LoRA's cost;
  * ``guidance-gpus``: guidance passes on up to 3 GPUs, a transformer copy each (``Options.guidance_devices``; full:
    3 passes on 3 GPUs); not run with fewer than 2 GPUs;
  * ``4-step lora`` (and ``4-step lora+compile``): the 4-step LoRA path. A random rank-64 LoRA in the Wan key layout
    (self/cross-attention q, k, v, o, ffn.0, ffn.2 of every block) is written to a temporary .safetensors at the
    model's sizes, read with ``read_lora`` like a user's file and FUSED; then one warm-up step (first calls,
    compilation), the caches are cleared, and ONE WHOLE VIDEO at ``num_inference_steps=4, guidance_scale=1.0``
    (one transformer pass per step, as CFG-distilled LoRAs run; the ``distill`` sampler with flow_shift 5.0, as in
    jobs/lynx-full-4step-lora.yaml) is timed end to end: conditioning, 4 steps, VAE decode: seconds per video.
    Random LoRA weights change no shape or kernel, so the times are a real LoRA's.

Options that change the model run on a model built for them (``sessions``): options sharing a setup (LoRA fused or
unfused, fp8) share one fresh build from the same seed (the default's weights), in plan order, with at most one
compile option last (compile changes the model in place); a second compile option gets its own build.

A first section checks float32 on the device (the tiny checkpoint, through the real loader): frames with PyTorch's
TF32 flags as found, with ``execution.strict_fp32``, and in bf16, each against the same run on the CPU in float32.

Options run within a time budget (``--budget-s``): ``default`` first and always, then each setup's session (the
plain model's first); an option starts only if its estimated time fits before the deadline while keeping the
estimated time of every option listed before it in ``PLAN`` (its priority) that runs after it; each variant but the
last leaves ``--reserve-s`` to the ones after it. Anything not run is listed with its reason ("not run": it cannot
run here; "skipped": the time budget). A "Targets" section judges the 14B full model at 81x480x832 against the
issue's goals: default bf16 <= 8.9 s/step on an H200 (0.72 MFU), best opt-in <= 5 s/step, 4-step LoRA <= 45 s per
video (PASS, FAIL or "not measured (reason)"; ``lynx_gpu_report.py``). Results go to ``--out`` (default: ``$OUT``)
as ``lynx_gpu_<device>.json`` and ``.md``, rewritten after every option.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from farm.models.lynx import execution
from farm.models.lynx.flops import step_flops
from farm.models.lynx.lora import apply_lora, read_lora
from farm.models.lynx.multi_gpu import guidance_devices
from farm.models.lynx.pipeline import OFFICIAL_NEGATIVE_PROMPT, LynxPipeline, Options
from farm.models.lynx.quantize import fp8_support, quantize_transformer
from farm.models.lynx.random_model import REAL, TINY, ModelSizes, build_random_lynx
from farm.params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lynx_gpu_report import evaluate_targets, markdown  # noqa: E402 - the benchmark folder is put on the path above

PROMPT = "A woman smiles at her laptop in a bright modern office, handheld camera."
SEED = 42
LORA_RANK = 64
# Wan's module names of the layers a LoRA trains (lora_keys.BLOCK_NAMES maps them to diffusers' names).
LORA_TARGETS = tuple(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo") + ("ffn.0", "ffn.2")


@dataclass(frozen=True)
class BenchOption:
    """One way of running the same video: the pipeline ``Options`` it changes, what it does to the model before it
    runs (LoRA, quantization), what it measures (steps, or a whole video of ``video_steps`` steps), what its
    deviation is measured against, and why it is in the table."""

    name: str
    attention_backend: str | None = None
    compile: bool = False
    batched: bool = True
    quantize: str | None = None  # "fp8": the transformer's blocks quantized after the build
    lora: str | None = None  # "fused" / "unfused": the benchmark's random rank-64 LoRA applied after the build
    guidance_gpus: bool = False  # guidance passes on the device's other GPUs too
    video_steps: int | None = None  # a whole video of this many steps at guidance_scale 1.0 (the 4-step LoRA path)
    sampler: str = "unipc"  # Options.sampler: distill for the step-distilled LoRAs (farm.models.lynx.samplers)
    flow_shift: float | None = None  # Options.flow_shift: None = the base's (3.0); the distilled LoRAs use 5.0
    reference: str | None = "default"  # the option whose latents and frames it is compared with
    note: str = ""

    @property
    def setup(self) -> tuple[str | None, str | None]:
        """What the model needs before this option runs: ``(lora, quantize)``; ``PLAIN`` as built."""
        return (self.lora, self.quantize)


PLAIN = (None, None)
FP8_NOTE = "torchao float8 (per-row) of the blocks' linears: changes numbers"
OPTIONS = {
    o.name: o
    for o in (
        BenchOption("default", reference=None, note="bf16, batched guidance, PyTorch SDPA's own kernel choice"),
        BenchOption("attn:_native_flash", "_native_flash", note="SDPA forced to its flash kernel"),
        BenchOption("attn:flash", "flash", note="the flash-attn package"),
        BenchOption("attn:sage", "sage", note="sageattention (int8 QK, approximate)"),
        BenchOption("attn:_native_cudnn", "_native_cudnn", note="SDPA forced to cuDNN attention"),
        BenchOption("default (repeat)", note="the default again: run-to-run noise"),
        BenchOption("unbatched", batched=False, note="guidance passes one at a time"),
        BenchOption("attn:_native_efficient", "_native_efficient", note="SDPA forced to memory-efficient"),
        BenchOption("compile", compile=True, note="compile_repeated_blocks, static shapes"),
        BenchOption("fp8", quantize="fp8", note=FP8_NOTE),
        BenchOption("fp8+compile", quantize="fp8", compile=True, note=f"{FP8_NOTE}; then compile"),
        BenchOption(
            "best", "sage", compile=True, quantize="fp8",
            note="sage attention + fp8 + compile: the best opt-in path without distillation",
        ),
        BenchOption(
            "lora-unfused", lora="unfused", reference=None,
            note=f"a random rank-{LORA_RANK} LoRA beside the weights (side paths): its per-step cost",
        ),
        BenchOption(
            "guidance-gpus", guidance_gpus=True,
            note="guidance passes on up to 3 GPUs at once, a transformer copy each (MFU over the GPUs used)",
        ),
        BenchOption(
            "4-step lora", lora="fused", video_steps=4, sampler="distill", flow_shift=5.0, reference=None,
            note=f"random rank-{LORA_RANK} LoRA fused; 4 steps, guidance 1.0, distill sampler, shift 5; one video",
        ),
        BenchOption(
            "4-step lora+compile", lora="fused", video_steps=4, sampler="distill", flow_shift=5.0, compile=True,
            reference="4-step lora", note="the same, compiled (Δ vs 4-step lora)",
        ),
    )
}  # fmt: skip
REFERENCES = {o.reference for o in OPTIONS.values()} - {None}
# What a real-size run tries per variant, in priority order (run order: ``sessions``). Where an option listed early
# runs late (compile last in its session; the LoRA and fp8 sessions after the plain model's), the options before
# it never eat into its estimated time. Lite runs first and takes the attention kernels; full keeps ``--reserve-s``
# and carries the targets: the default, the 4-step LoRA path, the best opt-in path and its parts.
PLAN = {
    "lite": [
        "default", "attn:flash", "attn:sage", "attn:_native_flash", "attn:_native_cudnn", "compile", "fp8",
        "guidance-gpus",
    ],
    "full": [
        "default", "4-step lora", "best", "fp8+compile", "compile", "fp8", "lora-unfused", "guidance-gpus",
        "4-step lora+compile", "attn:_native_flash", "unbatched", "default (repeat)",
    ],
}  # fmt: skip


def now() -> float:
    return time.perf_counter()


def sync(*devices: torch.device) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def deviation(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    diff = (a.float() - b.float().to(a.device)).abs()
    return {"max": float(diff.max()), "mean": float(diff.mean())}


def gpu_slug(device: torch.device, tiny: bool) -> str:
    if device.type != "cuda":
        return "cpu-tiny" if tiny else "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"
    return slug + ("-tiny" if tiny else "")


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def params_for(variant: str, video: tuple[int, int, int], schedule: int) -> SamplingParams:
    """The official defaults of the variant (full: 3-pass guidance, lite: 2-pass) at the benchmark's video size."""
    frames, height, width = video
    if variant == "lite":
        return SamplingParams(frames, height, width, schedule, guidance_scale_i=None, fps=24)
    return SamplingParams(frames, height, width, schedule)


def few_step_params(params: SamplingParams, steps: int) -> SamplingParams:
    """A CFG-distilled LoRA's sampling: ``steps`` steps, ``guidance_scale`` 1.0 (one transformer pass per step)."""
    return replace(params, num_inference_steps=steps, guidance_scale=1.0)


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(512) * 20).astype(np.float32), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------- what can run here
def sage_problem(device: torch.device) -> str | None:
    """Why diffusers' ``sage`` attention backend cannot run here, or None."""
    if importlib.util.find_spec("sageattention") is None:
        return "sageattention is not installed (diffusers' sage backend needs sageattention>=2.1.1)"
    from diffusers.models import attention_dispatch

    if not getattr(attention_dispatch, "_CAN_USE_SAGE_ATTN", True):  # diffusers' own check, made at import
        need = getattr(attention_dispatch, "_REQUIRED_SAGE_VERSION", "a newer version")
        return f"sageattention {package_version('sageattention')} is installed; diffusers' sage backend needs {need}+"
    if device.type != "cuda":
        return f"sageattention's kernels run on CUDA GPUs; this run is on {device}"
    return None


def not_run_reason(option: BenchOption, args: argparse.Namespace) -> str | None:
    """Why ``option`` cannot run on this machine (fp8 support, sage attention, GPU count), or None."""
    reasons = []
    if option.quantize == "fp8":
        bf16 = None if args.dtype == torch.bfloat16 else "fp8 needs a bf16 transformer (--dtype bf16)"
        reasons.append(fp8_support(args.device) or bf16)
    if option.attention_backend == "sage":
        reasons.append(sage_problem(args.device))
    if option.guidance_gpus and (args.device.type != "cuda" or visible_gpus() < 2):
        where = f"{visible_gpus()} visible" if args.device.type == "cuda" else f"this run is on {args.device}"
        reasons.append(f"needs 2+ GPUs ({where})")
    return "; ".join(r for r in reasons if r) or None


# ----------------------------------------------------------------------------------------------- random LoRA file
def lora_shapes(transformer_config: dict) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every ``LORA_TARGETS`` layer of a Wan transformer with ``transformer_config``."""
    dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    ffn = transformer_config["ffn_dim"]
    shapes = {name: (dim, dim) for name in LORA_TARGETS}  # cross-attention k, v read the text projected to dim
    return shapes | {"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}


def write_random_lora(path: Path, transformer_config: dict, rank: int = LORA_RANK, seed: int = 0) -> dict[str, Any]:
    """A random rank-``rank`` LoRA in the Wan key layout for every block, saved as bf16 safetensors; small ``up``
    weights keep the model's activations in range. Returns what the report says about it."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for block in range(transformer_config["num_layers"]):
        for name, (out, inp) in lora_shapes(transformer_config).items():
            key = f"diffusion_model.blocks.{block}.{name}"
            down = torch.randn(rank, inp, generator=generator) / inp**0.5
            up = torch.randn(out, rank, generator=generator) * (0.01 / rank**0.5)
            tensors[f"{key}.lora_down.weight"] = down.to(torch.bfloat16)
            tensors[f"{key}.lora_up.weight"] = up.to(torch.bfloat16)
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    layers = transformer_config["num_layers"] * len(LORA_TARGETS)
    return {"rank": rank, "layers": layers, "layout": "wan", "mb": path.stat().st_size / 1e6}


class RandomLora:
    """The run's one LoRA file, written on first use into ``folder`` (its facts go into ``results['lora_file']``)."""

    def __init__(self, folder: Path, transformer_config: dict, results: dict[str, Any]) -> None:
        self.path = folder / f"random_rank{LORA_RANK}_wan.safetensors"
        self.transformer_config = transformer_config
        self.results = results

    def file(self) -> Path:
        if not self.path.is_file():
            t0 = now()
            facts = write_random_lora(self.path, self.transformer_config)
            self.results["lora_file"] = facts | {"write_s": now() - t0}
        return self.path


# ----------------------------------------------------------------------------------------------- fp32 fidelity (tiny)
def fidelity_section(device: torch.device, found_flags: dict[str, Any]) -> list[dict[str, Any]]:
    """Tiny checkpoint through the real loader: fp32 (flags as found / strict) and bf16 on ``device`` vs CPU fp32."""
    from farm.models.lynx.loader import load_lynx
    from farm.models.lynx.tiny import BASE_DIRNAME, make_tiny_checkpoint

    root = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="lynx-tiny-")) / "tiny", 0, False, False)
    emb, face = inputs(0)
    rows = []
    for variant in ("full", "lite"):
        params = params_for(variant, (9, 64, 96), 4)
        base, adapter = str(root / BASE_DIRNAME), str(root / f"lynx_{variant}")

        def frames(pipe: LynxPipeline, params: SamplingParams = params) -> np.ndarray:
            pipe.clear_caches()  # reference buffers and embeddings are recomputed under the current flags
            return pipe.generate(emb, face, PROMPT, OFFICIAL_NEGATIVE_PROMPT, params, SEED)

        reference = frames(LynxPipeline(load_lynx(base, adapter, variant), Options()))
        fp32 = LynxPipeline(load_lynx(base, adapter, variant, torch.float32, device), Options())  # strict on CUDA
        runs = {}
        execution.set_fp32_flags(found_flags)
        runs["fp32, PyTorch's TF32 flags as found"] = frames(fp32)
        execution.strict_fp32(torch.float32, device)
        runs["fp32, strict_fp32 (TF32 off)"] = frames(fp32)
        execution.set_fp32_flags(found_flags)
        bf16 = LynxPipeline(load_lynx(base, adapter, variant, torch.bfloat16, device), Options())
        runs["bf16"] = frames(bf16)
        for label, out in runs.items():
            diff = np.abs(out - reference)
            rows.append(
                {"variant": variant, "run": label, "device": str(device), "max": float(diff.max()),
                 "mean": float(diff.mean())}
            )  # fmt: skip
        del fp32, bf16
    execution.set_fp32_flags(found_flags)
    return rows


# ----------------------------------------------------------------------------------------------- model setups
def setup_label(setup: tuple[str | None, str | None]) -> str:
    lora, quantize = setup
    parts = ([f"lora {lora}"] if lora else []) + ([quantize] if quantize else [])
    return " + ".join(parts) or "plain"


def build_model(variant: str, sizes: ModelSizes, setup: tuple, args: argparse.Namespace, lora: RandomLora):
    """A fresh random model (seed 0: the same weights every build) with ``setup`` applied: the LoRA (read from the
    run's file like a user's), then fp8 (before any compile). Returns the model and what the report says of it."""
    lora_mode, quantize = setup
    info: dict[str, Any] = {"setup": setup_label(setup)}
    t0 = now()
    model = build_random_lynx(variant, sizes, args.device, args.dtype, seed=0)
    sync(args.device)
    info["build_s"] = now() - t0
    if lora_mode is not None:
        path = lora.file()
        t1 = now()
        layers = read_lora(path, len(model.transformer.blocks))
        info["lora_layers"] = apply_lora(model.transformer, layers, 1.0, fuse=lora_mode == "fused")
        sync(args.device)
        info["lora_s"] = now() - t1
    if quantize is not None:
        t2 = now()
        info["fp8_layers"] = quantize_transformer(model.transformer, quantize, args.device)
        sync(args.device)
        info["quantize_s"] = now() - t2
    return model, info


def describe_build(model, out: dict[str, Any], video: tuple[int, int, int]) -> None:
    """The variant's first build: its size and memory, and on CUDA one untimed decode (cuDNN's first call at this
    shape, so that no option's decode pays it)."""
    device = model.device
    out["parameters_billion"] = sum(
        p.numel() for m in (model.transformer, model.resampler) for p in m.parameters()
    ) / 1e9  # fmt: skip
    if device.type != "cuda":
        return
    out["weights_gb"] = torch.cuda.memory_allocated(device) / 1e9
    frames, height, width = video
    shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    LynxPipeline(model, Options()).decode_frames(latents)


# ----------------------------------------------------------------------------------------------- measuring
def pipeline_for(model, option: BenchOption, args: argparse.Namespace) -> LynxPipeline:
    others = tuple(guidance_devices(model.device)) if option.guidance_gpus else ()
    return LynxPipeline(
        model,
        Options(
            batch_guidance=option.batched,
            attention_backend=option.attention_backend,
            compile=option.compile,
            compile_backend=args.compile_backend,
            guidance_devices=others,
            sampler=option.sampler,
            flow_shift=option.flow_shift,
        ),
    )


@torch.no_grad()  # as in generate: a compiled reference pass is guarded on grad mode
def condition(pipe: LynxPipeline, emb: np.ndarray, face: np.ndarray, guided: bool) -> None:
    """Everything a video needs before its steps: prompt embeddings, ID tokens, reference buffers (full)."""
    pipe.prompt_embeds(PROMPT)
    if guided:
        pipe.prompt_embeds(OFFICIAL_NEGATIVE_PROMPT)
    pipe.id_tokens(emb)
    if pipe.model.config.ref_adapter:
        pipe.ref_buffers(face, SEED)  # two DiT passes over the face (compiled too, when compiling)


def mfu(flops: dict, seconds: float, gpus: int, args: argparse.Namespace) -> float | None:
    if args.device.type != "cuda" or args.dtype != torch.bfloat16:
        return None
    return flops["total"] / seconds / (args.peak_tflops * 1e12 * gpus)


class StepClock:
    """Progress callback of the denoising loop: a timestamp and the compiled-graph count after every step."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = devices
        self.stamps: list[float] = []
        self.graphs: list[int] = []

    def __call__(self, i: int, n: int) -> None:
        sync(*self.devices)
        self.stamps.append(now())
        self.graphs.append(unique_graphs())


def start_row(option: BenchOption, kind: str) -> dict[str, Any]:
    return {"option": option.name, "note": option.note, "status": "ok", "kind": kind}


def status_row(option: BenchOption, status: str, reason: str) -> dict[str, Any]:
    kind = "video" if option.video_steps else "steps"
    return {"option": option.name, "note": option.note, "status": status, "reason": reason, "kind": kind}


def finish_row(row: dict, pipe: LynxPipeline, latents: torch.Tensor, frames: torch.Tensor, reference, graphs0) -> None:
    """Memory, compiled graphs, finiteness and the deviation from ``reference`` of a measured row."""
    device = pipe.device
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        row["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    row["gpus"] = len(pipe.pass_models)
    row["graphs_compiled"] = unique_graphs() - graphs0
    row["finite"] = bool(torch.isfinite(latents).all())
    row["latents_mean_abs"] = float(latents.float().abs().mean())
    if reference is not None:
        row["latents_delta"] = deviation(latents, reference["latents"])
        row["frames_delta"] = deviation(frames, reference["frames"])


def run_option(
    model, option: BenchOption, params: SamplingParams, args: argparse.Namespace, reference: dict | None, flops: dict
) -> dict[str, Any]:
    """Conditioning, ``warmup + steps`` denoising steps and the decode of one option; fills a result row."""
    device = model.device
    emb, face = inputs(0)
    row = start_row(option, "steps")
    pipe = pipeline_for(model, option, args)
    devices = [m.device for m in pipe.pass_models]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs0 = unique_graphs()
    sync(*devices)
    t0 = now()
    condition(pipe, emb, face, guided=True)
    sync(*devices)
    row["conditioning_s"] = now() - t0
    clock = StepClock(devices)
    pipe.reset_counters()
    t1 = now()
    n = args.warmup + args.steps
    latents = pipe.generate_latents(
        emb, face, PROMPT, OFFICIAL_NEGATIVE_PROMPT, params, SEED, option.batched, clock, n
    )  # fmt: skip
    marks = [t1, *clock.stamps]
    row["passes_per_step"] = pipe.dit_samples / n
    row["warmup_s"] = marks[args.warmup] - marks[0]
    row["step_s"] = [b - a for a, b in zip(marks[args.warmup : -1], marks[args.warmup + 1 :], strict=True)]
    row["s_per_step"] = statistics.median(row["step_s"])
    row["tflop_per_step"] = flops["total"] / 1e12
    sync(*devices)
    t2 = now()
    frames = pipe.decode_frames(latents)
    sync(device)
    row["decode_s"] = now() - t2
    latents = latents.float()
    finish_row(row, pipe, latents, frames, reference, graphs0)
    row["graphs_compiled_in_timed_steps"] = clock.graphs[-1] - clock.graphs[args.warmup - 1]
    row["mfu"] = mfu(flops, row["s_per_step"], row["gpus"], args)
    del pipe
    return {"row": row, "latents": latents, "frames": frames}


def run_video(
    model, option: BenchOption, params: SamplingParams, args: argparse.Namespace, reference: dict | None, flops: dict
) -> dict[str, Any]:
    """One warm-up step (first calls, compilation), then ONE WHOLE VIDEO of ``params`` timed end to end for a new
    prompt and face (caches cleared): conditioning, every step, the VAE decode."""
    device = model.device
    emb, face = inputs(0)
    row = start_row(option, "video")
    pipe = pipeline_for(model, option, args)
    guided = params.guidance_scale > 1.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs0 = unique_graphs()
    sync(device)
    t0 = now()
    pipe.generate_latents(emb, face, PROMPT, OFFICIAL_NEGATIVE_PROMPT, params, SEED, max_steps=1)
    sync(device)
    row["warmup_s"] = now() - t0
    pipe.clear_caches()
    graphs1 = unique_graphs()
    t1 = now()
    condition(pipe, emb, face, guided)
    sync(device)
    row["conditioning_s"] = now() - t1
    pipe.reset_counters()
    clock = StepClock([device])
    t2 = now()
    latents = pipe.generate_latents(emb, face, PROMPT, OFFICIAL_NEGATIVE_PROMPT, params, SEED, progress=clock)
    t3 = now()
    frames = pipe.decode_frames(latents)
    sync(device)
    row["decode_s"] = now() - t3
    row["s_per_video"] = now() - t1
    marks = [t2, *clock.stamps]
    row["step_s"] = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    row["s_per_step"] = statistics.median(row["step_s"])
    row["steps"] = len(row["step_s"])
    row["guidance_scale"] = params.guidance_scale
    row["sampler"], row["flow_shift"] = option.sampler, option.flow_shift
    row["passes_per_step"] = pipe.dit_samples / row["steps"]
    row["tflop_per_step"] = flops["total"] / 1e12
    latents = latents.float()
    finish_row(row, pipe, latents, frames, reference, graphs0)
    row["graphs_compiled_in_timed_video"] = unique_graphs() - graphs1
    row["mfu"] = mfu(flops, row["s_per_step"], 1, args)
    del pipe
    return {"row": row, "latents": latents, "frames": frames}


# ----------------------------------------------------------------------------------------------- run order, budget
def sessions(names: list[str]) -> list[list[str]]:
    """The options of ``names`` grouped by the model they run on, in run order: the plain model's first (the default
    leads it), then each other setup's in the order of its first option in ``names``. Inside a session: the options
    without compile in ``names`` order, then one compile option (compile changes the model in place); every further
    compile option of that setup gets a session (a fresh build) of its own."""
    groups: dict[tuple, list[str]] = {PLAIN: []}
    for name in names:
        groups.setdefault(OPTIONS[name].setup, []).append(name)
    out: list[list[str]] = []
    for members in groups.values():
        members = sorted(members, key=lambda n: n != "default")  # stable: the default first, then in names' order
        eager = [n for n in members if not OPTIONS[n].compile]
        compiled = [n for n in members if OPTIONS[n].compile]
        out += [eager + compiled[:1], *[[n] for n in compiled[1:]]]
    return [session for session in out if session]


def run_order(names: list[str]) -> list[str]:
    return [name for session in sessions(names) for name in session]


def estimate_s(
    default_row: dict | None, option: BenchOption, args: argparse.Namespace, new_build: bool = False
) -> float:
    """Seconds an option should take, from the default's numbers (compile adds ``--compile-allowance-s``, a fresh
    model build with its LoRA or fp8 ``--setup-allowance-s``)."""
    if default_row is None or "s_per_step" not in default_row:
        return 0.0
    step = default_row["s_per_step"] * (1.5 if option.attention_backend else 1.1)  # a forced kernel may be slower
    fixed = default_row["decode_s"] + default_row["conditioning_s"] + 5
    if option.video_steps:  # one pass per step; a warm-up step, then a whole video with its own conditioning
        one_pass = step / max(default_row.get("passes_per_step", 1.0), 1.0)
        seconds = one_pass * (1 + option.video_steps) + fixed + default_row["conditioning_s"]
    else:
        seconds = step * (args.warmup + args.steps) + fixed
    seconds += args.setup_allowance_s if new_build else 0.0
    return seconds + (args.compile_allowance_s if option.compile else 0.0)


def fits(
    name: str, names: list[str], default_row: dict | None, seconds_left: float, args: argparse.Namespace
) -> tuple[bool, str]:
    """Whether option ``name`` may start with ``seconds_left`` before the variant's deadline, keeping the estimated
    time of every option listed before it in ``names`` (its priority) that runs after it (``run_order``). The
    default always runs."""
    if name == "default":
        return True, ""
    order = run_order(names)
    builds = {session[0] for session in sessions(names)[1:]}  # the plain model is built before the default
    later = [n for n in names[: names.index(name)] if order.index(n) > order.index(name)]
    reserve = sum(estimate_s(default_row, OPTIONS[n], args, n in builds) for n in later)
    need = estimate_s(default_row, OPTIONS[name], args, name in builds)
    if need + reserve > seconds_left:
        kept = f"+{reserve:.0f} s kept for {', '.join(later)}" if later else "+0 s kept"
        return False, f"time budget: needs ~{need:.0f} s ({kept}), {seconds_left:.0f} s left"
    return True, ""


# ----------------------------------------------------------------------------------------------- one variant
class VariantRun:
    """One variant's sessions: builds their models, runs their options within the deadline, fills ``out``."""

    def __init__(self, variant, sizes, args, deadline, out, report, lora: RandomLora) -> None:
        self.variant, self.sizes, self.args, self.deadline = variant, sizes, args, deadline
        self.out, self.report, self.lora = out, report, lora
        self.params = params_for(variant, sizes.videos[variant], args.schedule)
        self.video_flops = step_flops(sizes.transformer, sizes.adapters[variant], *sizes.videos[variant], 1)
        self.references: dict[str, dict[str, torch.Tensor]] = {}
        self.default_row: dict | None = None
        self.runnable: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        self.out["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.report()

    def run(self, names: list[str]) -> None:
        unavailable = {n: reason for n in names if (reason := not_run_reason(OPTIONS[n], self.args))}
        self.runnable = [n for n in names if n not in unavailable]
        for session in sessions(self.runnable):
            self.run_session(session)
            free_device_memory(self.args.device)
        for name, reason in unavailable.items():
            self.add(status_row(OPTIONS[name], "not run", reason))

    def run_session(self, session: list[str]) -> None:
        """The session's options on one fresh model (built when the first of them fits), then the model is freed."""
        model = None
        for index, name in enumerate(session):
            option = OPTIONS[name]
            ok, reason = fits(name, self.runnable, self.default_row, self.deadline - now(), self.args)
            if not ok:
                self.add(status_row(option, "skipped", reason))
                continue
            if model is None:
                try:
                    model = self.build(option.setup, session)
                except Exception as exc:  # a LoRA or fp8 failing here must not end the run
                    traceback.print_exc()
                    for rest in session[index:]:
                        self.add(status_row(OPTIONS[rest], "error", f"model setup: {first_line(exc)}"))
                    return
            self.add(self.measure(model, option))
        if model is not None and any(OPTIONS[n].compile for n in session):
            torch._dynamo.reset()  # compiled code holds the model: let it go with it

    def build(self, setup: tuple, session: list[str]):
        model, info = build_model(self.variant, self.sizes, setup, self.args, self.lora)
        info["options"] = session
        self.out["setups"].append(info)
        if "build_s" not in self.out:  # the variant's first build
            self.out["build_s"] = info["build_s"]
            describe_build(model, self.out, self.sizes.videos[self.variant])
        self.report()
        return model

    def measure(self, model, option: BenchOption) -> dict[str, Any]:
        reference = self.references.get(option.reference) if option.reference else None
        try:
            if option.compile:
                torch._dynamo.reset()  # the other variant's graphs do not count against this one's limit
            if option.video_steps:
                params = few_step_params(self.params, option.video_steps)
                result = run_video(model, option, params, self.args, reference, self.video_flops)
            else:
                result = run_option(model, option, self.params, self.args, reference, self.out["flops"])
            row = result["row"]
            if option.name in REFERENCES:
                row["is_reference"] = True
                self.references[option.name] = {"latents": result["latents"], "frames": result["frames"]}
            if option.name == "default":
                self.default_row = row
            del result
        except Exception as exc:  # one option failing (a missing package, out of memory) must not end the run
            traceback.print_exc()
            row = status_row(option, "error", first_line(exc))
        finally:
            if option.attention_backend is not None:
                execution.set_attention_backend(model.transformer, "native")  # back to the default for the next
            free_device_memory(model.device)
        return row


def bench_variant(
    variant: str, sizes: ModelSizes, args: argparse.Namespace, deadline: float, sink: list, report, lora: RandomLora
) -> None:
    """Run one variant's planned options that fit before ``deadline`` at ``sizes`` on the device; its results go
    into ``sink`` at once (``report`` rewrites the files after every option, so a killed run keeps them)."""
    video = sizes.videos[variant]
    passes = params_for(variant, video, args.schedule).guidance_passes()
    flops = step_flops(sizes.transformer, sizes.adapters[variant], *video, passes)
    out: dict[str, Any] = {
        "variant": variant, "video": list(video), "passes": passes, "flops": flops, "rows": [], "setups": [],
    }  # fmt: skip
    sink.append(out)
    report()
    VariantRun(variant, sizes, args, deadline, out, report, lora).run(args.options or PLAN[variant])


# ----------------------------------------------------------------------------------------------- run
def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device, dtype: torch.dtype, argv: list[str]) -> dict[str, Any]:
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "gpus": visible_gpus(),
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "torchao": package_version("torchao"),
        "sageattention": package_version("sageattention"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/bench_lynx_gpu.py", *argv]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke test of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--variants", default="lite,full", help="run in this order")
    ap.add_argument("--options", default="", help=f"for every variant (default: the PLAN), from: {', '.join(OPTIONS)}")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    ap.add_argument("--schedule", type=int, default=50, help="the schedule the steps are taken from")
    ap.add_argument("--budget-s", type=float, default=440.0, help="start no option that would end after this")
    ap.add_argument("--reserve-s", type=float, default=None, help="kept for each later variant (real: 200 s)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: smoke tests)")
    ap.add_argument("--compile-allowance-s", type=float, default=None, help="compile time kept in reserve")
    ap.add_argument("--setup-allowance-s", type=float, default=None, help="a fresh build with LoRA/fp8 (real: 40 s)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU")
    ap.add_argument("--no-fidelity", action="store_true", help="skip the tiny-checkpoint float32 section")
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("--out is required when $OUT is not set")
    if args.warmup < 1 or args.steps < 1 or args.warmup + args.steps > args.schedule:
        ap.error(f"need 1 <= --warmup, 1 <= --steps and warmup + steps <= --schedule ({args.schedule})")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")
    args.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    args.options = [o.strip() for o in args.options.split(",") if o.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or set(args.variants) - set(PLAN):
        ap.error(f"--variants {args.variants} must name some of {list(PLAN)}")
    unknown = [o for o in args.options if o not in OPTIONS]
    if unknown:
        ap.error(f"unknown option(s) {unknown}; choose from {list(OPTIONS)}")
    if args.compile_allowance_s is None:
        args.compile_allowance_s = 20.0 if args.tiny else 120.0
    if args.setup_allowance_s is None:
        args.setup_allowance_s = 5.0 if args.tiny else 40.0
    if args.reserve_s is None:
        args.reserve_s = 0.0 if args.tiny else 200.0
    if args.tiny and args.schedule == 50:
        args.schedule = 4
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = now()
    args = parse_args(argv)
    device = args.device
    sizes = TINY if args.tiny else REAL
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = gpu_slug(device, args.tiny)
    found_flags = execution.fp32_flags()
    results: dict[str, Any] = {
        "environment": environment(device, args.dtype, sys.argv[1:] if argv is None else argv),
        "sizes": sizes.name,
        "warmup": args.warmup,
        "steps": args.steps,
        "schedule": args.schedule,
        "peak_tflops": args.peak_tflops,
        "fp32_flags_found": {k: str(v) for k, v in found_flags.items()},
        "targets": [],
        "variants": [],
        "fidelity": [],
        "errors": [],
    }

    def report() -> None:
        results["targets"] = evaluate_targets(results)
        (out_dir / f"lynx_gpu_{slug}.json").write_text(json.dumps(results, indent=2, default=str))
        (out_dir / f"lynx_gpu_{slug}.md").write_text(markdown(results))

    if not args.no_fidelity:
        try:
            results["fidelity"] = fidelity_section(device, found_flags)
        except Exception as exc:
            traceback.print_exc()
            results["errors"].append(f"fidelity section: {type(exc).__name__}: {exc}")
        report()
    lora_dir = Path(tempfile.mkdtemp(prefix="lynx-lora-"))
    lora = RandomLora(lora_dir, sizes.transformer, results)
    variants = args.variants
    end = start + args.budget_s
    try:
        for i, variant in enumerate(variants):
            deadline = end - args.reserve_s * (len(variants) - 1 - i)
            try:
                bench_variant(variant, sizes, args, deadline, results["variants"], report, lora)
            except Exception as exc:
                traceback.print_exc()
                results["errors"].append(f"{variant}: {type(exc).__name__}: {exc}")
            report()
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)
    results["total_s"] = now() - start
    report()
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
