#!/usr/bin/env bash
# Lynx at real size on a lent GPU machine (nvidia-h100-x1 / nvidia-h200): the one prepared run of
# benchmarks/bench_lynx_gpu.py (14B full, 81x480x832: default, 4-step LoRA video, fp8(+compile), best, compile,
# LoRA unfused, ... within a time budget), results in $OUT: lynx_gpu_<gpu>.json, lynx_gpu_<gpu>.md and log.
#
#   bash benchmarks/gpu_session.sh [more bench_lynx_gpu.py arguments: they override the defaults below]
#
# Through the device tool: command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 540 (the benchmark
# stops starting options after --budget-s 360 s; install, imports and the model build come on top, ~1 min).
#
# Wheels to carry in .whl/ (git-ignored). The machine has Python 3.12, torch 2.11 (CUDA 13), triton, transformers,
# safetensors, accelerate, huggingface-hub, numpy, regex, requests, filelock, pillow, fsspec, pyarrow, pyyaml,
# sentencepiece, but NO diffusers, ftfy, torchao, sageattention or ray, and it reaches no package registry:
#   diffusers==0.42.1   the models and the scheduler. Its requirements (filelock, huggingface-hub>=1.32,<3, numpy,
#                       regex, requests, safetensors>=0.8, Pillow) are all there; importlib_metadata is not, and not
#                       needed: on Python 3.12 diffusers uses the standard library's importlib.metadata.
#   ftfy==6.3.1         Wan's prompt cleaning (diffusers' prompt_clean calls ftfy.fix_text)
#   wcwidth==0.9.4      ftfy's one requirement
#   torchao==0.18.0     fp8 (farm.models.lynx.quantize); its C++ extensions load with torch >= 2.11
# Fetch them here, in the repository root (about 11 MB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4 torchao==0.18.0
# Not carried: sageattention. The newest wheel on the registry, 1.0.6, is pure Python (Triton kernels; triton
# comes with the machine's CUDA torch), but diffusers 0.42.1's "sage" backend requires sageattention>=2.1.1, which
# has no wheel there (2.x builds CUDA extensions from its source), so 1.0.6 would not enable it: "best" and
# "attn:sage" are listed as not run, with that reason. Not needed: ray (the benchmark runs no farm job).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the results folder (the device tool sets it)}"
mkdir -p "$OUT"

install_carried_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    echo "no .whl/*.whl: using the machine's own packages (diffusers and torchao are needed)"
  fi
}

show_machine() {
  nvidia-smi || true
  python3 - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ("diffusers", "transformers", "torchao", "sageattention", "triton", "ftfy", "safetensors"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
EOF
}

session() {
  install_carried_wheels
  export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
  show_machine
  python3 benchmarks/bench_lynx_gpu.py --out "$OUT" --variants full --no-fidelity \
    --budget-s 360 --compile-allowance-s 60 "$@"
}

set -o pipefail
session "$@" 2>&1 | tee "$OUT/log"
