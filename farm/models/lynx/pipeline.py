"""One Lynx generation, top to bottom: inputs -> prompt embeddings -> ID tokens -> reference buffer -> latents ->
denoising loop with 3-pass (or 2-pass) guidance -> VAE decode -> float32 frames.

Numerics follow the official inference (fp32 on CPU agrees within 1e-3; see the fidelity harness):

* initial latents: ``randn`` of ``(1, 16, (F-1)//4+1, H/8, W/8)`` in fp32 from a CPU ``torch.Generator`` seeded with
  ``seed``; reference-image VAE sampling: a fresh CPU generator seeded ``seed + 1`` for the face and again for the
  all-zero image (so both draw the same noise);
* schedule: the official (diffusers 0.33.1) UniPC flow sigmas by default (``schedule="official"``);
  ``schedule="diffusers"`` uses the installed diffusers' own spacing instead (different frames); other samplers
  (``euler``, ``distill`` for step-distilled LoRAs) and ``flow_shift`` are in ``samplers.py``;
* prompts are cleaned as Wan does, padded to 512 tokens with zero embeddings, and the padding is attended;
* unconditional ID tokens = the resampler applied to a zero embedding; unconditional reference = the buffer from
  the all-zero image; the ID-only pass uses the negative prompt with the real ID tokens and reference.

Reuse inside a replica is lossless: prompt embeddings (per prompt), ID tokens (per embedding), the reference VAE
posterior (per face) and reference buffers (per face and seed, as the official sampling noise depends on the seed)
are kept in bounded LRU caches.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from farm.models.lynx import execution
from farm.models.lynx.loader import LynxModel
from farm.models.lynx.multi_gpu import DeviceCopies, PassModel, copy_to, split_passes
from farm.models.lynx.samplers import check_sampler, make_sampler
from farm.params import SamplingParams

REF_PROMPT = "image of a face"
MAX_TEXT_TOKENS = 512
REF_FACE_SIZE = 256
ARCFACE_DIM = 512
RefBuffer = tuple[torch.Tensor, ...]  # one recorded self-attention input per block, in block order

# The official scripts' negative prompt (infer.py / infer_lite.py).
OFFICIAL_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, blurred background, static, subtitles, style, works, paintings, images, overall gray, "
    "worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, "
    "three legs, many people in the background, walking backwards"
)


class LRU:
    """A small bounded mapping; ``get_or_make`` counts hits so benchmarks can report reuse."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[Any, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self.data:
            self.hits += 1
            self.data.move_to_end(key)
            return self.data[key]
        self.misses += 1
        value = make()
        if self.size > 0:
            self.data[key] = value
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        return value

    def clear(self) -> None:
        self.data.clear()


def digest(array: np.ndarray) -> str:
    arr = np.ascontiguousarray(array)
    return hashlib.sha256(arr.tobytes() + str((arr.dtype, arr.shape)).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Options:
    """Per-replica knobs. ``step_cache`` (a diffusers FirstBlockCache threshold) changes outputs; off by default.

    Cache bounds, with their device memory at 14B in bf16: a prompt embedding is 512 x 4096 (4 MB); a reference
    buffer is 40 layers x 256 tokens x 5120 (105 MB; two per portrait and seed, the zero-image one shared by all
    portraits); ID tokens and VAE posteriors are small.
    """

    batch_guidance: bool = True
    schedule: str = "official"
    sampler: str = "unipc"  # unipc | euler | distill (``samplers.py``)
    flow_shift: float | None = None  # None: the base's scheduler config
    step_cache: float | None = None
    prompt_cache_size: int = 64
    subject_cache_size: int = 64
    ref_cache_size: int = 8
    attention_backend: str | None = None  # a diffusers dispatch name (see ``execution``); None = PyTorch SDPA
    compile: bool = False  # torch.compile the transformer's repeated blocks (once; see ``execution``)
    compile_backend: str = "inductor"  # tests use "aot_eager" (same graphs and guards, no code generation)
    guidance_devices: tuple[str, ...] = ()  # more devices, one transformer copy each, for guidance passes 2-3


class LynxPipeline:
    """Runs generations on a loaded ``LynxModel``. Not thread-safe (one per replica)."""

    def __init__(self, model: LynxModel, options: Options | None = None) -> None:
        self.model = model
        self.options = options or Options()
        check_sampler(self.options.sampler, self.options.schedule, self.options.flow_shift)
        n = self.options.subject_cache_size
        self.prompt_cache = LRU(self.options.prompt_cache_size)
        self.id_cache = LRU(n)
        self.posterior_cache = LRU(n + 1)
        self.ref_cache = LRU(self.options.ref_cache_size)
        self._batch_fits = True  # set to False after a CUDA out-of-memory in a batched forward
        self.dit_forwards = 0  # every transformer call, batched or not, counts once
        self.dit_samples = 0  # every sample through the transformer (a 3-way batched call counts 3)
        self._cache_enabled = False
        self._count_lock = threading.Lock()  # guidance passes on several devices count from their threads
        execution.strict_fp32(model.dtype, model.device)
        self.pass_models = self._pass_models()
        for pass_model in self.pass_models:
            if self.options.attention_backend is not None:
                execution.set_attention_backend(pass_model.transformer, self.options.attention_backend)
            if self.options.compile:
                execution.compile_blocks(pass_model.transformer, self.options.compile_backend)
        self._copies = DeviceCopies()
        self._pool = None  # threads for guidance passes on several devices, made on first use
        self._split_warm = not self.options.compile  # the first compiled step runs its devices one after another
        if self.options.step_cache is not None:
            from diffusers import FirstBlockCacheConfig

            self.model.transformer.enable_cache(FirstBlockCacheConfig(threshold=float(self.options.step_cache)))
            self._cache_enabled = True

    def _pass_models(self) -> list[PassModel]:
        primary = PassModel(self.model.transformer, self.model.state, self.model.device)
        devices = self.options.guidance_devices
        if devices and self.options.step_cache is not None:
            raise ValueError("step_cache keeps state per transformer: it does not combine with guidance across GPUs")
        return [primary] + [copy_to(primary, device) for device in devices]

    # ---------------------------------------------------------------- conditioning
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _text_embeds(self, text: str, clean: bool) -> torch.Tensor:
        """``(1, 512, D)`` UMT5 states of ``text``, trimmed to its tokens and zero-padded (as Wan does)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if clean:
            text = prompt_clean(text)
        tok = self.model.tokenizer(
            [text],
            padding="max_length",
            max_length=MAX_TEXT_TOKENS,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        enc = self.model.text_encoder
        enc_device = next(enc.parameters()).device
        mask = tok.attention_mask.to(enc_device)
        length = int(mask.gt(0).sum())
        states = enc(tok.input_ids.to(enc_device), mask).last_hidden_state.to(self.dtype)
        out = torch.zeros_like(states)
        out[:, :length] = states[:, :length]
        return out.to(self.device)

    def prompt_embeds(self, text: str) -> torch.Tensor:
        return self.prompt_cache.get_or_make(("prompt", text), lambda: self._text_embeds(text, clean=True))

    def id_tokens(self, embedding: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(ID tokens, unconditional ID tokens = resampler(zero embedding)), each ``(1, Q, C)``."""
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if emb.shape != (self.model.config.embedding_dim,):
            raise ValueError(
                f"face embedding has {emb.shape[0]} values; this checkpoint's resampler takes "
                f"{self.model.config.embedding_dim} (an ArcFace vector)"
            )

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.from_numpy(emb).to(self.device, self.dtype)[None, None, :]
            return self.model.resampler(x), self.model.resampler(x * 0)

        return self.id_cache.get_or_make(digest(emb), make)

    def _posterior(self, image: torch.Tensor, key: str):
        vae = self.model.vae
        return self.posterior_cache.get_or_make(key, lambda: vae.encode(image).latent_dist)

    def _face_tensor(self, face: np.ndarray) -> torch.Tensor:
        arr = np.asarray(face)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"aligned face must be RGB uint8 (H, W, 3), got dtype={arr.dtype} shape={arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr)) / 255.0 * 2 - 1
        return x.permute(2, 0, 1)[None, :, None].to(self.device, self.model.vae.dtype)

    def _ref_buffer(self, face: np.ndarray, face_key: str, seed: int, drop: bool) -> RefBuffer:
        """The per-block self-attention inputs of a DiT pass over the face latent at t=0 (``drop``: all-zero image)."""
        model = self.model
        image = self._face_tensor(face)
        if drop:
            image = image * 0
            face_key = f"zero:{image.shape}"
        dist = self._posterior(image, face_key)
        generator = torch.Generator().manual_seed(seed + 1) if seed >= 0 else None
        latent = dist.sample(generator=generator)
        vae_cfg = model.vae.config
        mean = torch.tensor(vae_cfg.latents_mean).view(1, vae_cfg.z_dim, 1, 1, 1).to(latent.device, latent.dtype)
        inv_std = 1.0 / torch.tensor(vae_cfg.latents_std).view(1, vae_cfg.z_dim, 1, 1, 1).to(
            latent.device, latent.dtype
        )
        latent = (latent - mean) * inv_std
        text = self.prompt_cache.get_or_make(("ref", REF_PROMPT), lambda: self._text_embeds(REF_PROMPT, clean=False))
        state = model.state
        state.clear()
        state.ref_mode = "record"
        self._reset_step_cache()  # a record pass must run every block: nothing cached from another pass may stand in
        try:
            timestep = torch.tensor([0], dtype=torch.long, device=self.device)
            self._forward(latent, timestep, text.to(latent.dtype), 1, "lynx-record", model.transformer)
            return state.recorded()
        finally:
            state.clear()

    def ref_buffers(self, face: np.ndarray, seed: int) -> tuple[RefBuffer, RefBuffer]:
        """(reference buffer, unconditional reference buffer) for a 256x256 aligned face and a seed."""
        key = digest(face)
        cond = self.ref_cache.get_or_make((key, seed), lambda: self._ref_buffer(face, key, seed, drop=False))
        uncond = self.ref_cache.get_or_make(("zero", face.shape, seed), lambda: self._ref_buffer(face, key, seed, True))
        return cond, uncond

    # ---------------------------------------------------------------- denoising
    def _forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        samples: int,
        context: str,
        transformer: Any,
    ) -> torch.Tensor:
        """One evaluation of ``transformer`` (the model's own, or a copy on another device); with ``step_cache``, in
        the cache ``context`` of this kind of pass, so a pass is only ever compared with the same pass at the previous
        step."""
        with self._count_lock:
            self.dit_forwards += 1
            self.dit_samples += samples
        if self._cache_enabled:
            with transformer.cache_context(context):
                return transformer(latents, timestep, text, return_dict=False)[0]
        return transformer(latents, timestep, text, return_dict=False)[0]

    def _reset_step_cache(self) -> None:
        """Forget every cached residual (a new video, or a record pass): ``step_cache`` never reuses across them."""
        if self._cache_enabled:
            self.model.transformer._reset_stateful_cache()

    def _run_passes(self, latents, t, passes, ip_scale, ref_scale, batched: bool) -> list[torch.Tensor]:
        """One transformer evaluation per guidance pass, or one stacked evaluation for all (same numbers); a batch
        that does not fit in GPU memory falls back to one pass at a time for the rest of the replica's life. With
        more than one device, the passes run on them at the same time (``_run_split``)."""
        if len(self.pass_models) > 1 and len(passes) > 1:
            return self._run_split(latents, t, passes, ip_scale, ref_scale, batched and self._batch_fits)
        if batched and self._batch_fits and len(passes) > 1:
            try:
                return self._evaluate(latents, t, [passes], ["lynx-batched"], ip_scale, ref_scale, self.pass_models[0])
            except torch.cuda.OutOfMemoryError:
                self._batch_fits = False
                torch.cuda.empty_cache()
        contexts = [f"lynx-pass-{k}" for k in range(len(passes))]
        return self._evaluate(latents, t, [[p] for p in passes], contexts, ip_scale, ref_scale, self.pass_models[0])

    def _run_split(self, latents, t, passes, ip_scale, ref_scale, batched: bool) -> list[torch.Tensor]:
        """Each device runs its share of the passes (``split_passes``) in its own thread; the predictions come back
        to the first device in pass order."""
        shares = split_passes(len(passes), len(self.pass_models))

        def run(pass_model: PassModel, indexes: list[int]) -> list[torch.Tensor]:
            return self._run_on(pass_model, latents, t, [passes[i] for i in indexes], ip_scale, ref_scale, batched)

        if self._split_warm:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(len(self.pass_models), thread_name_prefix="lynx-guidance")
            futures = [self._pool.submit(run, self.pass_models[k], share) for k, share in enumerate(shares)]
            results = [future.result() for future in futures]
        else:  # the first compiled step compiles each copy in turn (a later recompile, e.g. for a new video size,
            # is serialised by dynamo's own compile lock)
            results = [run(self.pass_models[k], share) for k, share in enumerate(shares)]
            self._split_warm = True
        outs: list[torch.Tensor | None] = [None] * len(passes)
        for share, result in zip(shares, results, strict=True):
            for index, out in zip(share, result, strict=True):
                outs[index] = out.to(self.device)
        return outs  # type: ignore[return-value]

    @torch.no_grad()  # grad mode is per thread: the pool's threads start with it on
    def _run_on(self, pass_model: PassModel, latents, t, passes, ip_scale, ref_scale, batched) -> list[torch.Tensor]:
        device = pass_model.device
        moved = [
            (
                self._copies.to(text, device),
                self._copies.to(ip, device),
                None if ref is None else tuple(self._copies.to(block, device) for block in ref),
            )
            for text, ip, ref in passes
        ]
        groups = [moved] if batched and len(moved) > 1 else [[p] for p in moved]
        contexts = [f"lynx-{device}-{k}" for k in range(len(groups))]
        context = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with context:
            latents, t = latents.to(device), t.to(device)
            return self._evaluate(latents, t, groups, contexts, ip_scale, ref_scale, pass_model)

    def _evaluate(self, latents, t, groups, contexts, ip_scale, ref_scale, pass_model) -> list[torch.Tensor]:
        state = pass_model.state
        outs: list[torch.Tensor] = []
        for group, context in zip(groups, contexts, strict=True):
            n = len(group)
            state.clear()
            state.ip_scale, state.ref_scale = ip_scale, ref_scale
            state.ip_tokens = torch.cat([p[1] for p in group]) if group[0][1] is not None else None
            if group[0][2] is not None:
                state.load_ref(tuple(torch.cat(blocks) for blocks in zip(*(p[2] for p in group), strict=True)))
            text = torch.cat([p[0] for p in group])
            x = latents.to(self.dtype).expand(n, -1, -1, -1, -1)
            try:
                noise = self._forward(x, t.expand(n), text, n, context, pass_model.transformer)
            finally:
                state.clear()
            outs.extend(noise.chunk(n))
        return outs

    def _scheduler(self, steps: int, seed: int):
        options = self.options
        config = self.model.scheduler.config
        return make_sampler(options.sampler, options.schedule, config, steps, self.device, options.flow_shift, seed)

    def check(self, params: SamplingParams) -> None:
        params.check()

    @torch.no_grad()
    def generate(
        self,
        face_embedding: np.ndarray,
        aligned_face: np.ndarray | None,
        prompt: str,
        negative_prompt: str,
        params: SamplingParams,
        seed: int,
        batch_guidance: bool | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """float32 frames ``(F, H, W, 3)`` in [0, 1]. ``aligned_face`` (256x256 RGB uint8) is required for full."""
        args = (face_embedding, aligned_face, prompt, negative_prompt, params, seed, batch_guidance, progress)
        return self.decode(self.generate_latents(*args))

    @torch.no_grad()
    def generate_latents(
        self,
        face_embedding: np.ndarray,
        aligned_face: np.ndarray | None,
        prompt: str,
        negative_prompt: str,
        params: SamplingParams,
        seed: int,
        batch_guidance: bool | None = None,
        progress: Callable[[int, int], None] | None = None,
        max_steps: int | None = None,
    ) -> torch.Tensor:
        """The denoised latents ``(1, C, (F-1)//4+1, H/8, W/8)`` of ``generate``, before decoding.

        ``max_steps`` stops after that many steps of the ``num_inference_steps`` schedule: benchmarks time a few
        steps at the real step sizes rather than a whole video.
        """
        model = self.model
        self.check(params)
        if not prompt:
            raise ValueError("prompt is empty; Lynx needs a text prompt")
        use_ref = model.config.ref_adapter
        if use_ref and aligned_face is None:
            raise ValueError("the full variant needs the aligned 256x256 face for its Ref-adapter (aligned_face=None)")
        batched = self.options.batch_guidance if batch_guidance is None else batch_guidance

        # conditioning
        pos = self.prompt_embeds(prompt)
        cfg = params.guidance_scale > 1.0
        neg = self.prompt_embeds(negative_prompt or "") if cfg else None
        ip, ip0 = self.id_tokens(face_embedding)
        ref, ref0 = self.ref_buffers(aligned_face, seed) if use_ref else (None, None)

        # latents (the official RNG: one CPU generator seeded with `seed`, fp32)
        generator = torch.Generator().manual_seed(seed) if seed >= 0 else None
        shape = (
            1,
            model.transformer.config.in_channels,
            (params.num_frames - 1) // 4 + 1,
            params.height // 8,
            params.width // 8,
        )
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

        passes = [(pos, ip, ref)]
        if cfg:
            passes.append((neg, ip0, ref0))
            if params.guidance_scale_i is not None:
                passes.append((neg, ip, ref))
        scheduler = self._scheduler(params.num_inference_steps, seed)
        self._reset_step_cache()  # each video starts with nothing cached from the one before
        self._copies.clear()  # conditioning moved to other devices for the video before
        g, gi = params.guidance_scale, params.guidance_scale_i
        timesteps = scheduler.timesteps if max_steps is None else scheduler.timesteps[:max_steps]
        for i, t in enumerate(timesteps):
            outs = self._run_passes(latents, t, passes, params.ip_scale, params.ref_scale, batched)
            if len(outs) == 3:
                cond, uncond, id_only = outs
                noise = uncond + gi * (id_only - uncond) + g * (cond - id_only)
            elif len(outs) == 2:
                cond, uncond = outs
                noise = uncond + g * (cond - uncond)
            else:
                noise = outs[0]
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            if progress is not None:
                progress(i + 1, len(timesteps))
        return latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """float32 frames ``(F, H, W, 3)`` in [0, 1] on the host."""
        return self.decode_frames(latents).cpu().numpy()

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """float32 frames ``(F, H, W, 3)`` in [0, 1], left on the VAE's device (benchmarks compare them there)."""
        vae = self.model.vae
        cfg = vae.config
        latents = latents.to(vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]  # (1, 3, F, H, W) in [-1, 1]
        frames = (video[0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)
        return frames.float()

    def reset_counters(self) -> None:
        self.dit_forwards = 0
        self.dit_samples = 0

    def clear_caches(self) -> None:
        for cache in (self.prompt_cache, self.id_cache, self.posterior_cache, self.ref_cache):
            cache.clear()
