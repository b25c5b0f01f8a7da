"""The ``farm`` command line: run, validate, status, results, compact, export, compare, score, models, schemas.

Every mistake a user can make ends in one paragraph on stderr naming the value, where it came from and the fix, and
an exit code from ``EXIT_CODES``; tracebacks only with ``farm --debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from farm import __version__, secrets

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_ABORTED, EXIT_ROWS_FAILED, EXIT_OUTPUT_BUSY = 0, 1, 2, 3, 4, 5
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE: a bug, not a user mistake
EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away

DESCRIPTION = "Lynx Farm: Parquet manifests of (portrait, prompt) rows -> personalized videos and identity scores."
EXIT_CODES = f"""exit codes:
  {EXIT_OK:<4} ok
  {EXIT_INVALID:<4} farm validate: the manifest has invalid rows
  {EXIT_USAGE:<4} usage or configuration: a bad flag, job spec, manifest or output URI, missing credentials or a
       missing storage library (gcsfs, adlfs); the message names the value and the fix
  {EXIT_ABORTED:<4} aborted: a job gave up, or storage stayed unreachable (or refused the credentials) through retries
  {EXIT_ROWS_FAILED:<4} farm run: more than runtime.max_failed_fraction of the rows failed
  {EXIT_OUTPUT_BUSY:<4} the output is leased by another run
  {EXIT_INTERNAL:<4} internal error (a bug): rerun with --debug and report the traceback
  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C): committed rows are kept; rerun the same command to resume
  {EXIT_STDOUT_CLOSED:<4} stdout closed early (e.g. `farm results OUT | head`); nothing is printed about it"""


STORAGE_OPTION_HELP = (
    "fsspec option key=value, repeatable; dots nest (client_kwargs.endpoint_url=URL), true/false/numbers are typed"
)


class UsageError(Exception):
    """A command-line mistake found after parsing (exit 2); the message names the flag, the value and the fix."""


class _StdoutClosed(Exception):
    """The reader of stdout went away (``| head``)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a did-you-mean for a mistyped command or choice."""

    def error(self, message: str) -> NoReturn:
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            from farm.config import did_you_mean

            choices = [c.strip().strip("'") for c in found.group(2).split(",")]
            message += did_you_mean(found.group(1), choices)
        super().error(message)


def _emit(text: str, end: str = "\n") -> None:
    """Print a command's output; a closed stdout becomes ``_StdoutClosed`` (never a storage connection's error)."""
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        raise _StdoutClosed from None


def _replicas(text: str) -> int | str:
    """``--replicas``: a whole number >= 1, or ``all``."""
    if text == "all" or (text.isdigit() and int(text) >= 1):
        return text if text == "all" else int(text)
    raise argparse.ArgumentTypeError(f"expects a whole number >= 1 or 'all', got {text!r} (e.g. --replicas 4)")


def _storage_pair(text: str) -> tuple[list[str], Any]:
    """``--storage-option key=value``: the dotted key's parts and the value (true/false/numbers typed)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        shown = "a value that is not key=value (not shown: it may hold a secret)"
        if sep:  # a key is never a secret; its value may be
            shown = f"the key {key!r} (a part before, between or after its dots is empty)"
        elif re.fullmatch(r"[a-z_][a-z0-9_.]*", text):  # an option name without '=value'
            shown = repr(text)
        raise argparse.ArgumentTypeError(
            f"expects key=value with a non-empty key, got {shown} "
            "(e.g. --storage-option anon=true, --storage-option client_kwargs.endpoint_url=http://host:9000)"
        )
    return parts, value if secrets.is_credential_key(parts[-1]) else _typed(value)


def _typed(value: str) -> Any:
    """``true``/``false`` -> bool, ``10``/``2.5`` -> numbers (fsspec wants ``anon=False``, not the truthy "false")."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    return float(value) if re.fullmatch(r"-?\d+\.\d+", value) else value


def _storage_options(pairs: Sequence[tuple[list[str], Any]] | None) -> dict[str, Any]:
    """``--storage-option key=value`` (repeatable; ``client_kwargs.endpoint_url=...`` nests)."""
    out: dict[str, Any] = {}
    for parts, value in pairs or []:
        node = out
        *parents, leaf = parts
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                group = ".".join(parents[: i + 1])
                raise UsageError(f"--storage-option {'.'.join(parts)}=...: {group} was already given a value")
        node[leaf] = value
    secrets.remember({"storage_options": out})  # error messages and log lines never show these values
    return out


def _check_protocols(uris: Sequence[tuple[str, Any]]) -> None:
    """Each URI's fsspec protocol is known and its library installed (``gs://`` needs gcsfs), else ``UsageError``."""
    import fsspec

    from farm import storage
    from farm.config import did_you_mean

    for where, uri in uris:
        protocol = storage.protocol_of(uri) if isinstance(uri, str) and uri else None
        if protocol is None:
            continue
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as exc:
            raise UsageError(f"{where} {uri}: {_install_hint(exc) or exc}") from None
        except ValueError:
            hint = did_you_mean(protocol, fsspec.available_protocols(), cutoff=0.5)  # short names: s4 -> s3
            raise UsageError(
                f"{where} {uri}: unknown storage protocol {protocol + '://'!r}{hint}; give a local path or an fsspec "
                "URI such as s3://bucket/key, gs://bucket/key, az://container/key, https://host/path"
            ) from None


def _install_hint(exc: BaseException) -> str | None:
    """fsspec's "Please install gcsfs to access ..." -> "needs the gcsfs package: pip install gcsfs"."""
    found = re.search(r"[Ii]nstall (\w[\w.-]*)", str(exc))
    if not found:
        return None
    return f"needs the {found.group(1)} package, which is not installed: pip install {found.group(1)} ({exc})"


def _outputs(args: argparse.Namespace, *uris: str) -> dict[str, Any]:
    """The command's storage options, after checking that each of ``uris`` is a job output."""
    from farm.report import check_output

    options = _storage_options(args.storage_option)
    _check_protocols([("output", u) for u in uris] + [("--to", getattr(args, "to", None))])
    for uri in uris:
        check_output(uri, options)
    return options


def _load(args: argparse.Namespace, path: str | None = None):
    from farm.config import load_job

    path = path or args.job
    overrides = {"manifest": args.manifest, "output": getattr(args, "output", None)}
    if getattr(args, "replicas", None) is not None:
        overrides["resources.replicas"] = args.replicas
    job = load_job(path, overrides)
    uris = [("manifest", job.manifest), ("output", job.output), ("identity.pack", job.identity.pack)]
    uris += [(f"model.weights.{role}", uri) for role, uri in job.model.weight_uris().items()]
    uris += [(f"model.weights.lora[{i}]", lora.path) for i, lora in enumerate(job.model.loras())]
    _check_protocols([(f"{path}: {where}", uri) for where, uri in uris])
    return job


def cmd_run(args: argparse.Namespace) -> int:
    """One job, or a sweep: several jobs in turn on one Ray cluster (e.g. Lynx and the `still` ceiling)."""
    paths = [args.job, *args.more_jobs]
    if len(paths) > 1 and args.output:
        raise UsageError("--output overrides one job's output; a sweep writes each job to its own output: drop it")
    jobs = [_load(args, path) for path in paths]  # validate every spec before any GPU time (or Ray's import)
    from farm.runtime.driver import run_job

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
        _emit(json.dumps(summary.as_dict(), indent=2))
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
    from farm.report import compare_format, compare_outputs

    if args.to:
        _format_of(compare_format, args.to)
    _emit(compare_outputs(args.outputs, _outputs(args, *args.outputs), args.to, args.limit))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from farm.validate import validate_job

    job = _load(args)
    report = validate_job(job, check_portraits=args.check_portraits or None, deep=args.deep)
    _emit(f"job spec {args.job}: ok ({job.model.backend}{' ' + job.model.variant if job.model.variant else ''})")
    _emit(report.render())
    return EXIT_OK if report.ok else EXIT_INVALID


def cmd_status(args: argparse.Namespace) -> int:
    from farm.report import status_dict, status_text

    options = _outputs(args, args.output)
    if args.json:
        _emit(json.dumps(status_dict(args.output, options), indent=2, default=str))
    else:
        _emit(status_text(args.output, options))
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    from farm.report import export_results, results_format

    fmt = _format_of(results_format, args.format, args.to)
    if fmt == "parquet" and not args.to:
        raise UsageError("results --format parquet writes a file: add --to FILE (e.g. --to results.parquet)")
    text = export_results(args.output, _outputs(args, args.output), fmt, args.to, args.limit)
    if text:
        _emit(text, end="" if text.endswith("\n") else "\n")  # csv/jsonl end with their own newline
    return EXIT_OK


def _format_of(pick: Any, *given: str | None) -> str:
    """``pick(*given)``, the format ``--format``/``--to`` ask for; its ``ValueError`` is a usage error."""
    try:
        return pick(*given)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_summary(args: argparse.Namespace) -> int:
    import farm
    from farm.summary import render, summarize

    options = _outputs(args, args.output)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        summary = summarize(farm.open_results(args.output, options), by=args.by, metrics=metrics, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _emit(render(summary, args.format))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from farm.htmlreport import write_report

    options = _outputs(args, args.output)
    try:
        info = write_report(
            args.output,
            args.to,
            options,
            max_rows_per_section=args.per_section,
            thumbs=args.thumbs,
            by=args.by,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _emit(json.dumps(info, indent=2, default=str))
    return EXIT_OK


def cmd_compact(args: argparse.Namespace) -> int:
    from farm.publish import compact_output

    summary = compact_output(args.output, _outputs(args, args.output))
    _emit(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from farm.export import export_output

    summary = export_output(
        args.output,
        args.format,
        args.to,
        where=args.where,
        shard_size=args.shard_size,
        storage_options=_outputs(args, args.output),
    )
    _emit(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from farm.scoring import INSIGHTFACE_NEEDS_PACK, ScoreAborted, score_manifest

    if args.recognizer == "insightface" and not args.pack:
        raise UsageError(INSIGHTFACE_NEEDS_PACK)
    _check_protocols([("manifest", args.manifest), ("--output", args.output), ("--pack", args.pack)])
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
            rescore_changed=args.rescore_changed,
        )
    except ScoreAborted as exc:
        print(f"scoring aborted: {secrets.scrub(str(exc))}", file=sys.stderr)
        return EXIT_ABORTED
    _emit(json.dumps(summary, indent=2))
    return EXIT_OK


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from farm.models.lynx.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.dir, seed=args.seed)
    _emit(f"tiny Lynx checkpoint written to {out}")
    return EXIT_OK


def cmd_schemas(args: argparse.Namespace) -> int:
    from farm.schemas import write_schemas

    for path in write_schemas(args.dir):
        _emit(str(path))
    return EXIT_OK


def _storage_option_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option", action="append", type=_storage_pair, metavar="KEY=VALUE", help=STORAGE_OPTION_HELP
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="farm", description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"farm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error (for bug reports)")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def job_args(p: argparse.ArgumentParser, output: bool = True) -> None:
        p.add_argument("job", help="job spec YAML (see jobs/)")
        p.add_argument("--manifest", help="override the job's manifest URI")
        if output:
            p.add_argument("--output", help="override the job's output URI")

    p = sub.add_parser("run", help="run a job, or several in turn (a sweep); rerun to resume")
    job_args(p)
    p.add_argument("more_jobs", nargs="*", metavar="JOB", help="more job specs, run in turn after the first")
    p.add_argument(
        "--replicas", type=_replicas, metavar="N|all", help="override resources.replicas (a number or 'all')"
    )
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
    p.add_argument(
        "--deep",
        action="store_true",
        help="pre-flight: also read every safetensors header and check the adapter's layers against model.variant "
        "(range reads, no model load)",
    )
    p.set_defaults(func=cmd_validate)

    for name, func, helptext in (
        ("status", cmd_status, "counts by status / error code, throughput"),
        ("results", cmd_results, "print or export the merged results (one record per id)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("output", help="a job's output URI")
        _storage_option_arg(p)
        if name == "status":
            p.add_argument(
                "--json", action="store_true", help="the same as JSON (a live run's progress, stale heartbeat)"
            )
        if name == "results":
            p.add_argument(
                "--format",
                choices=["table", "csv", "jsonl", "parquet"],
                help="default: the one --to's extension names (.txt .csv .jsonl .parquet), else table",
            )
            p.add_argument("--to", help="write to this file/URI instead of printing (any format, the table too)")
            p.add_argument("--limit", type=int, default=None, help="table: at most this many rows")
        p.set_defaults(func=func)

    p = sub.add_parser("summary", help="per-config counts, face rate, s/video and metric means with 95%% intervals")
    p.add_argument("output", help="a job's output URI")
    p.add_argument(
        "--by",
        action="append",
        metavar="COLUMN",
        help="group by this column (repeatable; default config_id, else model)",
    )
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--metrics", help="comma-separated metric columns (default: every known metric the output has)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (same seed, same intervals)")
    _storage_option_arg(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("report", help="one self-contained HTML report: summary, plots, contact sheets, failures")
    p.add_argument("output", help="a job's output URI")
    p.add_argument("--to", required=True, help="the HTML file to write, e.g. report.html")
    p.add_argument("--by", action="append", metavar="COLUMN", help="group by this column (repeatable)")
    p.add_argument("--thumbs", type=int, default=200, help="videos on the contact sheets (sampled evenly over configs)")
    p.add_argument("--per-section", type=int, default=12, help="videos in the best, worst and near-static galleries")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    _storage_option_arg(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compact", help="publish OUT/results/ (one row per id) from the record log; runs do it too")
    p.add_argument("output", help="a job's output URI")
    _storage_option_arg(p)
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("export", help="export videos + records as a dataset (WebDataset shards, HF, Parquet)")
    p.add_argument("output", help="a job's output URI")
    p.add_argument("--format", choices=["webdataset", "hf", "parquet"], required=True)
    p.add_argument("--to", required=True, help="destination folder/URI (a rerun resumes)")
    p.add_argument("--where", help="filter over result columns, e.g. \"status = 'ok' AND identity_mean >= 0.6\"")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per shard")
    _storage_option_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "compare", help="identity metrics of several outputs, or one sweep's configs, side by side per row"
    )
    p.add_argument("outputs", nargs="+", help="job or score outputs (e.g. a Lynx job and its still baseline)")
    _storage_option_arg(p)
    p.add_argument("--to", help="also write the per-id table: .csv or .parquet (the extension picks)")
    p.add_argument("--limit", type=int, default=20, help="per-id rows to print")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("score", help="score videos made anywhere against their portraits (resumable)")
    p.add_argument("manifest", help="Parquet with id, portrait, video columns")
    p.add_argument("--output", required=True, help="output URI (results under OUT/results/)")
    p.add_argument("--recognizer", choices=["dlib", "insightface"], default="dlib")
    p.add_argument("--pack", help="insightface model pack dir/URI (recognizer=insightface)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    p.add_argument(
        "--workers", type=int, default=2, help="worker processes scoring in parallel (each loads its recognizer)"
    )
    p.add_argument("--retry-failed", action="store_true", help="also rescore rows whose committed status is failed")
    p.add_argument(
        "--rescore-changed",
        action="store_true",
        help="score committed rows again when they were scored with other settings (--frames, --recognizer ...)",
    )
    _storage_option_arg(p)
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
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an unknown flag is reported with the command's own usage and a did-you-mean (argparse reports it
    with the top-level usage, which lists commands instead of the command's flags)."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        from farm.config import did_you_mean

        command = args.command_parser
        flags = [o for action in command._actions for o in action.option_strings]
        hint = did_you_mean(extra[0], flags) if extra[0].startswith("-") else ""
        command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code says how it ended (``EXIT_CODES``)."""
    try:
        try:
            args = _parse(argv)
        except SystemExit as exc:  # --help, --version, a usage error: argparse has printed its text
            _emit("", end="")
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
        secrets.install_log_filter()
        return _run(args)
    except (_StdoutClosed, BrokenPipeError):
        return _stdout_closed()


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except _StdoutClosed:
        raise
    except KeyboardInterrupt:
        _traceback(args.debug)
        print("interrupted: committed rows are kept; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        return _fail(args.debug, EXIT_USAGE, f"error: {exc.code}")
    except Exception as exc:  # noqa: BLE001 - every error ends in one message and a documented exit code
        code, message = _explain(exc, hasattr(args, "storage_option"))
        return _fail(args.debug, code, message)


def _fail(debug: bool, code: int, message: str) -> int:
    _traceback(debug)
    print(secrets.scrub(message), file=sys.stderr)
    return code


def _traceback(debug: bool) -> None:
    if debug:
        print(secrets.scrub(traceback.format_exc()), file=sys.stderr, end="")


def _stdout_closed() -> int:
    """The reader went away: point stdout at devnull so the exit flush is silent (Python docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured in tests)
        pass
    return EXIT_STDOUT_CLOSED


def _explain(exc: Exception, has_storage_flag: bool = True) -> tuple[int, str]:
    """The exit code and the message for ``exc``: the most specific reason found in its chain of causes.
    ``has_storage_flag``: the command takes ``--storage-option`` (the credentials hint names it, else the spec)."""
    found = _missing_credentials(exc, has_storage_flag) or _missing_library(exc) or _known(exc)
    if found:
        return found
    reason = f"{type(exc).__name__}: {exc}"
    return EXIT_INTERNAL, f"error: {reason} (an internal error: rerun with --debug for the traceback and report it)"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes: ``raise ... from``, else what it interrupted (unless ``from None``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__


def _uri_in(exc: BaseException) -> str | None:
    """The first ``proto://...`` named in the messages of ``exc``'s chain (farm's storage errors quote it)."""
    for inner in _chain(exc):
        found = re.search(r"'([a-z][a-z0-9+.-]*://[^']+)'", str(inner))
        if found:
            return found.group(1)
    return None


CREDENTIAL_HINTS = {
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), {s3_keys}, or {s3_anon} "
    "for a public bucket",
    "PartialCredentialsError": "give both the key and the secret (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
    "{s3_both})",
    "DefaultCredentialsError": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run "
    "`gcloud auth application-default login`, or {gs_token}",
}
# Where a command takes its storage options from: the job spec (run, validate), else --storage-option flags.
OPTION_WORDING = {
    "spec": {
        "s3_keys": "give storage_options {s3: {key: ..., secret: ...}} in the job spec",
        "s3_anon": "set storage_options {s3: {anon: true}} in the job spec",
        "s3_both": "storage_options key and secret in the job spec",
        "gs_token": "give storage_options {gs: {token: ...}} in the job spec",
    },
    "flag": {
        "s3_keys": "give --storage-option key=... --storage-option secret=...",
        "s3_anon": "use --storage-option anon=true",
        "s3_both": "--storage-option key=... and --storage-option secret=...",
        "gs_token": "give --storage-option token=...",
    },
}


def _missing_credentials(exc: Exception, has_flag: bool) -> tuple[int, str] | None:
    """No credentials at all is configuration (exit 2): retrying later cannot help, unlike a store that is down.
    ``has_flag``: the command takes ``--storage-option`` (else its storage options come from the job spec)."""
    wording = OPTION_WORDING["flag" if has_flag else "spec"]
    for inner in _chain(exc):
        hint = next((CREDENTIAL_HINTS[c.__name__] for c in type(inner).__mro__ if c.__name__ in CREDENTIAL_HINTS), None)
        if hint:
            where = _uri_in(exc) or "the object store"
            fix = hint.format(**wording)
            return EXIT_USAGE, f"error: no credentials for {where} ({type(inner).__name__}: {inner}): {fix}"
    return None


def _missing_library(exc: Exception) -> tuple[int, str] | None:
    """``gs://`` without gcsfs and the like, where no URI check ran first (a URI inside a manifest)."""
    for inner in _chain(exc):
        hint = _install_hint(inner) if isinstance(inner, ImportError) else None
        if hint:
            return EXIT_USAGE, f"error: {_uri_in(exc) or 'a storage URI'} {hint}"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        fix = f"install the package that provides it (usually pip install {top}) and rerun"
        return EXIT_USAGE, f"error: {exc}: this command needs the {top!r} module, which is not installed here; {fix}"
    return None


def _known(exc: Exception) -> tuple[int, str] | None:
    from farm.cache import CacheError
    from farm.config import SpecError
    from farm.export import ExportError
    from farm.lease import LeaseHeld, LeaseLost
    from farm.manifest import ManifestError
    from farm.records import InfraError
    from farm.runtime.errors import JobAborted
    from farm.table import SchemaDrift

    usage = (UsageError, SpecError, ManifestError, FileNotFoundError, CacheError, ExportError, SchemaDrift)
    known: tuple[tuple[tuple[type[BaseException], ...], int, str], ...] = (
        (usage, EXIT_USAGE, "error: {}"),
        ((JobAborted, LeaseLost), EXIT_ABORTED, "job aborted: {}"),
        # storage stayed unreachable through its retries (timeouts, 5xx, refused credentials)
        ((InfraError,), EXIT_ABORTED, "error: storage: {}; check the endpoint, network and credentials, then rerun"),
        ((LeaseHeld,), EXIT_OUTPUT_BUSY, "error: {}"),
    )
    for types, code, template in known:
        if isinstance(exc, types):
            return code, template.format(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
