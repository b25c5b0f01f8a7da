"""Run the *official* Lynx inference on a (tiny) checkpoint and save its float32 frames: the fidelity reference.

Runs in a separate venv with the official pins (diffusers 0.33.1, transformers 4.50.2); imports the official code
from ``--official-dir`` (a checkout of the public bytedance/lynx repo, never copied here) and a CPU stand-in for
``flash_attn`` from ``--stub-dir``. It does what the official ``generate_t2v`` does (resampler on the embedding and
on zeros, reference buffers from the aligned face and from the zero image with generators seeded ``seed + 1``,
latents from a generator seeded ``seed``) and calls the official pipeline with ``output_type="np"``; the NSFW
classifiers and the video export are left out. Two adjustments so a tiny checkpoint fits the official loaders,
both keeping the official code path: the hard-coded 14B sizes are replaced by the checkpoint's (the resampler
class and lite's ``register_ip_adapter_wan`` are wrapped), and the Ref-adapter is registered in the run dtype (the
official loader forces bf16, which fails in an fp32 run).

    python lynx_fidelity_official.py --official-dir /path/lynx --stub-dir /path/stub --checkpoint TINY \
        --variant full --inputs inputs.npz --out official.npy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def dump_official_shapes(out: str) -> None:
    """The key -> shape maps the official loaders build for the 14B checkpoints (their hard-coded sizes), on meta."""
    import torch
    from modules.common.resampler import Resampler
    from modules.full.attention_processor import register_ip_adapter, register_ref_adapter
    from modules.full.transformer_wan import WanTransformer3DModel as FullWan
    from modules.lite.attention_processor import register_ip_adapter_wan
    from modules.lite.trasnformer_wan import WanTransformer3DModel as LiteWan

    shapes = {}
    with torch.device("meta"):
        for variant, output_dim in (("full", 5120), ("lite", 2048)):
            resampler = Resampler(
                depth=4,
                dim=1280,
                dim_head=64,
                embedding_dim=512,
                ff_mult=4,
                heads=20,
                num_queries=16,
                output_dim=output_dim,
            )
            files = {"resampler.safetensors": {k: list(v.shape) for k, v in resampler.state_dict().items()}}
            if variant == "full":
                model = FullWan()
                model, ip_layers = register_ip_adapter(model, cross_attention_dim=5120, n_registers=0)
                model, ref_layers = register_ref_adapter(model)
                files["ref_layers.safetensors"] = {k: list(v.shape) for k, v in ref_layers.state_dict().items()}
            else:
                model = LiteWan()
                model, ip_layers = register_ip_adapter_wan(model, cross_attention_dim=2048, hidden_size=5120, layers=2)
            files["ip_layers.safetensors"] = {k: list(v.shape) for k, v in ip_layers.state_dict().items()}
            files["transformer"] = {
                k: list(v.shape)
                for k, v in model.state_dict().items()
                if ".processor." not in k  # adapter weights live in their own files
            }
            shapes[variant] = files
    Path(out).write_text(json.dumps(shapes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official-dir", required=True)
    ap.add_argument("--stub-dir", required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--variant", choices=["full", "lite"])
    ap.add_argument("--inputs", help=".npz with embedding, face, and a json 'job' (or image, kps)")
    ap.add_argument("--align", action="store_true", help="only run the official 256 reference-face alignment")
    ap.add_argument(
        "--dump-shapes", action="store_true", help="only write the official 14B adapter key -> shape maps (meta device)"
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    sys.path[:0] = [args.stub_dir, args.official_dir]
    if args.dump_shapes:
        dump_official_shapes(args.out)
        return
    if args.align:
        from modules.common.face_utils import align_face
        from PIL import Image

        data = np.load(args.inputs)
        face = align_face(Image.fromarray(data["image"]), data["kps"], extend_face_crop=True, face_size=256)
        np.save(args.out, np.asarray(face))
        return

    import torch
    from diffusers import UniPCMultistepScheduler
    from PIL import Image
    from safetensors.torch import load_file

    data = np.load(args.inputs)
    job = json.loads(str(data["job"]))
    embedding = data["embedding"].astype(np.float32)
    face = Image.fromarray(data["face"])
    base = str(Path(args.checkpoint) / "Wan2.1-T2V-14B-Diffusers")
    adapter = Path(args.checkpoint) / f"lynx_{args.variant}"
    sizes = json.loads((adapter / "lynx_adapter.json").read_text())
    res = load_file(str(adapter / "resampler.safetensors"))
    dim = res["latents"].shape[2]
    dim_head = sizes["resampler_dim_head"]
    tiny_resampler = dict(
        dim=dim,
        depth=len({k.split(".")[1] for k in res if k.startswith("layers.")}),
        dim_head=dim_head,
        heads=res["layers.0.0.to_q.weight"].shape[0] // dim_head,
        num_queries=res["latents"].shape[1],
        embedding_dim=res["proj_in.weight"].shape[1],
        output_dim=res["proj_out.weight"].shape[0],
        ff_mult=res["layers.0.1.1.weight"].shape[0] // dim,
    )
    import modules.common.resampler as official_resampler

    original = official_resampler.Resampler
    official_resampler.Resampler = lambda **kw: original(**{**kw, **tiny_resampler})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    seed = int(job["seed"])
    gen = torch.Generator().manual_seed(seed)

    if args.variant == "full":
        from modules.full.attention_processor import register_ref_adapter
        from modules.full.lynx_pipeline import LynxWanPipeline

        pipe = LynxWanPipeline.from_pretrained(base, torch_dtype=dtype)
        pipe.scheduler = UniPCMultistepScheduler.from_pretrained(base, subfolder="scheduler", torch_dtype=dtype)
        pipe.init_image_proj_modules(str(adapter), device="cpu", dtype=dtype)
        pipe.transformer, ref_layers = register_ref_adapter(pipe.transformer, dtype=dtype)
        ref_layers.load_state_dict(load_file(str(adapter / "ref_layers.safetensors")))
        pipe.to("cpu")
        with torch.no_grad():
            arc = torch.from_numpy(embedding).to(dtype=dtype)[None, None, :]
            ip = [pipe.resampler(arc)]
            ip0 = [pipe.resampler(arc * 0)]
            ref = pipe.encode_reference_images([face], generator=torch.Generator().manual_seed(seed + 1))
            ref0 = pipe.encode_reference_images([face], drop=True, generator=torch.Generator().manual_seed(seed + 1))
            frames = pipe(
                prompt=job["prompt"],
                negative_prompt=job["negative_prompt"],
                height=job["height"],
                width=job["width"],
                num_inference_steps=job["num_inference_steps"],
                num_frames=job["num_frames"],
                guidance_scale=job["guidance_scale"],
                guidance_scale_i=job["guidance_scale_i"],
                generator=gen,
                output_type="np",
                attention_kwargs={
                    "ip_hidden_states": ip,
                    "ip_scale": job["ip_scale"],
                    "ref_buffer": ref,
                    "ref_scale": job["ref_scale"],
                },
                attention_kwargs_uncond={
                    "ip_hidden_states": ip0,
                    "ip_scale": job["ip_scale"],
                    "ref_buffer": ref0,
                    "ref_scale": job["ref_scale"],
                },
            ).frames[0]
    else:
        import modules.lite.lynx_lite_pipeline as lite_pipeline

        ip_keys = load_file(str(adapter / "ip_layers.safetensors"))
        in_dim, hidden = ip_keys["0.to_k_ip.weight"].shape[1], ip_keys["0.to_k_ip.weight"].shape[0]
        register = lite_pipeline.register_ip_adapter_wan
        lite_pipeline.register_ip_adapter_wan = lambda model, **kw: register(
            model, **{**kw, "cross_attention_dim": in_dim, "hidden_size": hidden}
        )
        pipe = lite_pipeline.LynxLiteWanPipeline.from_pretrained(base, torch_dtype=dtype)
        pipe.scheduler = UniPCMultistepScheduler.from_pretrained(base, subfolder="scheduler", torch_dtype=dtype)
        pipe.init_image_proj_modules(str(adapter), device="cpu", dtype=dtype)
        pipe.to("cpu")
        with torch.no_grad():
            frames = pipe(
                prompt=job["prompt"],
                negative_prompt=job["negative_prompt"],
                face_embeds=embedding,
                ip_scale=job["ip_scale"],
                height=job["height"],
                width=job["width"],
                num_inference_steps=job["num_inference_steps"],
                num_frames=job["num_frames"],
                guidance_scale=job["guidance_scale"],
                generator=gen,
                output_type="np",
            ).frames[0]
    np.save(args.out, np.asarray(frames, dtype=np.float32))
    print(json.dumps({"timesteps": [int(t) for t in pipe.scheduler.timesteps], "shape": list(np.shape(frames))}))


if __name__ == "__main__":
    main()
