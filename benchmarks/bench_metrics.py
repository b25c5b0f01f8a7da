"""Metric cost per video on this CPU, next to the measured GPU time that made the video.

    nice python benchmarks/bench_metrics.py [--md benchmarks/results/metrics_cpu.md] [--videos 3]
        [--metrics identity,identity_facexlib,motion,clip] [--frames 81] [--size 480x832]

Each metric is built from a job-spec entry (``farm.metrics.build_metric``), set up on the CPU, warmed up on one video,
then ``score(frames, portrait, prompt)`` is timed on ``--videos`` further videos; the table gives the median wall
seconds and the CPU seconds of that run (all threads). The videos are Lynx-sized (81 frames of 480x832 by default,
uint8 in memory: decoding is not included) and made from a real face: scikit-image's astronaut placed in the frame,
drifting and zooming slightly, a different path per video, so every sampled frame has a face (the detector and the
embedder run on every sampled frame: scoring's worst case). Every metric samples 16 frames (``motion``: 16 pairs of
consecutive frames), whatever the video's length.

Weights: ``identity`` is dlib (its real shipped weights); ``identity_facexlib`` is the official IR-SE50 ArcFace
architecture (``farm.models.lynx.arcface.OFFICIAL``) with random weights, saved as a ``.pth`` and loaded through the
metric; ``clip`` is a CLIP ViT-L/14 (``openai/clip-vit-large-patch14`` sizes: 24-layer 1024-wide vision tower at
224 px, patch 14; 12-layer 768-wide text tower; 49,408-token embedding) with random weights, saved with
``save_pretrained`` and loaded through the metric. Random weights change no shape and no kernel, so no compute; the
scores are meaningless. The CLIP folder's tokenizer is ``farm.metrics.tiny_clip``'s byte-level BPE (few merges: a
prompt makes more tokens than with the real vocabulary, at most 77; the text tower is a small part of the cost).

GPU time per video comes from ``benchmarks/results/lynx_gpu_h200.json`` (an H200, random 14B weights):
``schedule x s/step + decode + conditioning``, i.e. 50 denoising steps of the default and compiled options plus the
VAE decode, from the first run that measured the option; text encoding and the face/reference preparation are not in
it, so the real GPU time per video is a little longer and the shares in the table are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GPU_JSON = ROOT / "benchmarks" / "results" / "lynx_gpu_h200.json"
ASTRONAUT = "pkg://skimage/data/astronaut.png"
PROMPT = "A woman in an orange flight suit walks along a beach at sunset, waves behind her, cinematic light."
METRICS = ("identity", "identity_facexlib", "motion", "clip")

# openai/clip-vit-large-patch14's config.json sizes
CLIP_L14_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
)
CLIP_L14_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    num_channels=3,
    hidden_act="quick_gelu",
)
CLIP_L14_PROJECTION = 768


# --- inputs --------------------------------------------------------------------------------------------------------
def make_video(portrait: np.ndarray, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """``frames`` uint8 frames: the portrait (face side ~0.8 of the height) on a textured background, drifting and
    zooming slightly along a per-seed path (a few pixels per frame, like a talking-head clip)."""
    import cv2

    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (0, 0), 6)
    side = int(0.8 * height)
    face = cv2.resize(portrait, (side, side), interpolation=cv2.INTER_AREA)
    canvas = background.copy()
    y0, x0 = (height - side) // 2, (width - side) // 2
    canvas[y0 : y0 + side, x0 : x0 + side] = face
    direction = rng.uniform(-1.0, 1.0, size=2)
    speed = rng.uniform(0.8, 2.0)  # pixels per frame
    zoom = rng.uniform(-0.0015, 0.0015)  # scale change per frame
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    centre = (width / 2, height / 2)
    for t in range(frames):
        shift = direction * speed * t
        shift = np.clip(shift, -x0 * 0.9, x0 * 0.9) if x0 else shift
        matrix = cv2.getRotationMatrix2D(centre, 0.05 * t * direction[0], 1.0 + zoom * t)
        matrix[:, 2] += (shift[0], shift[1] * 0.3)
        out[t] = cv2.warpAffine(canvas, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)
    return out


def write_clip_l14(folder: Path, seed: int = 0) -> Path:
    """A CLIP ViT-L/14-sized folder with random weights (tokenizer: tiny_clip's), loadable by the ``clip`` metric."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from farm.metrics.tiny_clip import BOS, EOS, write_preprocessor, write_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(folder)
    text = dict(CLIP_L14_TEXT, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    config = CLIPConfig(text_config=text, vision_config=CLIP_L14_VISION, projection_dim=CLIP_L14_PROJECTION)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    write_preprocessor(folder, CLIP_L14_VISION["image_size"])
    return folder


def metric_spec(name: str, workdir: Path) -> tuple[dict[str, Any], str, float]:
    """The job-spec entry for ``name`` (writing random real-size weights where it needs some), its weights label,
    and the seconds spent writing them."""
    start = time.perf_counter()
    if name == "identity":
        return {"name": "identity", "recognizer": "dlib"}, "dlib (shipped weights)", 0.0
    if name == "identity_facexlib":
        from farm.models.lynx.arcface import OFFICIAL, write_tiny_irse50

        path = write_tiny_irse50(workdir / "recognition_arcface_ir_se50.pth", config=OFFICIAL)
        mb = path.stat().st_size / 1e6
        label = f"IR-SE50 official size, random ({mb:.0f} MB) + dlib detector"
        return {"name": name, "weights": str(path)}, label, time.perf_counter() - start
    if name == "motion":
        return {"name": "motion"}, "none (OpenCV Farneback)", 0.0
    if name == "clip":
        folder = write_clip_l14(workdir / "clip-vit-large-patch14-random")
        gb = sum(p.stat().st_size for p in folder.iterdir()) / 1e9
        label = f"CLIP ViT-L/14 size, random ({gb:.1f} GB)"
        return {"name": name, "weights": str(folder)}, label, time.perf_counter() - start
    raise SystemExit(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")


# --- measurement ---------------------------------------------------------------------------------------------------
def timed(fn) -> tuple[float, float, Any]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall0, time.process_time() - cpu0, out


def bench_metric(name: str, workdir: Path, videos: list[np.ndarray], portrait: np.ndarray) -> dict[str, Any]:
    from farm.metrics import build_metric

    spec, weights, write_s = metric_spec(name, workdir)
    metric = build_metric(spec)
    setup_s, _, _ = timed(lambda: metric.setup("cpu"))
    warm_s, _, warm = timed(lambda: metric.score(videos[0], portrait, PROMPT))
    runs = [timed(lambda v=v: metric.score(v, portrait, PROMPT)) for v in videos[1:]]
    walls = [r[0] for r in runs]
    median = statistics.median(walls)
    cpu = statistics.median(r[1] for r in runs)
    row = {
        "metric": name,
        "weights": weights,
        "write_s": write_s,
        "setup_s": setup_s,
        "warmup_s": warm_s,
        "walls": walls,
        "wall_s": median,
        "cpu_s": cpu,
        "columns": {k: v for k, v in runs[-1][2].items() if not k.endswith("_model")},
        "warmup_columns": {k: v for k, v in warm.items() if not k.endswith("_model")},
    }
    if name == "identity":  # how much of it is dlib's face detection (identity_facexlib runs the same detector)
        from farm.metrics.sampling import sample_indices

        detector = metric.recognizer.detector
        picked = [np.ascontiguousarray(videos[1][int(i)]) for i in sample_indices(len(videos[1]), metric.frames)]
        row["detect_s"] = timed(lambda: [detector.detect(f) for f in picked])[0]
    return row


def gpu_seconds(path: Path = GPU_JSON) -> list[dict[str, Any]]:
    """Seconds of GPU per video from the H200 run: 50 x s/step + decode + conditioning, per variant and option."""
    data = json.loads(path.read_text())
    results = data["runs"][0]["results"]
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for run in data["runs"]:
        for variant in run["results"]["variants"]:
            for row in variant["rows"]:
                key = (variant["variant"], row["option"])
                if row.get("status") != "ok" or key in found or row["option"] not in ("default", "compile"):
                    continue
                steps = run["results"]["schedule"]
                total = steps * row["s_per_step"] + row["decode_s"] + row.get("conditioning_s", 0.0)
                found[key] = {
                    "variant": variant["variant"],
                    "option": row["option"],
                    "video": "x".join(str(v) for v in variant["video"]),
                    "s_per_step": row["s_per_step"],
                    "steps": steps,
                    "decode_s": row["decode_s"],
                    "seconds": total,
                    "device": results["environment"]["device_name"],
                }
    order = [("full", "default"), ("full", "compile"), ("lite", "default"), ("lite", "compile")]
    return [found[k] for k in order if k in found]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    load = os.getloadavg()[0]
    return (
        f"{platform.platform()}, {os.cpu_count()} CPU cores ({cpu_model()}), "
        f"Python {platform.python_version()}; 1-minute load average at the start {load:.1f}"
    )


def versions() -> str:
    import cv2
    import dlib
    import torch
    import transformers

    return (
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"OpenCV {cv2.__version__}, dlib {dlib.__version__}"
    )


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]], gpu: list[dict[str, Any]], info: dict) -> str:
    command = "nice python benchmarks/bench_metrics.py " + " ".join(sys.argv[1:])
    lines = [
        "# Metric cost per video on this CPU, as a share of the GPU time that made the video",
        "",
        f"- command: `{command.strip()}`",
        f"- date: {info['date']}; machine: {info['machine']}; load average at the end {os.getloadavg()[0]:.1f}"
        " (other developers and CI may have been running on it: wall times are indicative)",
        f"- software: {info['versions']}",
        f"- videos: {args.frames} frames of {args.height}x{args.width} uint8 in memory (no decode), scikit-image's"
        " astronaut drifting and zooming slightly on a textured background, a different path per video; every"
        " metric samples 16 frames (motion: 16 consecutive pairs, 32 frames converted to grey)",
        f"- timing: one warm-up video after `setup`, then {args.videos} videos; wall s = median of those,"
        " CPU s = the median process CPU time (all threads)",
        "- weights: random at real size where the metric loads a network (random weights change no compute,"
        " the scores mean nothing); see the module docstring",
        "",
        "## Per metric (s per video = 16 sampled frames)",
        "",
        "| metric | weights | wall s / video | CPU s / video | runs (s) | setup s | warm-up s"
        " | output of the last run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = ", ".join(f"{w:.2f}" for w in row["walls"])
        cols = ", ".join(f"{k}={_fmt(v)}" for k, v in row["columns"].items())
        lines.append(
            f"| `{row['metric']}` | {row['weights']} | **{row['wall_s']:.2f}** | {row['cpu_s']:.2f} | {runs} |"
            f" {row['setup_s']:.1f} | {row['warmup_s']:.2f} | {cols} |"
        )
    total = sum(r["wall_s"] for r in rows)
    lines += [
        f"| all {len(rows)} | | **{total:.2f}** | {sum(r['cpu_s'] for r in rows):.2f} | | | | |",
        "",
    ]
    ident = next((r for r in rows if "detect_s" in r), None)
    if ident:
        lines += [
            f"dlib's HOG face detection alone on the 16 sampled frames: {ident['detect_s']:.2f} s (of `identity`'s"
            f" {ident['wall_s']:.2f} s); `identity_facexlib` runs the same detector, then IR-SE50 on one 112x112"
            " crop per frame. Both cache the portrait's embedding (computed once per portrait, not timed here).",
            "",
        ]
    lines += [
        "## Share of the GPU time per video (NVIDIA H200, `benchmarks/results/lynx_gpu_h200.md`)",
        "",
        "GPU s / video = 50 steps x s/step + VAE decode + conditioning, from the first run that measured the option"
        " (lite compile: run 2); text encoding and face preparation are not included, so the shares are slight"
        " upper bounds. Share = metric wall s on this CPU / GPU s.",
        "",
        "| Lynx | video FxHxW | s/step | GPU s / video | "
        + " | ".join(f"`{r['metric']}`" for r in rows)
        + f" | all {len(rows)} |",
        "|---|---|---|---|" + "---|" * (len(rows) + 1),
    ]
    for g in gpu:
        shares = [f"{100 * r['wall_s'] / g['seconds']:.2f}%" for r in rows]
        lines.append(
            f"| {g['variant']} {g['option']} | {g['video']} | {g['s_per_step']:.2f} | {g['seconds']:.0f} | "
            + " | ".join(shares)
            + f" | {100 * total / g['seconds']:.2f}% |"
        )
    lines += [
        "",
        "Notes:",
        "",
        "- The cost per video does not depend on the video's length: each metric samples a fixed 16 frames;"
        " the lite variant's 121-frame videos cost the same to score as full's 81.",
        "- `clip` and `identity_facexlib` declare `device = 'gpu'`: given a GPU they would run there (not"
        " measured here); these are their costs where they run on the CPU.",
        "- Decoding the mp4 (`farm.video.decode_video`) before scoring is not included; see `bench_identity.py`.",
    ]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", default=",".join(METRICS))
    parser.add_argument("--videos", type=int, default=3, help="timed videos per metric, after one warm-up video")
    parser.add_argument("--frames", type=int, default=81, help="frames per video (Lynx full: 81)")
    parser.add_argument("--size", default="480x832", help="HxW (Lynx: 480x832)")
    parser.add_argument("--md", help="write the markdown table here")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()
    args.height, args.width = (int(v) for v in args.size.split("x"))
    if args.videos < 1:
        parser.error("--videos must be at least 1")

    from farm import storage

    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
    }
    portrait = storage.read_image(ASTRONAUT)
    videos = [make_video(portrait, args.frames, args.height, args.width, seed) for seed in range(args.videos + 1)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        for name in args.metrics.split(","):
            row = bench_metric(name.strip(), Path(tmp), videos, portrait)
            print(
                f"{row['metric']:>18}: {row['wall_s']:.2f} s/video wall (runs {row['walls']}), {row['cpu_s']:.2f} "
                f"CPU s; setup {row['setup_s']:.1f} s, weights written in {row['write_s']:.1f} s; {row['columns']}",
                flush=True,
            )
            rows.append(row)
    gpu = gpu_seconds()
    text = markdown(args, rows, gpu, info)
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "metrics": rows, "gpu": gpu}, indent=1, default=str))


if __name__ == "__main__":
    main()
