"""The GPU benchmark's own smoke run (``--tiny`` on the CPU): the code a lent GPU runs once, tested before it does."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lynx_gpu.py"
NEW_OPTIONS = "default,lora-unfused,fp8,fp8+compile,best,guidance-gpus,4-step lora"
TARGETS = ["default bf16", "best opt-in, no distillation", "4-step LoRA video"]


def bench():
    spec = importlib.util.spec_from_file_location("bench_lynx_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def report_module():
    bench()  # puts the benchmark folder on the path and imports its report module
    return sys.modules["lynx_gpu_report"]


@pytest.fixture(scope="module")
def new_options_run(tmp_path_factory) -> tuple[dict, Path]:
    """One tiny run of every new option on the CPU: what runs here runs, the rest says why not. Lite: no reference
    passes over the face, the slowest part on a CPU (the slow test runs the 4-step path on full too)."""
    out = tmp_path_factory.mktemp("bench")
    args = ["--tiny", "--variants", "lite", "--options", NEW_OPTIONS, "--no-fidelity", "--out", str(out)]
    return bench().main(args), out


def rows_of(results: dict) -> dict[str, dict]:
    return {r["option"]: r for r in results["variants"][0]["rows"]}


@pytest.mark.slow  # ~60 s on 2 cores: every option on the tiny checkpoint, compiled ones too
def test_tiny_run_writes_the_table(tmp_path: Path) -> None:
    options = "default,unbatched,compile,4-step lora,4-step lora+compile"
    args = ["--tiny", "--variants", "full", "--options", options, "--compile-backend", "aot_eager"]
    results = bench().main([*args, "--no-fidelity", "--out", str(tmp_path)])
    rows = rows_of(results)
    assert [r["status"] for r in rows.values()] == ["ok"] * 5
    # compile last in its session (it changes the model in place); the LoRA's session on a model of its own
    assert list(rows) == ["default", "unbatched", "compile", "4-step lora", "4-step lora+compile"]
    assert len(rows["default"]["step_s"]) == 2 and rows["default"]["warmup_s"] > 0
    assert rows["compile"]["graphs_compiled"] == 2 and rows["compile"]["graphs_compiled_in_timed_steps"] == 0
    assert rows["unbatched"]["latents_delta"]["max"] < 1e-5 and rows["compile"]["frames_delta"]["max"] < 1e-6
    assert "latents_delta" not in rows["default"]  # the reference itself
    compiled_video = rows["4-step lora+compile"]
    assert compiled_video["graphs_compiled_in_timed_video"] == 0  # the warm-up step compiled everything
    assert compiled_video["frames_delta"]["max"] < 1e-5  # against the eager 4-step video
    saved = json.loads((tmp_path / "lynx_gpu_cpu-tiny.json").read_text())
    assert saved["variants"][0]["flops"]["tokens"] == 72
    table = (tmp_path / "lynx_gpu_cpu-tiny.md").read_text()
    assert "| compile |" in table and "790 TFLOP/s" in table and "--tiny" in table
    assert "| 4-step lora+compile |" in table


def test_new_options_run_or_say_why_not(new_options_run) -> None:
    results, _ = new_options_run
    rows = rows_of(results)
    assert {n: rows[n]["status"] for n in ("default", "lora-unfused", "4-step lora")} == dict.fromkeys(
        ("default", "lora-unfused", "4-step lora"), "ok"
    )
    for name in ("fp8", "fp8+compile", "best"):
        assert rows[name]["status"] == "not run" and "fp8" in rows[name]["reason"] and "cpu" in rows[name]["reason"]
    assert "sage" in rows["best"]["reason"]
    assert rows["guidance-gpus"]["status"] == "not run" and "needs 2+ GPUs" in rows["guidance-gpus"]["reason"]
    unfused = rows["lora-unfused"]
    assert unfused["passes_per_step"] == 2 and unfused["finite"] and unfused["s_per_step"] > 0  # lite: 2 passes
    setups = {s["setup"]: s for s in results["variants"][0]["setups"]}
    assert list(setups) == ["plain", "lora unfused", "lora fused"]  # no fp8 model is built where fp8 cannot run
    assert setups["lora unfused"]["lora_layers"] == setups["lora fused"]["lora_layers"] == 3 * 10  # blocks x layers


def test_the_4_step_lora_path_times_one_whole_video(new_options_run) -> None:
    results, _ = new_options_run
    video = rows_of(results)["4-step lora"]
    assert video["kind"] == "video" and video["steps"] == 4 and video["guidance_scale"] == 1.0
    assert (video["sampler"], video["flow_shift"]) == ("distill", 5.0)  # what the step-distilled LoRAs run
    assert video["passes_per_step"] == 1  # guidance_scale 1.0: one transformer pass per step
    assert video["s_per_video"] > 0 and video["s_per_video"] >= sum(video["step_s"]) + video["decode_s"]
    assert video["finite"] and video["is_reference"]
    lora = results["lora_file"]  # written at the model's sizes, read back through read_lora
    assert (lora["rank"], lora["layers"], lora["layout"]) == (64, 30, "wan") and lora["mb"] > 0


def test_the_report_has_the_targets_and_the_new_sections(new_options_run) -> None:
    _, out = new_options_run
    saved = json.loads((out / "lynx_gpu_cpu-tiny.json").read_text())
    assert [t["target"] for t in saved["targets"]] == TARGETS
    assert all(t["verdict"].startswith("not measured (tiny sizes") for t in saved["targets"])
    table = (out / "lynx_gpu_cpu-tiny.md").read_text()
    assert "## Targets" in table and "≤ 8.9 s/step" in table and "≤ 5 s/step" in table and "≤ 45 s" in table
    assert "### 4-step LoRA path" in table and "| 4-step lora |" in table and "change no shape or kernel" in table
    assert "| fp8 | not run: quantize: fp8" in table and "| guidance-gpus | not run: needs 2+ GPUs" in table


def test_fp8_runs_through_its_own_build_where_torchao_can(monkeypatch, tmp_path: Path) -> None:
    """The fp8 session (a fresh build, quantized, compared with the default) on the CPU in bf16, with torchao's
    hardware check bypassed as in test_lynx_quantize."""
    pytest.importorskip("torchao")
    from torchao.quantization import quant_api

    from farm.models.lynx import quantize

    if not hasattr(quant_api, "_check_hardware_support"):
        pytest.skip("this torchao checks the hardware elsewhere; the CPU run needs that check bypassed")
    module = bench()
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(quantize, "fp8_support", lambda device: None)
    monkeypatch.setattr(module, "fp8_support", lambda device: None)
    args = ["--tiny", "--variants", "lite", "--dtype", "bf16", "--options", "default,fp8", "--steps", "1"]
    results = module.main([*args, "--no-fidelity", "--out", str(tmp_path)])
    rows = rows_of(results)
    assert rows["fp8"]["status"] == "ok" and rows["fp8"]["finite"]
    assert 0 < rows["fp8"]["latents_delta"]["mean"] < 0.1  # fp8 changes the numbers, a little
    fp8_setup = results["variants"][0]["setups"][1]
    assert fp8_setup["setup"] == "fp8" and fp8_setup["fp8_layers"] == 3 * 10  # the blocks' linears, not adapters'


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
    assert module.fits("attn:_native_flash", names, default, compile_s + 53.5, args)
    assert module.fits("compile", names, default, compile_s + 0.5, args)[0]
    lite = ["default", "attn:_native_flash", "compile"]  # compile last: nothing is kept for it
    assert module.fits("attn:_native_flash", lite, default, 53.5, args)[0]


def test_an_option_keeps_the_time_of_the_higher_priority_sessions_after_it() -> None:
    module = bench()
    args = module.parse_args(["--out", "unused", "--device", "cpu", "--dtype", "bf16"])
    default = {"s_per_step": 9.0, "decode_s": 2.0, "conditioning_s": 1.0, "passes_per_step": 3.0}
    names = ["default", "4-step lora", "unbatched"]  # unbatched runs on the default's model, before the LoRA's
    video_s = module.estimate_s(default, module.OPTIONS["4-step lora"], args, new_build=True)
    assert video_s == pytest.approx(65.5)  # 5 one-pass steps of 3.3 s + 8 s + 1 s conditioning + 40 s setup
    ok, why = module.fits("unbatched", names, default, video_s + 37.0, args)  # needs 3 x 9.9 s + 8 s = 37.7 s
    assert not ok and "kept for 4-step lora" in why
    assert module.fits("unbatched", names, default, video_s + 38.0, args)[0]


def test_sessions_give_each_model_setup_one_build_and_compile_last() -> None:
    module = bench()
    assert module.sessions(module.PLAN["full"]) == [
        ["default", "guidance-gpus", "attn:_native_flash", "unbatched", "default (repeat)", "compile"],
        ["4-step lora", "4-step lora+compile"],
        ["fp8", "best"],
        ["fp8+compile"],  # a second compile on fp8: a fresh build of its own
        ["lora-unfused"],
    ]
    without_sage = [n for n in module.PLAN["full"] if n != "best"]  # where best cannot run: one fp8 build
    assert ["fp8", "fp8+compile"] in module.sessions(without_sage)


def real_results(rows: list[dict], device: str = "NVIDIA H200", variant: str = "full") -> dict:
    env = {"device_name": device, "dtype": "bfloat16"}
    variants = [{"variant": variant, "video": [81, 480, 832], "rows": rows}]
    return {"sizes": "14B", "environment": env, "variants": variants}


def test_targets_pass_fail_or_say_why_not_measured() -> None:
    report = report_module()
    rows = [
        {"option": "default", "status": "ok", "kind": "steps", "s_per_step": 8.6, "mfu": 0.74},
        {"option": "fp8+compile", "status": "ok", "kind": "steps", "s_per_step": 6.1},
        {"option": "best", "status": "not run", "kind": "steps", "reason": "sageattention is not installed"},
        {"option": "4-step lora", "status": "ok", "kind": "video", "s_per_video": 20.0},
        {"option": "4-step lora+compile", "status": "ok", "kind": "video", "s_per_video": 46.0},
    ]
    default, best, video = report.evaluate_targets(real_results(rows))
    assert (default["verdict"], default["measured"], default["mfu"]) == ("PASS", 8.6, 0.74) and "note" not in default
    assert best["verdict"] == "not measured (best not run: sageattention is not installed)"
    assert best["closest"] == {"option": "fp8+compile", "measured": 6.1}
    assert (video["verdict"], video["option"], video["measured"]) == ("PASS", "4-step lora", 20.0)  # the fastest
    rows[0]["s_per_step"] = 10.1
    results = real_results(rows, device="NVIDIA H100 80GB HBM3")
    default = report.evaluate_targets(results)[0]
    assert default["verdict"] == "FAIL" and "H100" in default["note"]
    results["targets"] = report.evaluate_targets(results)
    lines = "\n".join(report.target_lines(results))
    assert "| 10.10 s/step (default, MFU 0.74) | FAIL; measured on NVIDIA H100" in lines
    assert "closest measured: fp8+compile 6.10 s/step" in lines
    lite_only = report.evaluate_targets(real_results(rows, variant="lite"))
    assert all(t["verdict"] == "not measured (no full variant in this run)" for t in lite_only)
