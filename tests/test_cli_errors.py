"""User mistakes end in one message naming the value and the fix, and a documented exit code; no traceback.

Table-driven over ``farm.cli.main`` in-process; a subprocess only where a real closed pipe is needed. No Ray starts.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm import __version__, faults
from farm.cli import EXIT_ABORTED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_STDOUT_CLOSED, EXIT_USAGE, main
from farm.records import InfraError, Record
from farm.results import result_schema, write_part
from farm.storage import OutputLayout
from tests.helpers import rows, write_manifest

COMMANDS = ("run", "validate", "status", "results", "compact", "export", "compare", "score", "models", "schemas")


def _spec(path: Path, manifest: str, output: str, **changes: Any) -> str:
    spec: dict[str, Any] = {"manifest": manifest, "output": output, "model": {"backend": "still"}}
    spec["identity"] = {"enabled": False}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture()
def ctx(tmp_path: Path) -> dict[str, str]:
    """Paths the cases name: a manifest, a job output with one record, specs with one mistake each."""
    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    out = OutputLayout(str(tmp_path / "out"))
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    write_part(out, 1, "r", 0, [Record.from_row({"id": "a", "status": "ok", "committed_at": now})], result_schema())
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"manifest: {manifest}\noutput: {tmp_path}/o\nmodel:\n  backend: still\n   dtype: fp32\n")
    new = str(tmp_path / "new")
    return {
        "tmp": str(tmp_path),
        "manifest": manifest,
        "out": out.root,
        "broken": str(broken),
        "good": _spec(tmp_path / "good.yaml", manifest, new),
        "stil": _spec(tmp_path / "stil.yaml", manifest, new, model__backend="stil"),
        "identiy": _spec(tmp_path / "identiy.yaml", manifest, new, identiy={"frames": 8}),
        "attempt": _spec(tmp_path / "attempt.yaml", manifest, new, runtime__max_attempt=3),
        "gs": _spec(tmp_path / "gs.yaml", "gs://bucket/m.parquet", new),
    }


NO_GCSFS = pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
NO_ADLFS = pytest.mark.skipif(importlib.util.find_spec("adlfs") is not None, reason="adlfs is installed here")

# (argv with {placeholders} from ctx, exit code, fragments stderr must hold: the value and the fix)
CASES = [
    (["validate", "{stil}"], EXIT_USAGE, ["{stil}", "model.backend", "'stil'", "did you mean 'still'"]),
    (["validate", "{identiy}"], EXIT_USAGE, ["{identiy}", "identiy: unknown key", "did you mean 'identity'"]),
    (["validate", "{attempt}"], EXIT_USAGE, ["runtime.max_attempt: unknown key", "did you mean 'max_attempts'"]),
    (["validate", "{broken}"], EXIT_USAGE, ["invalid YAML in {broken}, line 5 column 9", "fix the syntax"]),
    (["validate", "{tmp}/nope.yaml"], EXIT_USAGE, ["{tmp}/nope.yaml", "not found", "YAML job spec"]),
    (["run", "{good}", "--replicas", "abc"], EXIT_USAGE, ["--replicas", "'abc'", "or 'all'"]),
    (["run", "{good}", "{good}", "--output", "{tmp}/x"], EXIT_USAGE, ["--output", "a sweep", "drop it"]),
    (["stauts", "{out}"], EXIT_USAGE, ["'stauts'", "did you mean 'status'"]),
    (["run", "{good}", "--retry-faild"], EXIT_USAGE, ["farm run: error", "did you mean '--retry-failed'"]),
    (["status", "{out}", "--jsn"], EXIT_USAGE, ["usage: farm status", "--jsn", "did you mean '--json'"]),
    (["status", "{good}"], EXIT_USAGE, ["{good} is a file", "output:"]),
    (["status", "{tmp}/typo"], EXIT_USAGE, ["no job output at {tmp}/typo", "typo"]),
    (["results", "{tmp}"], EXIT_USAGE, ["no job output at {tmp}", "_job.json"]),
    (["compact", "{tmp}/typo"], EXIT_USAGE, ["no job output at {tmp}/typo"]),
    (["results", "{out}", "--format", "parquet"], EXIT_USAGE, ["--format parquet", "--to FILE"]),
    (["status", "{out}", "--storage-option", "anon"], EXIT_USAGE, ["--storage-option", "'anon'", "key=value"]),
    (["status", "{out}", "--storage-option", "Sekr3t:x"], EXIT_USAGE, ["--storage-option", "key=value"]),
    (["status", "{out}", "--storage-option", "a..b=Sekr3t"], EXIT_USAGE, ["the key 'a..b'", "empty"]),
    (["status", "{out}", "--storage-option", "a=1", "--storage-option", "a.b=2"], EXIT_USAGE, ["a.b", "a was"]),
    (
        ["score", "{manifest}", "--output", "{tmp}/s", "--recognizer", "insightface"],
        EXIT_USAGE,
        ["--recognizer insightface needs --pack", "--pack ./models/antelopev2", "--recognizer dlib"],
    ),
    (
        ["results", "{out}", "--format", "csv", "--to", "{tmp}/r.parquet"],
        EXIT_USAGE,
        ["--format csv contradicts --to {tmp}/r.parquet", "names parquet", "--to {tmp}/r.csv", "leave --format out"],
    ),
    (["results", "{out}", "--to", "{tmp}/r.json"], EXIT_USAGE, ["names json", "does not write", "{tmp}/r.jsonl"]),
    (
        ["results", "{out}", "--format", "jsonl", "--to", "{tmp}/r.json"],
        EXIT_USAGE,
        ["--to {tmp}/r.json with --format jsonl", "does not write", "give --to {tmp}/r.jsonl"],
    ),
    (
        ["compare", "{out}", "--to", "{tmp}/x.json"],
        EXIT_USAGE,
        ["--to {tmp}/x.json", "names json", "csv or parquet", "--to {tmp}/x.csv or --to {tmp}/x.parquet"],
    ),
    (["compare", "{out}", "--to", "{tmp}/x"], EXIT_USAGE, ["--to {tmp}/x", "names no format", "csv or parquet"]),
    (["status", "s4://bucket/out"], EXIT_USAGE, ["s4://bucket/out", "unknown storage protocol", "did you mean"]),
    pytest.param(["status", "gs://bucket/out"], EXIT_USAGE, ["gs://bucket/out", "pip install gcsfs"], marks=NO_GCSFS),
    pytest.param(["validate", "{gs}"], EXIT_USAGE, ["{gs}: manifest gs://", "pip install gcsfs"], marks=NO_GCSFS),
    pytest.param(
        ["score", "{manifest}", "--output", "az://c/out"],
        EXIT_USAGE,
        ["az://c/out", "pip install adlfs"],
        marks=NO_ADLFS,
    ),
]


@pytest.mark.parametrize(("argv", "code", "fragments"), CASES)
def test_mistake_gets_one_message_and_its_exit_code(
    ctx: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], code: int, fragments: list[str]
) -> None:
    assert main([a.format(**ctx) for a in argv]) == code
    captured = capsys.readouterr()
    for fragment in fragments:
        assert fragment.format(**ctx) in captured.err, (fragment, captured.err)
    assert "Traceback" not in captured.err + captured.out
    assert "Sekr3t" not in captured.err  # a value without '=' may be a secret: never echoed
    assert "<unicode string>" not in captured.err


@pytest.mark.parametrize(
    ("raised", "code", "fragments"),
    [
        (RuntimeError("boom"), EXIT_INTERNAL, ["error: RuntimeError: boom", "--debug"]),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, ["interrupted", "rerun the same command"]),
        (InfraError("listing 's3://b/o' failed after 3 attempts: timeout"), EXIT_ABORTED, ["storage", "s3://b/o"]),
    ],
)
def test_other_failures_map_to_documented_codes(
    ctx: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    raised: BaseException,
    code: int,
    fragments: list[str],
) -> None:
    def fail(*_args: Any) -> str:
        raise raised

    monkeypatch.setattr("farm.report.status_text", fail)
    assert main(["status", ctx["out"]]) == code
    err = capsys.readouterr().err
    assert all(f in err for f in fragments) and "Traceback" not in err, err
    assert main(["--debug", "status", ctx["out"]]) == code
    assert "Traceback" in capsys.readouterr().err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"farm {__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and all(f"    {name} " in out for name in COMMANDS), out
    assert all(f"  {code} " in out for code in (1, 2, 3, 4, 5, 70, 130, 141)), out
    assert main(["score", "--help"]) == 0
    assert "processes" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["status", "validate"])
def test_s3_without_credentials_names_the_fix(
    s3_endpoint: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    """No key anywhere (env, files, metadata service): botocore raises NoCredentialsError before any request. The
    fix names where this command takes storage options: --storage-option flags (status), the job spec (validate)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(faults, "DEFAULT_RETRY", faults.NO_RETRY)
    endpoint = s3_endpoint["endpoint_url"]
    if command == "status":
        options = [f"client_kwargs.endpoint_url={endpoint}", "anon=false", "skip_instance_cache=true"]
        argv = ["status", "s3://bucket/out"] + [a for o in options for a in ("--storage-option", o)]
        where, fix, wrong = "s3://bucket/out", ["--storage-option key=", "--storage-option anon=true"], "job spec"
    else:
        spec = _spec(tmp_path / "s3.yaml", "s3://bucket/m.parquet", str(tmp_path / "new"))
        options = {"client_kwargs": {"endpoint_url": endpoint}, "anon": False, "skip_instance_cache": True}
        Path(spec).write_text(yaml.safe_dump({**yaml.safe_load(Path(spec).read_text()), "storage_options": options}))
        argv, where, wrong = ["validate", spec], "s3://bucket/m.parquet", "--storage-option"
        fix = ["storage_options {s3: {key: ..., secret: ...}} in the job spec", "{s3: {anon: true}} in the job spec"]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"no credentials for {where}" in err and "AWS_ACCESS_KEY_ID" in err, err
    assert all(f in err for f in fix) and wrong not in err, err
    assert "Traceback" not in err


def test_closed_stdout_is_quiet(ctx: dict[str, str]) -> None:
    """``farm results OUT | head``: the reader goes away; no BrokenPipeError, exit 141 (128 + SIGPIPE)."""
    argv = [sys.executable, "-m", "farm.cli", "results", ctx["out"], "--format", "jsonl"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered stdout: the harder case
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the child has printed anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == EXIT_STDOUT_CLOSED and err == "", err
