"""Secrets never leave the process: redaction rules, the scrubber, the log filter, and a whole job on S3 (moto)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from farm import secrets
from farm.cli import main
from farm.recording import RecordMaker
from farm.records import ErrorCode, Status
from farm.report import export_results, status_text
from farm.results import ResultWriter, result_schema
from farm.runtime.driver import Driver, run_job
from farm.storage import OutputLayout
from farm.table import read_results
from tests.helpers import rows, still_job, write_manifest

KEY_ID = "AKIAFARMKEYID0000001"
SECRET = "farm-secret/key+value=0001"  # '/', '+' and '=' also appear URL-encoded in URLs and messages
TOKEN = "FarmSessionToken0001xyz"
MODEL_SECRET = "model-weights-secret-0001"
PASSWORD = "pw-in-the-url-0001"
ALL = (KEY_ID, SECRET, TOKEN, MODEL_SECRET, PASSWORD)


def _spec() -> dict[str, Any]:
    return {
        "name": "job",
        "output": "s3://bucket/out",
        "manifest": f"https://reader:{PASSWORD}@data.example/m.parquet",
        "storage_options": {
            "key": KEY_ID,
            "secret": SECRET,
            "token": TOKEN,
            "anon": False,
            "some_future_option": "hidden-by-default",
            "client_kwargs": {"endpoint_url": f"https://minio:{PASSWORD}@minio.local:9000", "region_name": "eu"},
            "s3": {"key": KEY_ID, "endpoint_url": "https://s3.local"},
            "https": {"headers": {"Authorization": f"Bearer {TOKEN}", "Accept": "video/mp4"}, "timeout": 30},
        },
        "model": {"backend": "still", "options": {"zoom": 1.2, "storage_options": {"secret": MODEL_SECRET}}},
        "identity": {"options": {"apiKey": MODEL_SECRET, "upsample": 1}},
        "runtime": {"env": {"AWS_SECRET_ACCESS_KEY": SECRET, "X-Auth-Token": TOKEN, "tokenizer": "t5"}},
    }


def test_redact_hides_credentials_and_options_but_keeps_structure() -> None:
    found: set[str] = set()
    out = secrets.redact(_spec(), found)
    so = out["storage_options"]
    assert so["key"] == so["secret"] == so["token"] == so["some_future_option"] == secrets.REDACTED
    assert so["anon"] is False
    assert so["client_kwargs"] == {"endpoint_url": "https://minio:***@minio.local:9000", "region_name": "eu"}
    assert so["s3"] == {"key": "***", "endpoint_url": "https://s3.local"}
    assert so["https"] == {"headers": {"Authorization": "***", "Accept": "***"}, "timeout": 30}
    assert out["model"]["options"] == {"zoom": 1.2, "storage_options": {"secret": "***"}}
    assert out["identity"]["options"] == {"apiKey": "***", "upsample": 1}
    assert out["runtime"]["env"] == {"AWS_SECRET_ACCESS_KEY": "***", "X-Auth-Token": "***", "tokenizer": "t5"}
    assert out["manifest"] == "https://reader:***@data.example/m.parquet"
    assert out["output"] == "s3://bucket/out" and out["name"] == "job"
    assert set(ALL) <= found
    text = json.dumps(out)
    assert not [s for s in ALL if s in text]


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("key", True),
        ("aws_access_key_id", True),
        ("AWS_SESSION_TOKEN", True),
        ("apiKey", True),
        ("api_key", True),
        ("x-api-key", True),
        ("client_secret", True),
        ("Authorization", True),
        ("passwd", True),
        ("private_key_id", True),
        ("sas_token", True),
        ("connection_string", True),
        ("Credentials", True),
        ("client_kwargs", False),
        ("endpoint_url", False),
        ("tokenizer", False),
        ("monkey", False),
        ("keyframes", False),
        ("signature_version", False),
    ],
)
def test_credential_key_names(key: str, secret: bool) -> None:
    assert secrets.is_credential_key(key) is secret


def test_scrubber_replaces_values_their_url_forms_and_url_passwords() -> None:
    scrubber = secrets.Scrubber()
    scrubber.remember(_spec())
    text = (
        f"PermissionError: bad key {KEY_ID}/{SECRET} for https://x:{PASSWORD}@h/p "
        f"and ftp://u:other-pass@h; sig=farm-secret%2Fkey%2Bvalue%3D0001; user-only sftp://user@host"
    )
    clean = scrubber.scrub(text)
    assert not [s for s in (*ALL, "other-pass", "farm-secret%2Fkey") if s in clean]
    assert "ftp://u:***@h" in clean and "sftp://user@host" in clean and "PermissionError: bad key" in clean
    short = secrets.Scrubber(["abc"])  # too short to search for: it would garble ordinary text
    assert short.scrub("abcdef") == "abcdef"


def test_log_filter_scrubs_farm_loggers(caplog: pytest.LogCaptureFixture) -> None:
    secrets.remember({"storage_options": {"secret": SECRET}})
    logging.getLogger("farm.lease")  # a child logger that exists before the filter is installed
    secrets.install_log_filter()
    with caplog.at_level(logging.INFO, logger="farm"):
        logging.getLogger("farm").warning("write failed with %s", SECRET)
        logging.getLogger("farm.lease").info("lease for https://u:%s@h", PASSWORD)
        try:
            raise PermissionError(f"denied: {SECRET}")
        except PermissionError:
            logging.getLogger("farm").exception("commit failed")
    assert "write failed with ***" in caplog.text and "https://u:***@h" in caplog.text
    assert "PermissionError: denied: ***" in caplog.text
    assert SECRET not in caplog.text and PASSWORD not in caplog.text


def test_error_messages_of_records_are_scrubbed(tmp_path: Path) -> None:
    """The driver scrubs ``error_message`` (any path: worker, scheduler, manifest errors) and the URIs it commits."""
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    job = still_job(manifest, str(tmp_path / "out"), model={"options": {"storage_options": {"secret": MODEL_SECRET}}})
    driver = Driver(job, progress=False)
    driver.maker = RecordMaker("still", "{}", "{}", [])
    driver.writer = ResultWriter(driver.layout, result_schema(), 1)
    row = {"id": "row-000", "portrait": f"https://me:{PASSWORD}@img.example/p.png", "prompt": "p"}
    message = f"403 for s3://b/p.png with {MODEL_SECRET}"
    driver._commit(driver.maker.invalid(row, "row-000", ErrorCode.PORTRAIT_UNREADABLE, message, Status.FAILED))
    driver.writer.flush()
    (rec,) = read_results(driver.layout).to_pylist()
    assert rec["error_message"] == "403 for s3://b/p.png with ***"
    assert rec["portrait"] == "https://me:***@img.example/p.png"


def _everything_under(root: str, options: dict[str, Any]) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    return {path: fs.cat_file(path) for path in fs.find(root.removeprefix("s3://"))}


@pytest.mark.usefixtures("ray_cluster")
def test_job_on_s3_leaks_no_secret(
    tmp_path: Path,
    s3_endpoint: dict[str, Any],
    s3_bucket: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint = s3_endpoint["endpoint_url"]
    options = {"key": KEY_ID, "secret": SECRET, "token": TOKEN, "client_kwargs": {"endpoint_url": endpoint}}
    data = rows(3) + [{"id": "gone", "portrait": str(tmp_path / "nope.png"), "prompt": "p"}]
    manifest = write_manifest(tmp_path / "m.parquet", data)
    out = f"{s3_bucket}/out"
    job = still_job(
        manifest,
        out,
        storage_options=options,
        model={"options": {"storage_options": {"secret": MODEL_SECRET, "api_key": MODEL_SECRET}}},
        resources={"replicas": 1, "cpus_per_replica": 0.25},
        runtime={"inject_faults": {"oom": {"row-001": 1}}},  # a retried row: its traceback goes to the log
    )
    with caplog.at_level(logging.INFO, logger="farm"):
        summary = run_job(job, progress=False)
    assert summary.counts["ok"] == 3 and summary.counts["failed"] == 1
    assert "Traceback" in caplog.text and "InfraError" in caplog.text

    files = _everything_under(out, options)
    assert any(p.endswith("_job.json") for p in files) and any(p.endswith(".mp4") for p in files)
    leaks = {p: s for p, blob in files.items() for s in ALL if s.encode() in blob}
    assert not leaks
    spec = json.loads(next(b for p, b in files.items() if p.endswith("_job.json")))["spec"]
    shown = spec["storage_options"].get("s3", spec["storage_options"])  # the flat form is bound to the output's
    assert shown["client_kwargs"]["endpoint_url"] == endpoint
    assert shown["key"] == shown["secret"] == shown["token"] == "***"

    records = json.dumps(read_results(OutputLayout(out, options)).to_pylist(), default=str)
    status = status_text(out, options)
    exported = export_results(out, options, "jsonl", None, None)
    assert main(["status", out, *(f"--storage-option={k}={v}" for k, v in _flat(options))]) == 0
    printed = capsys.readouterr()
    assert "records: 4" in status and "records: 4" in printed.out
    for text in (caplog.text, records, status, exported, printed.out, printed.err):
        assert not [s for s in ALL if s in text]


def _flat(options: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def test_spec_errors_do_not_echo_credential_values() -> None:
    """A rejected spec names the field, never the secret value that was put there."""
    import pytest

    from farm.config import SpecError, parse_job

    spec = {"manifest": "m", "output": "o", "model": {"backend": "still", "weights": {"api_token": 12345678}}}
    with pytest.raises(SpecError) as err:
        parse_job(spec)
    assert "model.weights.api_token" in str(err.value) and "12345678" not in str(err.value)
    spec["model"]["weights"] = {"base": 7, "adapter": "https://user:hunter2-pw@host/x"}
    with pytest.raises(SpecError) as err:
        parse_job({**spec, "runtime": {"max_attempts": "https://u:hunter2-pw@h"}})
    assert "hunter2-pw" not in str(err.value) and "u:***@h" in str(err.value)
