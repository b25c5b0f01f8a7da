"""The plug-in contract every registered metric keeps, and the registry's errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from farm.config import SpecError
from farm.metrics import REGISTRY, Metric, build_metric, build_metrics, metric_fields, score_all
from tests.metrics.helpers import jitter


def test_every_registered_metric_is_in_the_specs(all_specs: list[dict]) -> None:
    assert sorted(s["name"] for s in all_specs) == sorted(REGISTRY)


def test_declarations(all_metrics: list[Metric]) -> None:
    for metric in all_metrics:
        assert metric.device in ("cpu", "gpu")
        assert metric.model_column in metric.columns and metric.columns[metric.model_column] == pa.string()
        assert all(isinstance(t, pa.DataType) for t in metric.columns.values())
        assert isinstance(metric.fingerprint(), str) and metric.fingerprint()
    fields = metric_fields(all_metrics)
    assert len({f.name for f in fields}) == len(fields)
    pa.schema(fields).empty_table()  # a valid schema


CASES = ("full", "no portrait", "no prompt", "one frame", "no frames", "no face")


@pytest.fixture(scope="module")
def scored(all_metrics: list[Metric], astronaut: np.ndarray) -> dict[str, list[dict]]:
    """Each metric's values for each case, scored once for the module."""
    video = jitter(astronaut, 6, seed=4)
    noise = np.random.default_rng(0).integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)
    inputs = {
        "full": (video, astronaut, "an astronaut smiles"),
        "no portrait": (video, None, "an astronaut smiles"),
        "no prompt": (video, astronaut, ""),
        "one frame": (video[:1], astronaut, "an astronaut smiles"),
        "no frames": (video[:0], astronaut, "an astronaut smiles"),
        "no face": (noise, astronaut, "noise"),
    }
    return {case: [metric.score(*inputs[case]) for metric in all_metrics] for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_exact_columns_and_arrow_types(all_metrics: list[Metric], scored: dict, case: str) -> None:
    for metric, values in zip(all_metrics, scored[case], strict=True):
        assert set(values) == set(metric.columns), metric.name
        assert values[metric.model_column] == metric.fingerprint()
        for column, dtype in metric.columns.items():  # every value fits its declared type
            pa.array([values[column]], type=dtype)


def test_score_all_merges_every_metric(all_metrics: list[Metric], astronaut: np.ndarray) -> None:
    row = score_all(all_metrics, jitter(astronaut, 2, seed=5), astronaut, "an astronaut")
    assert set(row) == {f.name for f in metric_fields(all_metrics)}


# (case, column): null when the case lacks what the column needs
NULLS = [
    ("no portrait", "identity_mean"),
    ("no portrait", "identity_facexlib_mean"),
    ("no prompt", "clip_score"),
    ("one frame", "motion_mean"),
    ("one frame", "motion_static"),
    ("one frame", "identity_temporal_min"),
    ("no frames", "clip_score"),
    ("no frames", "identity_mean"),
    ("no frames", "identity_facexlib_mean"),
    ("no face", "identity_mean"),
    ("no face", "identity_temporal_mean"),
    ("no face", "identity_facexlib_min"),
]


def test_missing_inputs_are_null_never_zero(scored: dict) -> None:
    rows = {case: {k: v for values in scored[case] for k, v in values.items()} for case in CASES}
    for case, column in NULLS:
        assert rows[case][column] is None, (case, column)
    measured = [c for c in rows["full"] if "distance" not in c]  # dlib reports distances, insightface does not
    assert [c for c in measured if rows["full"][c] is None] == []


def test_score_all_rejects_bad_frames_and_broken_contracts(all_metrics: list[Metric]) -> None:
    with pytest.raises(ValueError, match=r"uint8 frames \(F, H, W, 3\), got dtype=float32"):
        score_all(all_metrics, np.zeros((2, 8, 8, 3), np.float32), None, "x")

    class Broken(Metric):
        name = "broken"
        columns = {"broken_value": pa.float64(), "broken_model": pa.string()}

        def fingerprint(self) -> str:
            return "broken"

        def setup(self, device: str = "cpu") -> None:
            pass

        def score(self, frames, portrait, prompt):
            return {"broken_value": 1.0, "stray": 2}

    with pytest.raises(RuntimeError, match=r"'broken' broke its contract: missing \['broken_model'\], undeclared"):
        score_all([Broken()], np.zeros((2, 8, 8, 3), np.uint8), None, "x")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "motoin"}, r"unknown metric 'motoin' \(did you mean 'motion'\?\); choose one of"),
        ({"name": "identity_facexlb", "weights": "x"}, r"did you mean 'identity_facexlib'"),
        ({"name": "motion", "frame_pair": 4}, r"'motion' has no option 'frame_pair' \(did you mean 'frame_pairs'"),
        ({"name": "motion", "storage_options": {}}, r"no option 'storage_options'"),
        ({"name": "clip"}, r"metric 'clip': needs weights: a transformers CLIP folder"),
        ({"name": "identity_facexlib"}, r"needs weights: the IR-SE50 ArcFace file"),
        ({"name": "identity_facexlib", "weights": "a.pth", "detector": "retina"}, r"detector='retina' is unknown"),
        ({"name": "motion", "frame_pairs": 0}, r"frame_pairs=0 must be at least 1"),
        ({"frame_pairs": 4}, r"a metrics entry needs a name"),
    ],
)
def test_spec_errors_name_the_value_and_the_fix(spec: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build_metric(spec)


def test_a_metric_listed_twice_is_refused() -> None:
    with pytest.raises(SpecError, match="both write column 'motion_mean'; list each metric once"):
        build_metrics([{"name": "motion"}, {"name": "motion", "width": 128}])


def test_building_loads_no_weights_and_importing_loads_no_frameworks(tmp_path) -> None:
    """Specs are checked on the driver: a path that exists only on the workers is fine until ``setup``."""
    metric = build_metric({"name": "clip", "weights": str(tmp_path / "only-on-workers")})
    assert metric.model is None
    code = "import sys, farm.metrics; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert not {"torch", "transformers", "cv2", "ray"} & set(out.split())


def test_portrait_users_are_declared(all_metrics: list[Metric]) -> None:
    """The worker keeps decoded portraits only when a metric reads them."""
    assert {m.name for m in all_metrics if m.uses_portrait} == {"identity", "identity_facexlib"}
