"""The Markdown report and the targets of ``bench_lynx_gpu.py`` (the results dict in, text out; no torch).

Targets (the issue's, for the 14B full model at 81x480x832): the default bf16 path <= 8.9 s/step on an H200 (0.72
MFU), the best opt-in path without distillation (sage attention + fp8 + compile) <= 5 s/step, and one whole video
through the 4-step LoRA path (fused LoRA, guidance 1.0, decode included) <= 45 s. Each is PASS, FAIL or "not
measured (reason)".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TARGET_VARIANT = "full"
TARGET_VIDEO = (81, 480, 832)
TARGET_SIZES = "14B"
TIMING_ROWS_EXCLUDED = ("default", "default (repeat)", "guidance-gpus")  # not opt-ins on one GPU


@dataclass(frozen=True)
class Target:
    """A speed goal: the fastest ``ok`` row among ``options`` of the full variant must have ``field <= limit``."""

    name: str
    options: tuple[str, ...]
    field: str
    limit: float
    unit: str
    goal: str


TARGETS = (
    Target("default bf16", ("default",), "s_per_step", 8.9, "s/step", "≤ 8.9 s/step on an H200 (0.72 MFU)"),
    Target(
        "best opt-in, no distillation", ("best",), "s_per_step", 5.0, "s/step",
        "sage attention + fp8 + compile ≤ 5 s/step",
    ),
    Target(
        "4-step LoRA video", ("4-step lora", "4-step lora+compile"), "s_per_video", 45.0, "s/video",
        "one whole video: fused LoRA, 4 steps, guidance 1.0, VAE decode included ≤ 45 s",
    ),
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- targets
def why_targets_unmeasurable(results: dict[str, Any], full: dict | None) -> str | None:
    """Why no target of this run can be judged (wrong sizes, no full variant, not bf16), or None."""
    if results["sizes"] != TARGET_SIZES:
        return f"{results['sizes']} sizes: the targets are for the 14B full model at 81×480×832"
    if full is None:
        return "no full variant in this run"
    if tuple(full["video"]) != TARGET_VIDEO:
        return f"full ran at {full['video']}, the targets are for 81×480×832"
    if results["environment"]["dtype"] != "bfloat16":
        return f"the run is in {results['environment']['dtype']}, the targets are for bf16"
    return None


def fastest_opt_in(rows: list[dict]) -> dict | None:
    """The fastest measured per-step row other than the default, its repeat and multi-GPU guidance."""
    timed = [r for r in rows if r["status"] == "ok" and "s_per_step" in r and r.get("kind", "steps") == "steps"]
    timed = [r for r in timed if r["option"] not in TIMING_ROWS_EXCLUDED]
    return min(timed, key=lambda r: r["s_per_step"], default=None)


def judge(target: Target, rows: list[dict], device_name: str) -> dict[str, Any]:
    """One target against the full variant's rows: the fastest measured option, PASS/FAIL, or why not measured."""
    entry: dict[str, Any] = {"target": target.name, "goal": target.goal, "limit": target.limit, "unit": target.unit}
    listed = [r for r in rows if r["option"] in target.options]
    measured = [r for r in listed if r["status"] == "ok" and target.field in r]
    if not measured:
        why = "; ".join(f"{r['option']} {r['status']}: {r.get('reason', '')}" for r in listed) or "not in this run"
        entry["verdict"] = f"not measured ({why})"
    else:
        best = min(measured, key=lambda r: r[target.field])
        entry.update(option=best["option"], measured=best[target.field], mfu=best.get("mfu"))
        entry["verdict"] = "PASS" if best[target.field] <= target.limit else "FAIL"
    if target.options == ("default",) and "H200" not in device_name:
        entry["note"] = f"measured on {device_name}; the target is for an H200"
    if target.options == ("best",) and not measured:
        closest = fastest_opt_in(rows)
        if closest is not None:
            entry["closest"] = {"option": closest["option"], "measured": closest["s_per_step"]}
    return entry


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of ``TARGETS``, judged on this run's full variant."""
    full = next((v for v in results["variants"] if v["variant"] == TARGET_VARIANT), None)
    why_not = why_targets_unmeasurable(results, full)
    if why_not is not None:
        return [
            {"target": t.name, "goal": t.goal, "limit": t.limit, "unit": t.unit, "verdict": f"not measured ({why_not})"}
            for t in TARGETS
        ]
    return [judge(t, full["rows"], results["environment"]["device_name"]) for t in TARGETS]


# ----------------------------------------------------------------------------------------------- formatting
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


def delta_text(row: dict, key: str) -> str:
    delta = row.get(key)
    if delta:
        return f"{sci(delta['max'])} / {sci(delta['mean'])}"
    return "(reference)" if row.get("is_reference") else "—"


def not_ok_line(row: dict, columns: int) -> str:
    return f"| {row['option']} | {row['status']}: {row.get('reason', '')} {'|' * (columns - 2)}{row['note']} |"


def header_lines(results: dict[str, Any]) -> list[str]:
    env = results["environment"]
    return [
        f"# Lynx on {env['device_name']} ({results['sizes']} sizes, random weights, {env['dtype']})",
        "",
        f"- date: {env['date']}; torch {env['torch']}, diffusers {env['diffusers']}, torchao {env['torchao']}, "
        f"sageattention {env['sageattention']}, CUDA {env['cuda']}, {env['gpus']} GPU(s), Python {env['python']}",
        f"- command: `{env['command']}`",
        f"- steps: {results['warmup']} warm-up + {results['steps']} timed, the first steps of a "
        f"{results['schedule']}-step schedule; s/step is the median of the timed steps",
        f"- MFU: analytic FLOPs per step / s per step / {results['peak_tflops']:.0f} TFLOP/s (dense bf16 peak used) "
        "/ GPUs used",
        "- Δ: |option − reference| on the same inputs (latents after the timed steps; decoded frames in [0, 1]); "
        "every model setup is a fresh build from the same seed, so its weights equal the default's before it changes "
        "them (fp8 and LoRA change the numbers: their Δ is their approximation, or the LoRA's own effect)",
        "- not run: the option cannot run here (the reason says why); skipped: it did not fit the time budget",
        "",
    ]


def target_lines(results: dict[str, Any]) -> list[str]:
    lines = ["## Targets (14B full, 81×480×832)", "", "| target | goal | measured | verdict |", "|---|---|---|---|"]
    for t in results.get("targets") or evaluate_targets(results):
        measured = "—"
        if "measured" in t:
            mfu = f", MFU {fmt(t['mfu'])}" if t.get("mfu") is not None else ""
            measured = f"{fmt(t['measured'])} {t['unit']} ({t['option']}{mfu})"
        elif "closest" in t:
            measured = f"closest measured: {t['closest']['option']} {fmt(t['closest']['measured'])} {t['unit']}"
        note = f"; {t['note']}" if t.get("note") else ""
        lines.append(f"| {t['target']} | {t['goal']} | {measured} | {t['verdict']}{note} |")
    return [*lines, ""]


def variant_intro(var: dict[str, Any]) -> list[str]:
    f = var["flops"]
    lines = [
        f"## {var['variant']}: {var['video'][0]}×{var['video'][1]}×{var['video'][2]}, {f['tokens']:,} tokens, "
        f"{var['passes']} guidance passes, {f['total'] / 1e12:,.0f} TFLOP/step "
        f"(self-attention {f['self_attention'] / f['total']:.0%})",
        "",
        f"Built in {fmt(var.get('build_s'), 1)} s: {fmt(var.get('parameters_billion'), 2)} B parameters "
        f"(DiT + adapters), {fmt(var.get('weights_gb'), 1)} GB allocated.",
        "",
    ]
    setups = [s for s in var.get("setups", []) if s["setup"] != "plain"]
    if setups:
        lines += [f"- model setup {setup_text(s)}" for s in setups] + [""]
    return lines


def setup_text(setup: dict[str, Any]) -> str:
    parts = [f"`{setup['setup']}` ({', '.join(setup['options'])}): built in {fmt(setup.get('build_s'))} s"]
    if "lora_layers" in setup:
        parts.append(f"LoRA read and applied to {setup['lora_layers']} layers in {fmt(setup['lora_s'])} s")
    if "fp8_layers" in setup:
        parts.append(f"{setup['fp8_layers']} linears quantized to fp8 in {fmt(setup['quantize_s'])} s")
    if "error" in setup:
        parts.append(f"failed: {setup['error']}")
    return "; ".join(parts)


STEP_COLUMNS = (
    "| option | warm-up s | s/step | MFU | passes/step | decode s | peak GB | graphs compiled (in timed steps) "
    "| Δ latents max / mean | Δ frames max / mean | note |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
)


def step_table(rows: list[dict]) -> list[str]:
    lines = list(STEP_COLUMNS)
    for row in rows:
        if row["status"] != "ok":
            lines.append(not_ok_line(row, 11))
            continue
        steps = ", ".join(fmt(s, 2) for s in row["step_s"])
        finite = "" if row["finite"] else " NON-FINITE latents"
        lines.append(
            f"| {row['option']} | {fmt(row['warmup_s'])} | {fmt(row['s_per_step'])} ({steps}) "
            f"| {fmt(row.get('mfu'))} | {fmt(row.get('passes_per_step'), 1)} | {fmt(row['decode_s'])} "
            f"| {fmt(row.get('peak_gb'), 1)} | {row['graphs_compiled']} ({row['graphs_compiled_in_timed_steps']}) "
            f"| {delta_text(row, 'latents_delta')} | {delta_text(row, 'frames_delta')} | {row['note']}{finite} |"
        )
    return [*lines, ""]


VIDEO_COLUMNS = (
    "| option | warm-up s (1 step, first calls, compile) | s/video | conditioning s | s/step (4 steps) | MFU "
    "| passes/step | decode s | peak GB | graphs compiled (in timed video) | Δ frames max / mean | note |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
)


def video_table(rows: list[dict], lora: dict | None) -> list[str]:
    lines = [
        "### 4-step LoRA path: one whole video, fused LoRA, guidance_scale 1.0 (one pass per step), distill sampler "
        "(flow_shift 5.0), decode included",
        "",
    ]
    if lora:
        lines += [
            f"A random rank-{lora['rank']} LoRA in the Wan key layout ({lora['layers']} layers: self- and "
            f"cross-attention q, k, v, o and the feed-forward), {fmt(lora['mb'], 0)} MB written to a temporary "
            f".safetensors in {fmt(lora['write_s'], 1)} s and read with `read_lora` like a user's file. Random "
            "LoRA weights change no shape or kernel: a real 4-step LoRA runs at these times (its frames would not "
            "be noise). The conditioning is timed for a new prompt and face (caches cleared) with the one-layer "
            "text-encoder stand-in: the real UMT5-XXL adds its own time per new prompt (not measured here).",
            "",
        ]
    lines += list(VIDEO_COLUMNS)
    for row in rows:
        if row["status"] != "ok":
            lines.append(not_ok_line(row, 12))
            continue
        steps = ", ".join(fmt(s, 2) for s in row["step_s"])
        finite = "" if row["finite"] else " NON-FINITE latents"
        lines.append(
            f"| {row['option']} | {fmt(row['warmup_s'])} | **{fmt(row['s_per_video'])}** "
            f"| {fmt(row['conditioning_s'])} | {fmt(row['s_per_step'])} ({steps}) | {fmt(row.get('mfu'))} "
            f"| {fmt(row['passes_per_step'], 1)} | {fmt(row['decode_s'])} | {fmt(row.get('peak_gb'), 1)} "
            f"| {row['graphs_compiled']} ({row['graphs_compiled_in_timed_video']}) | {delta_text(row, 'frames_delta')} "
            f"| {row['note']}{finite} |"
        )
    return [*lines, ""]


def fidelity_lines(results: dict[str, Any]) -> list[str]:
    lines = [
        "## float32 on this device (tiny checkpoint, 9×64×96, 4 steps) vs the CPU in float32",
        "",
        f"PyTorch's flags as found: `{results['fp32_flags_found']}`.",
        "",
        "| variant | run | max |Δ| | mean |Δ| |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['run']} | {sci(r['max'])} | {sci(r['mean'])} |" for r in results["fidelity"]]
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    lines = header_lines(results) + target_lines(results)
    for var in results["variants"]:
        rows = var["rows"]
        lines += variant_intro(var)
        lines += step_table([r for r in rows if r.get("kind", "steps") == "steps"])
        videos = [r for r in rows if r.get("kind") == "video"]
        if videos:
            lines += video_table(videos, results.get("lora_file"))
    if results.get("fidelity"):
        lines += fidelity_lines(results)
    if results.get("errors"):
        lines += ["## Errors", "", *[f"- {e}" for e in results["errors"]], ""]
    return "\n".join(lines)
