from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from farm.config import SpecError, load_job, parse_job
from farm.params import SamplingParams, check_seed, coerce

BASE = {"manifest": "m.parquet", "output": "out", "model": {"backend": "still"}}


def test_overrides_coerce_and_check() -> None:
    p = SamplingParams().with_overrides({"num_frames": 9.0, "height": 64, "width": 96, "guidance_scale": "3.5"})
    assert (p.num_frames, p.height, p.width, p.guidance_scale) == (9, 64, 96, 3.5)
    assert SamplingParams().with_overrides({"ip_scale": math.nan}).ip_scale == 1.0  # NaN = not given


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"num_frames": 10}, "num_frames=10 must be 4k+1"),
        ({"height": 100}, "height=100 must be a multiple of 16"),
        ({"width": 8}, "width=8 is out of range"),
        ({"guidance_scale": -1}, "guidance_scale=-1.0 is out of range"),
        ({"num_inference_steps": 2.5}, "num_inference_steps=2.5 is not a valid integer"),
        ({"ip_scale": "abc"}, "ip_scale='abc' is not a valid number"),
        ({"ref_scale": math.inf}, "not a finite number"),
        ({"num_frames": True}, "must be a number, not a boolean"),
    ],
)
def test_bad_overrides_name_field_and_value(overrides: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        SamplingParams().with_overrides(overrides)


def test_seed_checks() -> None:
    assert check_seed(7.0) == 7
    for bad in (-1, 1.5, "x", True, 2**64):
        with pytest.raises(ValueError, match="seed"):
            check_seed(bad)
    assert coerce("guidance_scale_i", None) is None


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"model": {"backend": "lynx", "dtype": "fp8"}}, "model.dtype"),
        ({"defaults": {"height": 100}}, "height=100 must be a multiple of 16"),
        ({"resources": {"replicas": 0}}, "replicas=0"),
        ({"resources": {"gpus_per_replica": -1}}, "resources.gpus_per_replica"),
        ({"identity": {"recognizer": "insightface"}}, "identity.pack is required"),
        ({"runtime": {"max_attempts": 0}}, "runtime.max_attempts"),
        ({"unknown_section": 1}, "unknown_section"),
    ],
)
def test_spec_errors_name_field(patch: dict, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        parse_job({**BASE, **patch})


def test_missing_required_fields() -> None:
    with pytest.raises(SpecError, match="manifest") as err:
        parse_job({"output": "o", "model": {"backend": "still"}})
    assert "Field required" in str(err.value)


def test_load_job_with_cli_overrides(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("manifest: a.parquet\noutput: out\nmodel: {backend: still}\nresources: {replicas: 2}\n")
    job = load_job(spec, {"manifest": "b.parquet", "output": None, "resources.replicas": 3})
    assert (job.manifest, job.output, job.resources.replicas) == (
        os.path.abspath("b.parquet"),
        os.path.abspath("out"),
        3,
    )
    spec.write_text("- not a mapping\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_job(spec)
    spec.write_text("manifest: [unclosed\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_job(spec)


def test_shipped_job_specs_are_valid() -> None:
    jobs = sorted(Path(__file__).resolve().parents[1].joinpath("jobs").glob("*.yaml"))
    assert jobs, "jobs/ has example specs"
    for path in jobs:
        load_job(path)


def test_relative_local_paths_are_made_absolute_against_the_command_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas run in other working directories (other nodes): the spec must carry absolute paths."""
    spec = tmp_path / "spec" / "job.yaml"
    spec.parent.mkdir()
    spec.write_text(
        "manifest: m.parquet\noutput: ./out\nmodel: {backend: lynx, weights: {base: w/base, adapter: s3://b/a, "
        "face_pack: pkg://insightface/x}}\nidentity: {recognizer: insightface, pack: ../packs/p}\n"
    )
    monkeypatch.chdir(tmp_path)
    job = load_job(spec)
    assert job.manifest == str(tmp_path / "m.parquet") and job.output == str(tmp_path / "out")
    assert job.model.weights == {
        "base": str(tmp_path / "w" / "base"),
        "adapter": "s3://b/a",
        "face_pack": "pkg://insightface/x",
    }
    assert job.identity.pack == str(tmp_path.parent / "packs" / "p")


def test_relative_output_inside_a_ray_job_working_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    spec = tmp_path / "job.yaml"
    spec.write_text("manifest: m.parquet\noutput: farm-out/x\nmodel: {backend: still}\n")
    monkeypatch.chdir(tmp_path)
    config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    with pytest.raises(SpecError, match="farm-out/x.*temporary copy.*s3://"):
        load_job(spec)
    assert load_job(spec, {"output": "/shared/out"}).output == "/shared/out"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    assert load_job(spec).output == str(tmp_path / "farm-out" / "x")  # a Ray Job without --working-dir


@pytest.mark.parametrize(
    ("backend", "options", "fragment"),
    [
        ("still", {"zom": 0.5}, "model.options.zom: the still backend has no such option (did you mean 'zoom'?)"),
        ("simulated", {"gpu_time": 1}, "(did you mean 'gpu_time_s'?)"),
        ("lynx", {"face_detectr": "dlib"}, "model.options.face_detectr: the lynx backend has no such option"),
        ("lynx", {"step_cach": 0.1}, "(did you mean 'step_cache'?)"),
    ],
)
def test_unknown_backend_options_are_spec_errors_with_a_did_you_mean(
    backend: str, options: dict, fragment: str
) -> None:
    """Found by a README walkthrough: a misspelled lynx option was an internal error (exit 70), and the still
    backend ignored unknown options silently."""
    from farm.models import build_backend

    model = {"backend": backend, "options": options}
    if backend == "lynx":
        model["weights"] = {"base": "/w/base", "adapter": "/w/adapter"}
    job = parse_job({"manifest": "/m.parquet", "output": "/out", "model": model})
    with pytest.raises(SpecError, match=re.escape(fragment)):
        build_backend(job.model_spec())


def test_farm_validate_exits_2_on_an_unknown_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from farm.cli import main
    from tests.helpers import rows, write_manifest

    spec = tmp_path / "job.yaml"
    model = {"backend": "still", "options": {"zom": 0.5}}
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    spec.write_text(yaml.safe_dump({"manifest": manifest, "output": str(tmp_path / "out"), "model": model}))
    assert main(["validate", str(spec)]) == 2
    assert "did you mean 'zoom'" in capsys.readouterr().err
