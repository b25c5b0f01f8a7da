"""``farm`` command line: run, validate, status, results, score, models make-tiny, schemas."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from farm import secrets

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_ABORTED, EXIT_ROWS_FAILED, EXIT_OUTPUT_BUSY = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130


def _storage_options(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``--storage-option key=value`` (repeatable; ``client_kwargs.endpoint_url=...`` nests)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--storage-option expects key=value, got {pair!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    secrets.remember({"storage_options": out})  # error messages and log lines never show these values
    return out


def _load(args: argparse.Namespace, path: str | None = None):
    from farm.config import load_job

    overrides = {"manifest": args.manifest, "output": getattr(args, "output", None)}
    if getattr(args, "replicas", None) is not None:
        overrides["resources.replicas"] = args.replicas if args.replicas == "all" else int(args.replicas)
    return load_job(path or args.job, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    """One job, or a sweep: several jobs in turn on one Ray cluster (e.g. Lynx and the `still` ceiling)."""
    from farm.runtime.driver import run_job

    paths = [args.job, *args.more_jobs]
    if len(paths) > 1 and args.output:
        raise SystemExit("--output overrides one job's output; a sweep writes each job to its own output")
    jobs = [_load(args, path) for path in paths]  # validate every spec before any GPU time
    code = EXIT_OK
    for path, job in zip(paths, jobs):
        if len(jobs) > 1:
            print(f"== {path}: {job.model.backend} -> {job.output}", file=sys.stderr)
        summary = run_job(
            job,
            progress=not args.no_progress,
            retry_failed=args.retry_failed,
            address=args.address,
            regenerate_changed=args.regenerate_changed,
            rescore_changed=args.rescore_changed,
        )
        print(json.dumps(summary.as_dict(), indent=2))
        if _too_many_failed(summary.counts, job.runtime.max_failed_fraction, path):
            code = EXIT_ROWS_FAILED
    return code


def _too_many_failed(counts: dict[str, int], limit: float, path: str) -> bool:
    """More failed rows than ``runtime.max_failed_fraction`` of those this run recorded (skipped ones aside)."""
    failed, ok = counts.get("failed", 0), counts.get("ok", 0)
    if failed == 0 or failed / (failed + ok) <= limit:
        return False
    print(
        f"error: {path}: {failed} of {failed + ok} rows failed this run, more than runtime.max_failed_fraction="
        f"{limit:g}; see `farm status` for the error codes (exit {EXIT_ROWS_FAILED})",
        file=sys.stderr,
    )
    return True


def cmd_compare(args: argparse.Namespace) -> int:
    from farm.report import compare_outputs

    print(compare_outputs(args.outputs, _storage_options(args.storage_option), args.to, args.limit))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from farm.validate import validate_job

    job = _load(args)
    report = validate_job(job, check_portraits=args.check_portraits or None)
    print(f"job spec {args.job}: ok ({job.model.backend}{' ' + job.model.variant if job.model.variant else ''})")
    print(report.render())
    return EXIT_OK if report.ok else EXIT_INVALID


def cmd_status(args: argparse.Namespace) -> int:
    from farm.report import status_text

    print(status_text(args.output, _storage_options(args.storage_option)))
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    from farm.report import export_results

    text = export_results(args.output, _storage_options(args.storage_option), args.format, args.to, args.limit)
    if text:
        print(text)
    return EXIT_OK


def cmd_compact(args: argparse.Namespace) -> int:
    from farm.publish import compact_output

    summary = compact_output(args.output, _storage_options(args.storage_option))
    print(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from farm.export import export_output

    summary = export_output(
        args.output,
        args.format,
        args.to,
        where=args.where,
        shard_size=args.shard_size,
        storage_options=_storage_options(args.storage_option),
    )
    print(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from farm.scoring import ScoreAborted, score_manifest

    try:
        summary = score_manifest(
            args.manifest,
            args.output,
            recognizer=args.recognizer,
            pack=args.pack,
            frames=args.frames,
            storage_options=_storage_options(args.storage_option),
            progress=not args.no_progress,
            workers=args.workers,
            retry_failed=args.retry_failed,
        )
    except ScoreAborted as exc:
        print(f"scoring aborted: {secrets.scrub(str(exc))}", file=sys.stderr)
        return EXIT_ABORTED
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from farm.models.lynx.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.dir, seed=args.seed)
    print(f"tiny Lynx checkpoint written to {out}")
    return EXIT_OK


def cmd_schemas(args: argparse.Namespace) -> int:
    from farm.schemas import write_schemas

    for path in write_schemas(args.dir):
        print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def job_args(p: argparse.ArgumentParser, output: bool = True) -> None:
        p.add_argument("job", help="job spec YAML (see jobs/)")
        p.add_argument("--manifest", help="override the job's manifest URI")
        if output:
            p.add_argument("--output", help="override the job's output URI")

    p = sub.add_parser("run", help="run a job, or several in turn (a sweep); rerun to resume")
    job_args(p)
    p.add_argument("more_jobs", nargs="*", metavar="JOB", help="more job specs, run in turn after the first")
    p.add_argument("--replicas", help="override resources.replicas (a number or 'all')")
    p.add_argument("--retry-failed", action="store_true", help="also rerun rows whose committed status is failed")
    p.add_argument(
        "--regenerate-changed",
        action="store_true",
        help="redo committed ok rows whose inputs changed (spec, manifest row, portrait bytes); without it such a "
        "rerun refuses before any GPU time and says what changed",
    )
    p.add_argument(
        "--rescore-changed",
        action="store_true",
        help="score committed videos again when only the metric settings changed (no generation)",
    )
    p.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else start a local one)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a job spec and its whole manifest, no GPU time")
    job_args(p)
    p.add_argument("--check-portraits", action="store_true", help="also open every portrait")
    p.set_defaults(func=cmd_validate)

    for name, func, helptext in (
        ("status", cmd_status, "counts by status / error code, throughput"),
        ("results", cmd_results, "print or export the merged results (one record per id)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("output", help="a job's output URI")
        p.add_argument("--storage-option", action="append", help="fsspec option key=value (repeatable)")
        if name == "results":
            p.add_argument("--format", choices=["table", "csv", "jsonl", "parquet"], default="table")
            p.add_argument("--to", help="write to this file/URI instead of printing")
            p.add_argument("--limit", type=int, default=None, help="table: at most this many rows")
        p.set_defaults(func=func)

    p = sub.add_parser("compact", help="publish OUT/results/ (one row per id) from the record log; runs do it too")
    p.add_argument("output", help="a job's output URI")
    p.add_argument("--storage-option", action="append", help="fsspec option key=value (repeatable)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("export", help="export videos + records as a dataset (WebDataset shards, HF, Parquet)")
    p.add_argument("output", help="a job's output URI")
    p.add_argument("--format", choices=["webdataset", "hf", "parquet"], required=True)
    p.add_argument("--to", required=True, help="destination folder/URI (a rerun resumes)")
    p.add_argument("--where", help="filter over result columns, e.g. \"status = 'ok' AND identity_mean >= 0.6\"")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per shard")
    p.add_argument("--storage-option", action="append", help="fsspec option key=value (repeatable)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="identity metrics of several outputs side by side, joined by id")
    p.add_argument("outputs", nargs="+", help="job or score outputs (e.g. a Lynx job and its still baseline)")
    p.add_argument("--storage-option", action="append", help="fsspec option key=value (repeatable)")
    p.add_argument("--to", help="also write the per-id table (csv or parquet, by extension)")
    p.add_argument("--limit", type=int, default=20, help="per-id rows to print")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("score", help="score videos made anywhere against their portraits (resumable)")
    p.add_argument("manifest", help="Parquet with id, portrait, video columns")
    p.add_argument("--output", required=True, help="output URI (results under OUT/results/)")
    p.add_argument("--recognizer", choices=["dlib", "insightface"], default="dlib")
    p.add_argument("--pack", help="insightface model pack dir/URI (recognizer=insightface)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    p.add_argument("--workers", type=int, default=2, help="parallel scoring processes")
    p.add_argument("--retry-failed", action="store_true", help="also rescore rows whose committed status is failed")
    p.add_argument("--storage-option", action="append", help="fsspec option key=value (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("models", help="model utilities")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("make-tiny", help="write a tiny random-weight Lynx checkpoint in the official layout")
    q.add_argument("dir")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("schemas", help="write the manifest/result/job JSON Schemas")
    p.add_argument("--dir", default="schemas")
    p.set_defaults(func=cmd_schemas)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from farm.cache import CacheError
    from farm.config import SpecError
    from farm.export import ExportError
    from farm.lease import LeaseHeld, LeaseLost
    from farm.manifest import ManifestError
    from farm.records import InfraError
    from farm.runtime.errors import JobAborted
    from farm.table import SchemaDrift

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    secrets.install_log_filter()
    try:
        return args.func(args)
    except (SpecError, ManifestError, FileNotFoundError, CacheError, ExportError, SchemaDrift) as exc:
        print(f"error: {secrets.scrub(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (JobAborted, LeaseLost) as exc:
        print(f"job aborted: {secrets.scrub(str(exc))}", file=sys.stderr)
        return EXIT_ABORTED
    except InfraError as exc:  # storage stayed unreachable through its retries (timeouts, 5xx, refused credentials)
        print(f"error: storage: {secrets.scrub(str(exc))}", file=sys.stderr)
        return EXIT_ABORTED
    except LeaseHeld as exc:
        print(f"error: {secrets.scrub(str(exc))}", file=sys.stderr)
        return EXIT_OUTPUT_BUSY
    except KeyboardInterrupt:
        print("interrupted: committed rows are kept; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
