"""The GPU benchmark's own smoke run (``--tiny`` on the CPU): the code a lent GPU runs once, tested before it does."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lynx_gpu.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_lynx_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~50 s on 2 cores: every option on the tiny checkpoint
def test_tiny_run_writes_the_table(tmp_path: Path) -> None:
    args = ["--tiny", "--variants", "full", "--options", "default,unbatched,compile", "--compile-backend", "aot_eager"]
    results = bench().main([*args, "--no-fidelity", "--out", str(tmp_path)])
    rows = {r["option"]: r for r in results["variants"][0]["rows"]}
    assert [r["status"] for r in rows.values()] == ["ok", "ok", "ok"]
    assert list(rows) == ["default", "unbatched", "compile"]  # compile last: it changes the model in place
    assert len(rows["default"]["step_s"]) == 2 and rows["default"]["warmup_s"] > 0
    assert rows["compile"]["graphs_compiled"] == 2 and rows["compile"]["graphs_compiled_in_timed_steps"] == 0
    assert rows["unbatched"]["latents_delta"]["max"] < 1e-5 and rows["compile"]["frames_delta"]["max"] < 1e-6
    assert "latents_delta" not in rows["default"]  # the reference itself
    saved = json.loads((tmp_path / "lynx_gpu_cpu-tiny.json").read_text())
    assert saved["variants"][0]["flops"]["tokens"] == 72
    table = (tmp_path / "lynx_gpu_cpu-tiny.md").read_text()
    assert "| compile |" in table and "790 TFLOP/s" in table and "--tiny" in table


def test_options_outside_the_time_budget_are_listed_as_skipped(tmp_path: Path) -> None:
    args = ["--tiny", "--variants", "lite", "--options", "default,attn:_native_flash,compile", "--budget-s", "0"]
    results = bench().main([*args, "--no-fidelity", "--out", str(tmp_path), "--compile-allowance-s", "1000"])
    rows = results["variants"][0]["rows"]
    assert [r["status"] for r in rows] == ["ok", "skipped", "skipped"]  # the default always runs
    assert "time budget" in rows[1]["reason"]
    assert "skipped: time budget" in (tmp_path / "lynx_gpu_cpu-tiny.md").read_text()


def test_bad_arguments_name_the_value(tmp_path: Path) -> None:
    module = bench()
    with pytest.raises(SystemExit):
        module.parse_args(["--tiny", "--options", "warp-drive", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        module.parse_args(["--tiny", "--variants", "medium", "--out", str(tmp_path)])


def test_a_compile_listed_first_keeps_its_time() -> None:
    """Full's plan lists compile second: a cheaper option may not start if it would eat into compile's estimate."""
    module = bench()
    args = module.parse_args(["--out", "unused", "--device", "cpu", "--dtype", "bf16"])
    default = {"s_per_step": 10.0, "decode_s": 2.0, "conditioning_s": 1.0}
    names = ["default", "compile", "attn:_native_flash", "unbatched"]
    compile_s = module.estimate_s(default, module.OPTIONS["compile"], args)  # 3 steps x 11 s + 8 s + 120 s
    assert compile_s == pytest.approx(161.0)
    assert module.fits("default", names, default, 0.0, args) == (True, "")
    ok, why = module.fits("attn:_native_flash", names, default, compile_s + 50, args)
    assert not ok and "kept for compile" in why  # needs 3 x 15 s + 8 s = 53 s
    assert module.fits("attn:_native_flash", names, default, compile_s + 53.5, args)[0]
    assert module.fits("compile", names, default, compile_s + 0.5, args)[0]
    lite = ["default", "attn:_native_flash", "compile"]  # compile last: nothing is kept for it
    assert module.fits("attn:_native_flash", lite, default, 53.5, args)[0]
