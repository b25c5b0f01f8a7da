"""Config-safe resume: a rerun after the spec or the manifest changed never silently keeps results made another way.

The spec and the manifest are edited between runs into one output (README "Resume"): a changed ok row refuses the
run before any replica starts, with a summary of what changed; ``--regenerate-changed`` redoes such rows and
``--rescore-changed`` scores committed videos again; failed rows whose inputs changed are redone anyway.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from farm import open_results
from farm.manifest import record_key
from farm.records import Record
from farm.results import records_to_table, result_schema
from farm.resume import ChangedRows
from farm.runtime.driver import run_job
from farm.storage import OutputLayout, resolve_pkg_uri
from farm.table import SchemaDrift
from farm.validate import validate_job
from tests.helpers import ASTRONAUT, still_job, write_manifest

pytestmark = pytest.mark.usefixtures("ray_cluster")

FAST = {"replicas": 1, "cpus_per_replica": 0.25}
IDENTITY = {"enabled": True, "recognizer": "dlib", "frames": 2}


def _job(manifest: str, out: str, frames: int = 5, identity: dict[str, Any] | None = None):
    return still_job(
        manifest,
        out,
        resources=FAST,
        defaults={"num_frames": frames, "height": 128, "width": 128, "fps": 8},
        identity=identity or IDENTITY,
    )


def _records(out: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in open_results(out).to_pylist()}


def _log_rows(out: str) -> int:
    return sum(pq.read_metadata(p).num_rows for p in OutputLayout(out).log_parts())


def _manifest(path: Path, portrait: str, prompt_b: str = "b", with_c: bool = True, extra: list | None = None) -> str:
    data = [
        {"id": "a", "portrait": portrait, "prompt": "a"},
        {"id": "b", "portrait": ASTRONAUT, "prompt": prompt_b},
        {"id": "bad id!", "portrait": ASTRONAUT, "prompt": "x"},
    ]
    if with_c:
        data.append({"id": "c", "portrait": ASTRONAUT, "prompt": "c"})
    return write_manifest(path, (extra or []) + data)


def test_spec_and_manifest_edits_between_runs(tmp_path: Path) -> None:
    portrait = tmp_path / "face.png"
    shutil.copy(resolve_pkg_uri(ASTRONAUT), portrait)
    out = str(tmp_path / "out")
    manifest = _manifest(tmp_path / "m1.parquet", str(portrait))
    first = run_job(_job(manifest, out), progress=False)
    assert first.counts["ok"] == 3 and first.counts["failed"] == 1
    recs = _records(out)
    bad_key = record_key({"id": "bad id!", "portrait": ASTRONAUT, "prompt": "x"})
    assert set(recs) == {"a", "b", "c", bad_key}
    for rid in ("a", "b", "c"):
        assert recs[rid]["request_fingerprint"] and recs[rid]["video_fingerprint"] and recs[rid]["portrait_sha256"]
        assert recs[rid]["metrics_fingerprint"] and recs[rid]["num_frames"] == 5 and recs[rid]["frames_scored"] == 2
    assert not (tmp_path / "out" / "metrics").exists()  # per-row metrics JSON is opt-in

    # the same spec and manifest: nothing to do
    again = run_job(_job(manifest, out), progress=False)
    assert again.already_committed == 4 and sum(again.counts.values()) == 0

    # num_frames 5 -> 9: refused before anything runs, saying what changed and for how many rows
    logged = _log_rows(out)
    assert not validate_job(_job(manifest, out), run_preflight=False).refusals
    checked = validate_job(_job(manifest, out, frames=9), run_preflight=False)  # farm validate says it first
    assert not checked.ok and "num_frames: 3 committed rows were made with 5" in checked.render()
    with pytest.raises(ChangedRows) as refused:
        run_job(_job(manifest, out, frames=9), progress=False)
    message = str(refused.value)
    assert "num_frames: 3 committed rows were made with 5; this run gives 9" in message
    assert "--regenerate-changed" in message and _log_rows(out) == logged
    regenerated = run_job(_job(manifest, out, frames=9), progress=False, regenerate_changed=True)
    assert regenerated.counts["ok"] == 3 and regenerated.already_committed == 1  # the bad row is unchanged
    recs = _records(out)
    assert {recs[r]["num_frames"] for r in "abc"} == {9}
    videos = {r: recs[r]["video_fingerprint"] for r in "abc"}

    # identity.frames 2 -> 3 only: the metrics moved, the videos did not -> rescored, never regenerated
    more_frames = {**IDENTITY, "frames": 3}
    with pytest.raises(
        ChangedRows, match="metrics.identity.frames: 3 committed rows were made with 2; this run gives 3"
    ):
        run_job(_job(manifest, out, frames=9, identity=more_frames), progress=False)
    mtimes = {r: (tmp_path / "out" / "videos" / f"{r}.mp4").stat().st_mtime_ns for r in "abc"}
    rescored = run_job(_job(manifest, out, frames=9, identity=more_frames), progress=False, rescore_changed=True)
    assert rescored.counts["ok"] == 3
    recs = _records(out)
    for rid in "abc":
        assert recs[rid]["frames_scored"] == 3 and recs[rid]["video_fingerprint"] == videos[rid]
        assert (tmp_path / "out" / "videos" / f"{rid}.mp4").stat().st_mtime_ns == mtimes[rid]

    # the manifest is edited: b's prompt changes, c is removed, a row is inserted first (the bad row keeps its key),
    # and a's portrait file gets other bytes at the same path
    Image.fromarray(np.asarray(Image.open(portrait))[:, ::-1]).save(portrait)
    inserted = [{"id": "d", "portrait": ASTRONAUT, "prompt": "d"}]
    edited = _manifest(tmp_path / "m2.parquet", str(portrait), prompt_b="b, smiling", with_c=False, extra=inserted)
    with pytest.raises(ChangedRows) as refused:
        run_job(_job(edited, out, frames=9, identity=more_frames), progress=False)
    message = str(refused.value)
    assert 'prompt: 1 committed rows were made with "b"; this run gives "b, smiling"' in message
    assert "portrait: 1 committed rows were made from portrait files whose bytes have changed" in message
    final = run_job(_job(edited, out, frames=9, identity=more_frames), progress=False, regenerate_changed=True)
    assert final.counts["ok"] == 3  # a (new bytes), b (new prompt), d (new row)
    recs = _records(out)
    assert set(recs) == {"a", "b", "c", "d", bad_key}  # c stays (counted as not in the manifest)
    assert recs["b"]["prompt"] == "b, smiling" and recs["a"]["portrait_sha256"] != recs["c"]["portrait_sha256"]

    # _job.json keeps every run's own spec and what its resume did
    runs = json.loads((tmp_path / "out" / "_job.json").read_text())["runs"]
    assert [r["run_seq"] for r in runs] == [1, 2, 3, 4, 5]
    assert [r["spec"]["defaults"]["num_frames"] for r in runs] == [5, 5, 9, 9, 9]
    assert runs[0]["resolved_defaults"]["num_frames"] == 5 and runs[0]["resolved_defaults"]["num_inference_steps"]
    assert runs[-1]["resume"]["not_in_manifest"] == 1 and runs[-1]["resume"]["regenerated"] == 2


def test_a_failed_row_whose_input_was_fixed_is_redone_without_a_flag(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    broken = write_manifest(
        tmp_path / "m1.parquet", [{"id": "a", "portrait": ASTRONAUT, "prompt": "a", "num_frames": 6}]
    )
    assert run_job(_job(broken, out), progress=False).counts["failed"] == 1
    fixed = write_manifest(
        tmp_path / "m2.parquet", [{"id": "a", "portrait": ASTRONAUT, "prompt": "a", "num_frames": 9}]
    )
    assert run_job(_job(fixed, out), progress=False).counts["ok"] == 1
    assert _records(out)["a"]["status"] == "ok"


def test_a_record_has_no_column_a_typo_could_create() -> None:
    """One typed Record: setting a misspelled column, or carrying a value the schema has no column for, raises."""
    with pytest.raises(TypeError):
        Record(id="a", status="ok", identity_maen=0.5)  # type: ignore[call-arg]
    with pytest.raises(KeyError, match="identity_maen"):
        Record(id="a", status="ok").set(identity_maen=0.5)
    with pytest.raises(KeyError, match="campaign"):
        records_to_table([Record(id="a", status="ok", carried={"campaign": "x"})], result_schema())


def test_a_carried_column_whose_type_changed_is_refused_at_run_start(tmp_path: Path) -> None:
    """``campaign`` was int64 in the first run and is text now: refused before anything runs (a reader would
    otherwise meet two types); widening int32 to int64 is fine."""
    out = str(tmp_path / "out")
    first = [{"id": "a", "portrait": ASTRONAUT, "prompt": "a", "campaign": 7, "batch": 1}]
    schema = pa.schema(
        [
            *(pa.field(n, pa.string()) for n in ("id", "portrait", "prompt")),
            ("campaign", pa.int64()),
            ("batch", pa.int32()),
        ]
    )
    run_job(_job(write_manifest(tmp_path / "m1.parquet", first, schema), out), progress=False)
    texts = [{**first[0], "id": "b", "campaign": "spring"}]
    changed = _job(write_manifest(tmp_path / "m2.parquet", texts), out)
    assert "'campaign' is string in this manifest but int64" in "".join(
        validate_job(changed, run_preflight=False).refusals
    )
    with pytest.raises(SchemaDrift, match="'campaign' is string in this manifest but int64"):
        run_job(changed, progress=False)
    wider = schema.set(4, pa.field("batch", pa.int64()))
    run_job(_job(write_manifest(tmp_path / "m3.parquet", [{**first[0], "id": "c"}], wider), out), progress=False)
    assert open_results(out).schema.field("batch").type == pa.int64()


def test_a_changed_setting_inside_a_list_is_named_by_its_index() -> None:
    """A LoRA's strength is one value in a list of mappings: the refusal names it, not the list cut at 60 chars."""
    from farm.resume import _json_differences

    lora = {"path": "s3://bucket/weights/loras/a-long-name-for-a-4-step-lora.safetensors", "scale": 0.8}
    before = json.dumps({"weights": {"base": "b", "lora": [lora]}})
    after = json.dumps({"weights": {"base": "b", "lora": [{**lora, "scale": 0.5}, {"path": "x.safetensors"}]}})
    assert list(_json_differences("model", before, after)) == [
        ("model.weights.lora[0].scale", "0.8", "0.5"),
        ("model.weights.lora[1].path", "null", '"x.safetensors"'),
    ]


def test_a_committed_ok_row_duplicated_in_the_manifest_keeps_its_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a crash-and-resume probe: duplicating a committed id was refused as a change whose fix,
    --regenerate-changed, replaced the ok record (and orphaned its video) with a duplicate_id failure."""
    out = str(tmp_path / "out")
    data = [{"id": "a", "portrait": ASTRONAUT, "prompt": "a"}, {"id": "b", "portrait": ASTRONAUT, "prompt": "b"}]
    run_job(_job(write_manifest(tmp_path / "m1.parquet", data), out), progress=False)
    before = _records(out)["a"]
    duplicated = write_manifest(tmp_path / "m2.parquet", [*data, {"id": "a", "portrait": ASTRONAUT, "prompt": "a2"}])
    with caplog.at_level("WARNING", logger="farm"):
        again = run_job(_job(duplicated, out), progress=False)
    assert sum(again.counts.values()) == 0, "nothing recorded: no duplicate_id failure replaces the ok record"
    assert _records(out)["a"] == before and Path(before["video"]).is_file()
    assert "1 committed ok row(s) are invalid in this manifest now (duplicate_id: 1)" in caplog.text
