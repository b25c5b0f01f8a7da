"""Identity scoring throughput: frames scored per second, and per CPU-second (i.e. per core), per recognizer.

    python benchmarks/bench_identity.py [--sizes 480x832,256x256] [--frames 16] [--repeats 3] [--pack DIR]
        [--backend lynx --variant full --weights base=DIR/base --weights lynx=DIR/lynx_full --steps 4]

The video is what the farm really scores: the ``still`` baseline's clip of scikit-image's astronaut, H.264-encoded by
``farm.video`` and decoded back. ``score`` times ``Recognizer.score_frames`` (detect + largest face + embed + compare
on every sampled frame); ``decode`` times the mp4 decode that precedes it; the portrait embedding is timed apart
(it is computed once per portrait). With ``--backend`` (e.g. ``lynx`` on the tiny checkpoint, or ``still``) the
same F x H x W video is also generated once on this CPU and ``score/gen`` is the scoring cost relative to that
generation (the scored clip stays the still one, so every sampled frame has a face: scoring's worst case).
CPU time is the process's (all threads), so ``frames/cpu-s`` is the per-core
rate even when a library spreads over several cores. dlib runs its real shipped weights. Without ``--pack`` the
insightface row uses the tiny random-weight pack (plumbing cost only: its detector is a pooling layer, a real SCRFD
costs far more), and is labelled so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from farm import storage
from farm.identity.recognizer import Recognizer, build_recognizer
from farm.identity.tiny_pack import write_tiny_insightface_pack
from farm.models import build_backend
from farm.models.still import StillBackend
from farm.params import SamplingParams
from farm.types import GenerationRequest, ModelSpec
from farm.video import decode_video, encode_mp4


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Best-of-``repeats`` wall seconds, the CPU seconds of that run, and its result."""
    best = (float("inf"), 0.0, None)
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if wall < best[0]:
            best = (wall, cpu, out)
    return best


def still_clip(num_frames: int, height: int, width: int) -> bytes:
    backend = StillBackend(ModelSpec(backend="still"))
    backend.setup("cpu")
    portrait = storage.read_image("pkg://skimage/data/astronaut.png")
    params = SamplingParams(num_frames=num_frames, height=height, width=width, fps=16)
    frames = backend.generate(backend.prepare_subject(portrait), GenerationRequest("bench", "", "", params, 0))
    return encode_mp4(frames, 16)


def generation_seconds(args: argparse.Namespace, height: int, width: int) -> float:
    """Wall seconds of one ``generate`` call of ``args.backend`` at this size (after setup and a warm-up)."""
    weights = dict(item.split("=", 1) for item in args.weights)
    backend = build_backend(ModelSpec(backend=args.backend, variant=args.variant, weights=weights))
    backend.setup("cpu")
    subject = backend.prepare_subject(storage.read_image("pkg://skimage/data/astronaut.png"))
    overrides: dict[str, Any] = {"num_frames": args.video_frames, "height": height, "width": width}
    if args.steps:
        overrides["num_inference_steps"] = args.steps
    params = backend.default_params().with_overrides(overrides)
    request = GenerationRequest("bench", "a person talking to the camera", "", params, 0)
    backend.generate(subject, request)
    wall, _, _ = timed(lambda: backend.generate(subject, request), 1)
    backend.teardown()
    return wall


def bench(label: str, rec: Recognizer, clip: bytes, k: int, repeats: int) -> dict[str, Any]:
    portrait = storage.read_image("pkg://skimage/data/astronaut.png")
    rec.portrait_embedding(portrait)  # warm-up (model load, sessions)
    p_wall, _, _ = timed(lambda: Recognizer(rec.kind, rec.detector, rec.embedder).portrait_embedding(portrait), 3)
    embedding = rec.portrait_embedding(portrait)
    d_wall, d_cpu, (frames, _) = timed(lambda: decode_video(clip), repeats)
    s_wall, s_cpu, metrics = timed(lambda: rec.score_frames(frames, embedding, k=k), repeats)
    scored = metrics["frames_scored"]
    return {
        "recognizer": label,
        "video": f"{frames.shape[0]}x{frames.shape[1]}x{frames.shape[2]}",
        "k": scored,
        "portrait_s": p_wall,
        "decode_s": d_wall,
        "score_s": s_wall,
        "fps_wall": scored / s_wall,
        "fps_cpu": scored / s_cpu if s_cpu > 0 else float("nan"),
        "cores_used": s_cpu / s_wall,
        "face_rate": metrics["face_rate"],
        "identity_mean": metrics["identity_mean"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="480x832,256x256", help="comma-separated HxW of the scored video")
    parser.add_argument("--frames", type=int, default=16, help="frames sampled per video (k)")
    parser.add_argument("--video-frames", type=int, default=33, help="frames in the clip (4k+1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pack", default=None, help="a real insightface pack (dir/zip/URI); default: the tiny one")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per model (1 = one core)")
    parser.add_argument("--backend", default=None, help="also time one generation with this backend (lynx, still)")
    parser.add_argument("--variant", default=None, help="backend variant (lynx: full | lite)")
    parser.add_argument("--weights", action="append", default=[], help="ROLE=URI for the backend (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps for the generation timing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp:
        pack = args.pack or str(write_tiny_insightface_pack(os.path.join(tmp, "tiny"), seed=0))
        ins_label = "insightface" if args.pack else "insightface (tiny random pack: plumbing only)"
        recognizers = [
            ("dlib (HOG + ResNet-128)", build_recognizer("dlib")),
            (ins_label, build_recognizer("insightface", pack, threads=args.threads)),
        ]
        rows = []
        for size in args.sizes.split(","):
            height, width = (int(v) for v in size.lower().split("x"))
            clip = still_clip(args.video_frames, height, width)
            gen_s = generation_seconds(args, height, width) if args.backend else None
            for label, rec in recognizers:
                row = bench(label, rec, clip, args.frames, args.repeats)
                row["generate_s"] = gen_s
                rows.append(row)

    print(f"command: python {' '.join(sys.argv)}")
    print(f"cpu cores visible: {os.cpu_count()}; onnxruntime threads per model: {args.threads}")
    if args.backend:
        print(f"generation: backend={args.backend} variant={args.variant} steps={args.steps or 'default'} on cpu")
    columns = ["recognizer", "video FxHxW", "k", "portrait s", "decode s", "score s", "frames/s", "frames/cpu-s"]
    columns += ["cores", "face_rate"] + (["generate s", "score/gen"] if args.backend else [])
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        cells = [r["recognizer"], r["video"], str(r["k"]), f"{r['portrait_s']:.3f}", f"{r['decode_s']:.3f}"]
        cells += [f"{r['score_s']:.3f}", f"{r['fps_wall']:.1f}", f"{r['fps_cpu']:.1f}", f"{r['cores_used']:.2f}"]
        cells.append(f"{r['face_rate']:.2f}")
        if args.backend:
            ratio = (r["score_s"] + r["decode_s"]) / r["generate_s"]
            cells += [f"{r['generate_s']:.3f}", f"{ratio:.3f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
