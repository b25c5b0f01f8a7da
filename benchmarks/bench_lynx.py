"""Lynx on the tiny checkpoint (CPU): seconds per denoising step and per video, DiT forwards per video, and the
speed-ups from batched guidance and from reuse when one portrait meets many prompts.

    python benchmarks/bench_lynx.py                       # writes a tiny checkpoint to a temp dir first
    python benchmarks/bench_lynx.py --checkpoint DIR --variant full --steps 4 --repeats 5 --json out.json

Figures are medians over ``--repeats`` warm runs. "Official forwards" is what the official full pipeline does for
one video (2 reference passes + 3 per step; lite: 1 batched forward per step); ours counts transformer calls
(batched: one per step) and samples through the transformer (the work, which batching does not reduce).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from farm.models.lynx.loader import load_lynx
from farm.models.lynx.pipeline import OFFICIAL_NEGATIVE_PROMPT, LynxPipeline, Options
from farm.models.lynx.tiny import BASE_DIRNAME, make_tiny_checkpoint
from farm.params import SamplingParams

PROMPTS = [
    "A woman in an orange flight suit walks along a beach at sunset, waves behind her, cinematic light.",
    "A woman smiles at her laptop in a bright modern office, handheld camera.",
    "A man drinks coffee in a cozy cafe and looks out of the window, soft morning light.",
    "A person laughs with friends at a party, warm light.",
    "A person holds a cup of coffee.",
    "A portrait of a person talking to the camera in a studio, close-up, natural light, smiling.",
    "A person rides a bicycle through a park in autumn.",
    "A person reads a book on a train, rain on the window.",
]


def timed_video(pipe: LynxPipeline, emb, face, prompt: str, params: SamplingParams, seed: int, batched: bool):
    stamps: list[float] = []
    pipe.reset_counters()
    start = time.perf_counter()
    frames = pipe.generate(
        emb,
        face,
        prompt,
        OFFICIAL_NEGATIVE_PROMPT,
        params,
        seed,
        batch_guidance=batched,
        progress=lambda i, n: stamps.append(time.perf_counter()),
    )
    total = time.perf_counter() - start
    steps = np.diff(stamps).tolist()
    return frames, total, steps, pipe.dit_forwards, pipe.dit_samples


def bench_variant(ckpt: Path, variant: str, params: SamplingParams, repeats: int, n_prompts: int) -> dict:
    model = load_lynx(str(ckpt / BASE_DIRNAME), str(ckpt / f"lynx_{variant}"), variant)
    pipe = LynxPipeline(model, Options())
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal(512) * 20).astype(np.float32)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    if variant == "lite":
        params = replace(params, guidance_scale_i=None)
    out: dict = {"variant": variant, "params": params.as_dict()}
    timed_video(pipe, emb, face, PROMPTS[0], params, 0, True)  # warm-up (first-call allocations)

    for batched in (True, False):
        totals, steps = [], []
        for r in range(repeats):
            pipe.clear_caches()  # cold: every conditioning is computed
            _, total, st, forwards, samples = timed_video(pipe, emb, face, PROMPTS[0], params, 100 + r, batched)
            totals.append(total)
            steps.extend(st)
        key = "batched" if batched else "unbatched"
        out[key] = {
            "s_per_video": statistics.median(totals),
            "s_per_step": statistics.median(steps) if steps else None,
            "dit_forwards_per_video": forwards,
            "dit_samples_per_video": samples,
        }
    out["batched_speedup"] = out["unbatched"]["s_per_video"] / out["batched"]["s_per_video"]
    out["official_forwards_per_video"] = (
        2 + params.guidance_passes() * params.num_inference_steps if variant == "full" else params.num_inference_steps
    )

    # One portrait, many prompts (same seed, as a sweep over prompts does): cold vs warm caches.
    cold, warm = [], []
    for prompt in PROMPTS[:n_prompts]:
        pipe.clear_caches()
        cold.append(timed_video(pipe, emb, face, prompt, params, 7, True)[1])
    pipe.clear_caches()
    timed_video(pipe, emb, face, "warm-up prompt", params, 7, True)  # portrait conditioning now cached
    for prompt in PROMPTS[:n_prompts]:
        warm.append(timed_video(pipe, emb, face, prompt, params, 7, True)[1])
    out["reuse"] = {
        "prompts": n_prompts,
        "cold_s_per_video": statistics.median(cold),
        "warm_s_per_video": statistics.median(warm),
        "speedup": statistics.median(cold) / statistics.median(warm),
        "ref_cache_hits": pipe.ref_cache.hits,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a tiny (or other) checkpoint folder; default: write one to a temp dir")
    ap.add_argument("--variant", choices=["full", "lite", "both"], default="both")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        ckpt = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench-lynx-")) / "tiny", seed=0)
    params = SamplingParams(
        num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps
    )
    variants = ["full", "lite"] if args.variant == "both" else [args.variant]
    results = {"torch_threads": torch.get_num_threads(), "runs": []}
    for variant in variants:
        r = bench_variant(ckpt, variant, params, args.repeats, args.prompts)
        results["runs"].append(r)
        b, u, reuse = r["batched"], r["unbatched"], r["reuse"]
        print(
            f"{variant}: {b['s_per_video']:.3f} s/video, {b['s_per_step']:.3f} s/step batched "
            f"({u['s_per_video']:.3f} s/video, {u['s_per_step']:.3f} s/step unbatched; x{r['batched_speedup']:.2f}); "
            f"DiT forwards/video: ours {b['dit_forwards_per_video']} batched ({b['dit_samples_per_video']} samples), "
            f"{u['dit_forwards_per_video']} unbatched, official {r['official_forwards_per_video']}; "
            f"one portrait x {reuse['prompts']} prompts: {reuse['cold_s_per_video']:.3f} -> "
            f"{reuse['warm_s_per_video']:.3f} s/video (x{reuse['speedup']:.2f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
