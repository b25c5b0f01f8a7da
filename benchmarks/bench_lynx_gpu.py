"""Lynx at the GPU's limit: real-size full and lite models with random weights, built directly on the GPU, every
speed option side by side in one run, each with its numeric deviation from the default path on the same inputs.

    python benchmarks/bench_lynx_gpu.py --out DIR                 # a CUDA GPU: 14B full (81x480x832) + lite (121x...)
    python benchmarks/bench_lynx_gpu.py --tiny --out DIR          # the same code at tiny sizes on the CPU (smoke)

Per variant and option it reports: the warm-up step (first-call costs, compilation), the timed steps' median
seconds, analytic TFLOP per step (``farm.models.lynx.flops``) and MFU against ``--peak-tflops`` (default 790: dense
bf16 matrix products measured on this workplace's H100/H200), the VAE decode, the peak GPU memory of the option
(weights included), graphs compiled, and max/mean |delta| of the latents after the timed steps and of the decoded
frames against the default option. Steps are the first ``--warmup + --steps`` steps of a real ``--schedule``-step
schedule. Random weights change no shape or kernel, so times and memory are the real model's; the frames are noise.

A first section checks float32 on the device (the tiny checkpoint, through the real loader): frames with PyTorch's
TF32 flags as found, with ``execution.strict_fp32``, and in bf16, each against the same run on the CPU in float32.

Options run within a time budget (``--budget-s``): ``default`` first and always, ``compile`` last (it changes the
model in place), the others in ``PLAN`` order while they fit, never into the time of a compile listed before them;
each variant but the last leaves ``--reserve-s`` to the ones after it. Anything not run is listed with its reason.
Results go to ``--out`` (default: ``$OUT``) as ``lynx_gpu_<device>.json`` and ``.md``, rewritten after every option.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from farm.models.lynx import execution
from farm.models.lynx.flops import step_flops
from farm.models.lynx.pipeline import OFFICIAL_NEGATIVE_PROMPT, LynxPipeline, Options
from farm.models.lynx.random_model import REAL, TINY, ModelSizes, build_random_lynx
from farm.params import SamplingParams

PROMPT = "A woman smiles at her laptop in a bright modern office, handheld camera."
SEED = 42


@dataclass(frozen=True)
class BenchOption:
    """One way of running the same video: the pipeline ``Options`` it changes, and why it is in the table."""

    name: str
    attention_backend: str | None = None
    compile: bool = False
    batched: bool = True
    note: str = ""


OPTIONS = {
    o.name: o
    for o in (
        BenchOption("default", note="bf16, batched guidance, PyTorch SDPA's own kernel choice"),
        BenchOption("attn:_native_flash", "_native_flash", note="SDPA forced to its flash kernel"),
        BenchOption("attn:flash", "flash", note="the flash-attn package"),
        BenchOption("attn:sage", "sage", note="sageattention (int8 QK, approximate)"),
        BenchOption("attn:_native_cudnn", "_native_cudnn", note="SDPA forced to cuDNN attention"),
        BenchOption("default (repeat)", note="the default again: run-to-run noise"),
        BenchOption("unbatched", batched=False, note="guidance passes one at a time"),
        BenchOption("attn:_native_efficient", "_native_efficient", note="SDPA forced to memory-efficient"),
        BenchOption("compile", compile=True, note="compile_repeated_blocks, static shapes"),
    )
}
# What a real-size run tries per variant, in priority order. ``compile`` always RUNS last (it changes the model in
# place), but where it is listed before other options their time never eats into its estimated time. Lite runs
# first and takes the attention kernels; full keeps ``--reserve-s`` for its default and compile.
PLAN = {
    "lite": ["default", "attn:flash", "attn:sage", "attn:_native_flash", "attn:_native_cudnn", "compile"],
    "full": ["default", "compile", "attn:_native_flash", "default (repeat)", "unbatched"],
}


def now() -> float:
    return time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def deviation(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    diff = (a.float() - b.float()).abs()
    return {"max": float(diff.max()), "mean": float(diff.mean())}


def gpu_slug(device: torch.device, tiny: bool) -> str:
    if device.type != "cuda":
        return "cpu-tiny" if tiny else "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"
    return slug + ("-tiny" if tiny else "")


def params_for(variant: str, video: tuple[int, int, int], schedule: int) -> SamplingParams:
    """The official defaults of the variant (full: 3-pass guidance, lite: 2-pass) at the benchmark's video size."""
    frames, height, width = video
    if variant == "lite":
        return SamplingParams(frames, height, width, schedule, guidance_scale_i=None, fps=24)
    return SamplingParams(frames, height, width, schedule)


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(512) * 20).astype(np.float32), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)


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


# ----------------------------------------------------------------------------------------------- one option
def run_option(
    model, option: BenchOption, params: SamplingParams, args: argparse.Namespace, reference: dict | None
) -> dict[str, Any]:
    """Conditioning, ``warmup + steps`` denoising steps and the decode of one option; fills a result row."""
    device = model.device
    emb, face = inputs(0)
    row: dict[str, Any] = {"option": option.name, "note": option.note, "status": "ok"}
    pipe = LynxPipeline(
        model,
        Options(
            batch_guidance=option.batched,
            attention_backend=option.attention_backend,
            compile=option.compile,
            compile_backend=args.compile_backend,
        ),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs0 = unique_graphs()
    sync(device)
    t0 = now()
    pipe.prompt_embeds(PROMPT)
    pipe.prompt_embeds(OFFICIAL_NEGATIVE_PROMPT)
    pipe.id_tokens(emb)
    if model.config.ref_adapter:
        pipe.ref_buffers(face, SEED)  # two DiT passes over the face (compiled too, when compiling)
    sync(device)
    row["conditioning_s"] = now() - t0
    stamps: list[float] = []
    graphs: list[int] = []

    def progress(i: int, n: int) -> None:
        sync(device)
        stamps.append(now())
        graphs.append(unique_graphs())

    t1 = now()
    latents = pipe.generate_latents(
        emb, face, PROMPT, OFFICIAL_NEGATIVE_PROMPT, params, SEED, option.batched, progress, args.warmup + args.steps
    )
    marks = [t1, *stamps]
    row["warmup_s"] = marks[args.warmup] - marks[0]
    row["step_s"] = [b - a for a, b in zip(marks[args.warmup : -1], marks[args.warmup + 1 :], strict=True)]
    row["s_per_step"] = statistics.median(row["step_s"])
    sync(device)
    t2 = now()
    frames = pipe.decode_frames(latents)
    sync(device)
    row["decode_s"] = now() - t2
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        row["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    row["graphs_compiled"] = unique_graphs() - graphs0
    row["graphs_compiled_in_timed_steps"] = graphs[-1] - graphs[args.warmup - 1] if graphs else 0
    row["finite"] = bool(torch.isfinite(latents).all())
    row["latents_mean_abs"] = float(latents.float().abs().mean())
    latents = latents.float()
    if reference is not None:
        row["latents_delta"] = deviation(latents, reference["latents"])
        row["frames_delta"] = deviation(frames, reference["frames"])
    del pipe
    return {"row": row, "latents": latents, "frames": frames}


def estimate_s(default_row: dict | None, option: BenchOption, args: argparse.Namespace) -> float:
    """Seconds an option should take, from the default's numbers (compile adds ``--compile-allowance-s``)."""
    if default_row is None or "s_per_step" not in default_row:
        return 0.0
    step = default_row["s_per_step"] * (1.5 if option.attention_backend else 1.1)  # a forced kernel may be slower
    seconds = step * (args.warmup + args.steps) + default_row["decode_s"] + default_row["conditioning_s"] + 5
    return seconds + (args.compile_allowance_s if option.compile else 0.0)


def fits(
    name: str, names: list[str], default_row: dict | None, seconds_left: float, args: argparse.Namespace
) -> tuple[bool, str]:
    """Whether option ``name`` may start with ``seconds_left`` before the variant's deadline, keeping the estimated
    time of every compile listed before it in ``names`` (compiles run last). The default always runs."""
    if name == "default":
        return True, ""
    ahead = [n for n in names[: names.index(name)] if OPTIONS[n].compile and not OPTIONS[name].compile]
    reserve = sum(estimate_s(default_row, OPTIONS[n], args) for n in ahead)
    need = estimate_s(default_row, OPTIONS[name], args)
    if need + reserve > seconds_left:
        return False, f"time budget: needs ~{need:.0f} s (+{reserve:.0f} s kept for compile), {seconds_left:.0f} s left"
    return True, ""


def bench_variant(
    variant: str, sizes: ModelSizes, args: argparse.Namespace, deadline: float, sink: list, report
) -> None:
    """Build one variant at ``sizes`` on the device and run its planned options that fit before ``deadline``; its
    results go into ``sink`` at once (``report`` rewrites the files after every option, so a killed run keeps them)."""
    device = args.device
    video = sizes.videos[variant]
    params = params_for(variant, video, args.schedule)
    passes = 3 if params.guidance_scale_i is not None else 2
    flops = step_flops(sizes.transformer, sizes.adapters[variant], *video, passes)
    out: dict[str, Any] = {"variant": variant, "video": list(video), "passes": passes, "flops": flops, "rows": []}
    sink.append(out)
    report()
    t0 = now()
    model = build_random_lynx(variant, sizes, device, args.dtype, seed=0)
    sync(device)
    out["build_s"] = now() - t0
    out["parameters_billion"] = sum(
        p.numel() for m in (model.transformer, model.resampler) for p in m.parameters()
    ) / 1e9  # fmt: skip
    if device.type == "cuda":
        out["weights_gb"] = torch.cuda.memory_allocated(device) / 1e9
    # Decode once untimed (cuDNN's first call at this shape), on random latents of the real shape.
    frames, height, width = video
    shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    LynxPipeline(model, Options()).decode_frames(latents)
    del latents
    names = args.options or PLAN[variant]
    plain = [n for n in names if not OPTIONS[n].compile and n != "default"]
    order = (["default"] if "default" in names else []) + plain + [n for n in names if OPTIONS[n].compile]
    reference = None
    default_row = None
    for name in order:
        option = OPTIONS[name]
        run, reason = fits(name, names, default_row, deadline - now(), args)
        if not run:
            out["rows"].append({"option": name, "note": option.note, "status": "skipped", "reason": reason})
            report()
            continue
        try:
            if option.compile:
                torch._dynamo.reset()  # the other variant's graphs do not count against this one's limit
            result = run_option(model, option, params, args, reference)
            row = result["row"]
            row["tflop_per_step"] = flops["total"] / 1e12
            if device.type == "cuda" and args.dtype == torch.bfloat16:
                row["mfu"] = flops["total"] / row["s_per_step"] / (args.peak_tflops * 1e12)
            if name == "default":
                reference = {"latents": result["latents"], "frames": result["frames"]}
                default_row = row
            del result
        except Exception as exc:  # one option failing (a missing package, out of memory) must not end the run
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            row = {"option": name, "note": option.note, "status": "error", "reason": f"{type(exc).__name__}: {first}"}
            traceback.print_exc()
        finally:
            if option.attention_backend is not None:
                execution.set_attention_backend(model.transformer, "native")  # back to the default for the next
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        report()
    del model, reference
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- report
def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10**-digits or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def sci(value: float) -> str:
    return "0" if value == 0 else f"{value:.2e}"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"# Lynx on {env['device_name']} ({results['sizes']} sizes, random weights, {env['dtype']})",
        "",
        f"- date: {env['date']}; torch {env['torch']}, diffusers {env['diffusers']}, CUDA {env['cuda']}, "
        f"Python {env['python']}",
        f"- command: `{env['command']}`",
        f"- steps: {results['warmup']} warm-up + {results['steps']} timed, the first steps of a "
        f"{results['schedule']}-step schedule; s/step is the median of the timed steps",
        f"- MFU: analytic FLOPs per step / s per step / {results['peak_tflops']:.0f} TFLOP/s (dense bf16 peak used)",
        "- Δ: |option − default| on the same inputs (latents after the timed steps; decoded frames in [0, 1])",
        "",
    ]
    for var in results["variants"]:
        f = var["flops"]
        lines += [
            f"## {var['variant']}: {var['video'][0]}×{var['video'][1]}×{var['video'][2]}, {f['tokens']:,} tokens, "
            f"{var['passes']} guidance passes, {f['total'] / 1e12:,.0f} TFLOP/step "
            f"(self-attention {f['self_attention'] / f['total']:.0%})",
            "",
            f"Built in {fmt(var.get('build_s'), 1)} s: {fmt(var.get('parameters_billion'), 2)} B parameters "
            f"(DiT + adapters), {fmt(var.get('weights_gb'), 1)} GB allocated.",
            "",
            "| option | warm-up s | s/step | MFU | decode s | peak GB | graphs compiled (in timed steps) "
            "| Δ latents max / mean | Δ frames max / mean | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in var["rows"]:
            if row["status"] != "ok":
                lines.append(f"| {row['option']} | {row['status']}: {row.get('reason', '')} ||||||||{row['note']} |")
                continue
            lat, frm = row.get("latents_delta"), row.get("frames_delta")
            delta_l = f"{sci(lat['max'])} / {sci(lat['mean'])}" if lat else "(reference)"
            delta_f = f"{sci(frm['max'])} / {sci(frm['mean'])}" if frm else "(reference)"
            steps = ", ".join(fmt(s, 2) for s in row["step_s"])
            finite = "" if row["finite"] else " NON-FINITE latents"
            lines.append(
                f"| {row['option']} | {fmt(row['warmup_s'])} | {fmt(row['s_per_step'])} ({steps}) "
                f"| {fmt(row.get('mfu'))} | {fmt(row['decode_s'])} | {fmt(row.get('peak_gb'), 1)} "
                f"| {row['graphs_compiled']} ({row['graphs_compiled_in_timed_steps']}) | {delta_l} | {delta_f} "
                f"| {row['note']}{finite} |"
            )
        lines.append("")
    if results.get("fidelity"):
        lines += [
            "## float32 on this device (tiny checkpoint, 9×64×96, 4 steps) vs the CPU in float32",
            "",
            f"PyTorch's flags as found: `{results['fp32_flags_found']}`.",
            "",
            "| variant | run | max |Δ| | mean |Δ| |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r['variant']} | {r['run']} | {sci(r['max'])} | {sci(r['mean'])} |" for r in results["fidelity"]]
        lines.append("")
    if results.get("errors"):
        lines += ["## Errors", "", *[f"- {e}" for e in results["errors"]], ""]
    return "\n".join(lines)


def environment(device: torch.device, dtype: torch.dtype, argv: list[str]) -> dict[str, Any]:
    import diffusers

    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
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
        "variants": [],
        "fidelity": [],
        "errors": [],
    }

    def report() -> None:
        (out_dir / f"lynx_gpu_{slug}.json").write_text(json.dumps(results, indent=2, default=str))
        (out_dir / f"lynx_gpu_{slug}.md").write_text(markdown(results))

    if not args.no_fidelity:
        try:
            results["fidelity"] = fidelity_section(device, found_flags)
        except Exception as exc:
            traceback.print_exc()
            results["errors"].append(f"fidelity section: {type(exc).__name__}: {exc}")
        report()
    variants = args.variants
    end = start + args.budget_s
    for i, variant in enumerate(variants):
        deadline = end - args.reserve_s * (len(variants) - 1 - i)
        try:
            bench_variant(variant, sizes, args, deadline, results["variants"], report)
        except Exception as exc:
            traceback.print_exc()
            results["errors"].append(f"{variant}: {type(exc).__name__}: {exc}")
        report()
    results["total_s"] = now() - start
    report()
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
