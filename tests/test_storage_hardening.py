"""Storage against hostile or flaky stores and odd images (issue 8, items 3, 4, 7, 8, 10).

Everything is local: moto S3 and scripted servers on 127.0.0.1, generated images. Timeouts and backoff are set small
so that every hang is bounded to seconds.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from farm import storage
from farm.config import SpecError, parse_job
from farm.faults import Fault, RetryPolicy, classify, with_retries
from farm.images import ImageLimits, decode_image
from farm.manifest import RowDefaults, resolve_row
from farm.params import SamplingParams
from farm.records import ErrorCode, InfraError, RowError
from farm.storage import OutputLayout, PortraitPolicy, read_portrait
from tests.fakeservers import Reply, s3_error, scripted_http_server, silent_tcp_server
from tests.helpers import ASTRONAUT

pytestmark = pytest.mark.timeout(60)

FAST = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02)
QUICK_S3 = {"config_kwargs": {"connect_timeout": 0.2, "read_timeout": 0.2}}


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (gray or RGB) written by hand: Pillow cannot write 16-bit RGB."""
    height, width = arr.shape[:2]
    color_type = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}, **QUICK_S3, **extra}


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


# ---------------------------------------------------------------------- 3. fault classification and retries
@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("ExpiredToken", 400, Fault.INFRA),
        ("AccessDenied", 403, Fault.INFRA),
        ("InvalidAccessKeyId", 403, Fault.INFRA),
        ("SlowDown", 503, Fault.INFRA),
        ("TooManyRequests", 429, Fault.INFRA),
        ("InternalError", 500, Fault.INFRA),
        ("NoSuchKey", 404, Fault.MISSING),
        ("InvalidArgument", 400, Fault.OTHER),
    ],
)
def test_classify_store_answers_directly_and_as_s3fs_translates_them(code: str, status: int, expected: Fault) -> None:
    """Guards item 3: s3fs turns ExpiredToken/AccessDenied into PermissionError, which was a row error."""
    from s3fs.errors import translate_boto_error

    raw = _client_error(code, status)
    assert classify(raw) is expected
    translated = translate_boto_error(raw)
    try:
        raise translated from raw
    except Exception as exc:  # noqa: BLE001 - the chained exception as s3fs raises it
        assert classify(exc) is expected


def test_classify_python_and_network_errors() -> None:
    """Guards item 3: the one place that says infra / missing / other for errors without a store answer."""
    import aiohttp
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    assert classify(TimeoutError("t")) is Fault.INFRA
    assert classify(ConnectionResetError("reset")) is Fault.INFRA
    assert classify(ReadTimeoutError(endpoint_url="http://x")) is Fault.INFRA
    assert classify(EndpointConnectionError(endpoint_url="http://x")) is Fault.INFRA
    assert classify(aiohttp.ServerDisconnectedError()) is Fault.INFRA
    info = aiohttp.RequestInfo(aiohttp.client.URL("http://x"), "GET", {}, aiohttp.client.URL("http://x"))
    assert classify(aiohttp.ClientResponseError(info, (), status=503)) is Fault.INFRA
    assert classify(aiohttp.ClientResponseError(info, (), status=403)) is Fault.INFRA
    assert classify(FileNotFoundError("gone")) is Fault.MISSING
    assert classify(PermissionError("remote 403")) is Fault.INFRA
    assert classify(PermissionError("chmod 000"), local=True) is Fault.OTHER
    assert classify(ValueError("bad url")) is Fault.OTHER
    assert classify(RowError(ErrorCode.PORTRAIT_UNREADABLE, "x")) is Fault.OTHER


def test_with_retries_backs_off_then_raises_infra_error_with_the_cause() -> None:
    """Guards item 3: bounded retries with jittered backoff; the last error's message is surfaced."""
    waits: list[float] = []
    calls = {"n": 0}

    def fail() -> None:
        calls["n"] += 1
        raise _client_error("ExpiredToken", 400)

    policy = RetryPolicy(attempts=4, base_delay_s=1.0, max_delay_s=2.0)
    with pytest.raises(InfraError, match="after 4 attempts.*ExpiredToken"):
        with_retries(fail, "reading 's3://b/k'", policy, sleep=waits.append)
    assert calls["n"] == 4 and len(waits) == 3
    assert all(0 <= w <= cap for w, cap in zip(waits, (1.0, 2.0, 2.0), strict=True))
    with pytest.raises(FileNotFoundError):  # not retried
        with_retries(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), "x", policy, sleep=waits.append)
    assert len(waits) == 3


def test_expired_token_from_s3_is_infra_not_a_row_error() -> None:
    """Guards item 3: a store answering 403 / ExpiredToken made the row `portrait_unreadable` (cached, final)."""

    def answer(method: str, path: str, n: int) -> Reply:
        return s3_error("ExpiredToken", 400, "The provided token has expired.") if method == "GET" else Reply(403)

    with scripted_http_server(answer) as server:
        opts = {"s3": _s3_options(server.url)}
        policy = PortraitPolicy(retry=FAST)
        with pytest.raises(InfraError) as info:
            read_portrait("s3://bucket/portraits/a.png", opts, policy)
    assert "s3://bucket/portraits/a.png" in str(info.value) and (
        "403" in str(info.value) or "Expired" in str(info.value)
    )
    assert server.count() >= FAST.attempts  # retried inside storage


def test_http_503_is_retried_inside_storage_and_then_succeeds(astronaut: np.ndarray) -> None:
    """Guards item 3: throttling (503) used to fail the fetch at once; now it is retried with backoff."""
    png = _png(Image.fromarray(astronaut))

    def answer(method: str, path: str, n: int) -> Reply:
        return Reply(503, b"slow down") if n < 2 else Reply(200, png, {"Content-Type": "image/png"})

    with scripted_http_server(answer) as server:
        image = read_portrait(f"{server.url}/a.png", None, PortraitPolicy(retry=FAST))
    assert image.shape == astronaut.shape


def test_http_403_is_infra_and_404_is_a_row_error() -> None:
    """Guards item 3: refused credentials are the infrastructure's; only a missing file is the row's."""

    def answer(method: str, path: str, n: int) -> Reply:
        return Reply(403, b"denied") if path == "/denied.png" else Reply(404, b"")

    with scripted_http_server(answer) as server:
        with pytest.raises(InfraError, match="403"):
            read_portrait(f"{server.url}/denied.png", None, PortraitPolicy(retry=FAST))
        with pytest.raises(RowError) as info:
            read_portrait(f"{server.url}/missing.png", None, PortraitPolicy(retry=FAST))
    assert info.value.code is ErrorCode.PORTRAIT_UNREADABLE
    assert server.count("GET") + server.count("HEAD") >= FAST.attempts + 1


# ---------------------------------------------------------------------- 4. timeouts and write retries
def test_default_timeouts_are_applied_without_clobbering_user_options() -> None:
    """Guards item 4: remote filesystems had no connect/read timeouts (a silent endpoint hung for minutes)."""
    fs, _ = storage.get_fs("s3://bucket/k", {"s3": {"anon": True}})
    assert fs.config_kwargs["connect_timeout"] == storage.CONNECT_TIMEOUT_S
    assert fs.config_kwargs["read_timeout"] == storage.READ_TIMEOUT_S
    fs, _ = storage.get_fs("s3://bucket/k", {"s3": {"anon": True, "config_kwargs": {"read_timeout": 5}}})
    assert fs.config_kwargs["read_timeout"] == 5 and fs.config_kwargs["connect_timeout"] == storage.CONNECT_TIMEOUT_S
    fs, _ = storage.get_fs("https://example.invalid/a.png")
    timeout = fs.client_kwargs["timeout"]
    assert timeout.sock_read == storage.READ_TIMEOUT_S and timeout.connect == storage.CONNECT_TIMEOUT_S
    fs, _ = storage.get_fs("https://example.invalid/b.png", {"https": {"client_kwargs": {"timeout": {"sock_read": 7}}}})
    assert (
        fs.client_kwargs["timeout"].sock_read == 7 and fs.client_kwargs["timeout"].connect == storage.CONNECT_TIMEOUT_S
    )
    fs, _ = storage.get_fs("https://example.invalid/c.png", {"https": {"client_kwargs": {"timeout": 9}}})
    assert fs.client_kwargs["timeout"].sock_read == 9


def test_silent_s3_endpoint_fails_fast_as_infra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards item 4: an endpoint that accepts and never answers froze callers (6 min 53 s, uncaught error)."""
    monkeypatch.setattr("farm.faults.DEFAULT_RETRY", RetryPolicy(2, 0.01, 0.02))
    with silent_tcp_server() as url:
        opts = {"s3": _s3_options(url)}
        start = time.monotonic()
        with pytest.raises(InfraError, match="s3://bucket/a.png"):
            read_portrait("s3://bucket/a.png", opts, PortraitPolicy(retry=RetryPolicy(2, 0.01, 0.02)))
        with pytest.raises(InfraError):
            storage.exists("s3://bucket/b.png", opts)
    assert time.monotonic() - start < 30


def test_silent_http_endpoint_times_out() -> None:
    """Guards item 4: http(s) reads honour the client timeout from the per-protocol options."""
    import aiohttp

    opts = {"http": {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=0.5, sock_read=0.5)}}}
    with silent_tcp_server() as url:
        start = time.monotonic()
        with pytest.raises(InfraError):
            read_portrait(f"{url}/a.png", opts, PortraitPolicy(retry=RetryPolicy(2, 0.01, 0.02)))
    assert time.monotonic() - start < 20


def test_output_writes_retry_transient_faults(s3_endpoint: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards item 4: a throttled write of `_job.json` or a results part aborted the run."""
    import s3fs
    import s3fs.core

    fs = s3fs.S3FileSystem(**s3_endpoint["storage_options"])
    fs.mkdir("writes")
    real = s3fs.S3FileSystem.pipe_file
    failures = {"left": 2}

    def throttled(self: Any, path: str, data: bytes, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise s3fs.errors.translate_boto_error(_client_error("SlowDown", 503))
        return real(self, path, data, **kwargs)

    # a filesystem cached by an earlier test carries its own bound pipe_file: start from a fresh instance
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(s3fs.S3FileSystem, "pipe_file", throttled)
    monkeypatch.setattr("farm.faults.DEFAULT_RETRY", FAST)
    layout = OutputLayout("s3://writes/out", s3_endpoint["storage_options"])
    layout.write_json(layout.job_json, {"ok": True})
    assert failures["left"] == 0 and layout.read_json(layout.job_json) == {"ok": True}


# ---------------------------------------------------------------------- 7. odd images and limits
def test_16bit_gray_png_scales_not_saturates(astronaut: np.ndarray) -> None:
    """Guards item 7: a 16-bit grayscale PNG decoded with mean 226.8 (clipped) instead of the image's own."""
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    decoded = decode_image(_png16(gray.astype(np.uint16) * 257))
    assert decoded.shape == (*gray.shape, 3)
    assert np.abs(decoded[..., 0].astype(int) - gray).max() <= 1


def test_16bit_rgb_png_decodes_to_the_8bit_original(astronaut: np.ndarray) -> None:
    """Guards item 7: 16-bit RGB goes through Pillow's own 16->8 reduction; pinned so a change is noticed."""
    decoded = decode_image(_png16(astronaut.astype(np.uint16) * 257))
    assert np.abs(decoded.astype(int) - astronaut).max() <= 1


def test_float_tiff_scales_not_black(astronaut: np.ndarray) -> None:
    """Guards item 7: a float TIFF with values in [0, 1] decoded black."""
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.float32) / 255.0).save(buf, "TIFF")
    decoded = decode_image(buf.getvalue())
    assert abs(float(decoded.mean()) - float(gray.mean())) < 1
    assert np.abs(decoded[..., 0].astype(int) - gray).max() <= 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own warning at open()
def test_pixel_limit_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards item 7: a 12000x12000 PNG (168 KB) cost 1.8 GB and 17 s; the default limit refuses it from the header."""
    path = tmp_path / "huge.png"
    path.write_bytes(_png(Image.new("L", (12000, 12000))))
    assert path.stat().st_size < 1_000_000

    def no_decoding(self: Any) -> None:
        raise AssertionError("decoded although the header is over the limit")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    start = time.monotonic()
    with pytest.raises(RowError, match="144.0 Mpx.*max_portrait_pixels") as info:
        read_portrait(str(path))
    assert info.value.code is ErrorCode.PORTRAIT_UNREADABLE and time.monotonic() - start < 2


def test_big_allowed_image_is_reduced_while_decoding(astronaut: np.ndarray) -> None:
    """Guards item 7: images larger than needed are reduced right after decoding (JPEG: by the decoder)."""
    big = Image.fromarray(astronaut).resize((2048, 2048))
    limits = ImageLimits(max_side=512)
    assert decode_image(_png(big), limits).shape == (512, 512, 3)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    out = decode_image(buf.getvalue(), limits)
    assert out.shape == (512, 512, 3)
    assert np.abs(out.astype(int) - astronaut).mean() < 12
    gray16 = _png16(np.asarray(big.convert("L")).astype(np.uint16) * 257)
    assert decode_image(gray16, limits).shape == (512, 512, 3)


def test_byte_limit_stops_local_and_remote_reads(tmp_path: Path) -> None:
    """Guards item 7: reads had no size limit; an endless body (like /dev/zero) grew until MemoryError."""
    policy = PortraitPolicy(limits=ImageLimits(max_bytes=1_000_000), retry=FAST)
    sparse = tmp_path / "sparse.png"
    with open(sparse, "wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB of nothing: refused from its size, never read
    with pytest.raises(RowError, match="max_portrait_bytes"):
        read_portrait(str(sparse), None, policy)
    with scripted_http_server(lambda method, path, n: Reply(200, endless=True)) as server:
        start = time.monotonic()
        with pytest.raises(RowError, match="over the limit of 1000000 bytes"):
            read_portrait(f"{server.url}/zero.png", None, policy)
    assert time.monotonic() - start < 15


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
def test_fifo_device_and_directory_are_refused_at_once(tmp_path: Path) -> None:
    """Guards item 7: a FIFO portrait blocked until the row timeout (3600 s x 3); /dev/zero grew without bound."""
    fifo = tmp_path / "portrait.png"
    os.mkfifo(fifo)
    outcome: dict[str, BaseException] = {}

    def read(uri: str) -> None:
        try:
            read_portrait(uri)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            outcome[uri] = exc

    for uri in (str(fifo), "/dev/zero", str(tmp_path)):
        thread = threading.Thread(target=read, args=(uri,), daemon=True)
        thread.start()
        thread.join(5)
        assert not thread.is_alive(), f"reading {uri} blocked"
        assert isinstance(outcome[uri], RowError) and outcome[uri].code is ErrorCode.PORTRAIT_UNREADABLE
    assert "FIFO" in str(outcome[str(fifo)]) and "device" in str(outcome["/dev/zero"])
    assert "directory" in str(outcome[str(tmp_path)])


# ---------------------------------------------------------------------- 8. per-protocol storage_options
def test_storage_options_resolution() -> None:
    """Guards item 8: one set of options was handed to every protocol."""
    s3 = {"key": "k", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    assert storage.bind_storage_options(s3, "s3://b/out", "/m.parquet") == {"s3": s3}
    assert storage.bind_storage_options(s3, "/local/out", "s3://b/m.parquet") == {"s3": s3}
    assert storage.bind_storage_options(s3, "/local/out", "/m.parquet") == s3  # nothing remote: left as it was
    scoped = {"s3": s3, "https": {"headers": {"x": "1"}}}
    assert storage.bind_storage_options(scoped, "s3://b/out") == scoped
    assert storage.options_for("https://h/a.png", {"s3": s3}) == {}
    assert storage.options_for("s3a://b/a.png", {"s3": s3}) == s3
    assert storage.options_for("http://h/a.png", scoped) == {"headers": {"x": "1"}}
    assert storage.options_for("/local/a.png", scoped) == {}
    with pytest.raises(ValueError, match=r"mixes.*\['key'\]"):
        storage.options_for("s3://b/k", {"s3": {}, "key": "k"})


def test_job_spec_binds_flat_options_and_refuses_a_mix() -> None:
    """Guards item 8: the flat form keeps working, for the output's protocol only."""
    base = {"manifest": "/m.parquet", "output": "s3://b/out", "model": {"backend": "still"}}
    job = parse_job({**base, "storage_options": {"key": "k"}})
    assert job.storage_options == {"s3": {"key": "k"}}
    assert parse_job(job.model_dump(mode="json")).storage_options == job.storage_options  # _job.json round trip
    with pytest.raises(SpecError, match="mixes"):
        parse_job({**base, "storage_options": {"s3": {"key": "k"}, "secret": "s"}})


def test_s3_options_do_not_reach_an_https_portrait(
    s3_endpoint: dict[str, Any], s3_bucket: str, astronaut: np.ndarray
) -> None:
    """Guards item 8: with an S3 endpoint_url in storage_options every http(s) portrait failed
    (`ClientSession.__init__() got an unexpected keyword argument`)."""
    png = _png(Image.fromarray(astronaut))
    base = {"manifest": f"{s3_bucket}/m.parquet", "output": f"{s3_bucket}/out", "model": {"backend": "still"}}
    job = parse_job({**base, "storage_options": s3_endpoint["storage_options"]})
    with scripted_http_server(lambda method, path, n: Reply(200, png, {"Content-Type": "image/png"})) as server:
        image = read_portrait(f"{server.url}/portrait.png", job.storage_options, job.portrait_policy())
    assert image.shape == astronaut.shape
    layout = OutputLayout(job.output, job.storage_options)
    layout.write_json(layout.job_json, {"s3": "still works"})
    assert layout.read_json(layout.job_json) == {"s3": "still works"}


# ---------------------------------------------------------------------- 10. allowed portrait roots
def test_allowed_roots_match_after_normalising(tmp_path: Path) -> None:
    """Guards item 10: `pkg://skimage/../../.../etc/passwd` was read; with roots set, escapes are bad_param."""
    roots = ["s3://bucket/portraits/", "pkg://skimage/", str(tmp_path / "ok")]
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "link").symlink_to("/etc")
    for fine in ("s3://bucket/portraits/a.png", "s3a://bucket/portraits/x/../b.png", ASTRONAUT, str(tmp_path / "ok/a")):
        storage.check_allowed_root(fine, roots)
    for bad in (
        "pkg://skimage/../../etc/passwd",
        "s3://bucket/portraits/../secrets/key.png",
        "s3://bucket/portraits-evil/a.png",
        "https://bucket/portraits/a.png",
        str(tmp_path / "ok" / "link" / "passwd"),
        str(tmp_path / "ok" / ".." / "elsewhere.png"),
    ):
        with pytest.raises(RowError, match="runtime.allowed_portrait_roots") as info:
            storage.check_allowed_root(bad, roots)
        assert info.value.code is ErrorCode.BAD_PARAM and repr(bad) in info.value.message
    storage.check_allowed_root("/etc/passwd", [])  # no roots: no check


def test_pkg_uri_cannot_leave_its_package() -> None:
    """Guards item 10: even without roots, pkg:// paths stay inside the package."""
    with pytest.raises(ValueError, match="outside package"):
        storage.resolve_pkg_uri("pkg://skimage/../../../../../../etc/passwd")
    with pytest.raises(RowError) as info:
        read_portrait("pkg://skimage/../../../../../../etc/passwd")
    assert info.value.code is ErrorCode.PORTRAIT_UNREADABLE and "outside package" in info.value.message


def test_resolve_row_and_read_portrait_refuse_portraits_outside_the_roots() -> None:
    """Guards item 10: the check runs at row resolution (shared by `farm validate` and `farm run`) and again on read."""
    defaults = RowDefaults(SamplingParams(), "", 0, allowed_portrait_roots=("s3://bucket/portraits/",))
    row = {"id": "r1", "portrait": "pkg://skimage/data/astronaut.png", "prompt": "a walk"}
    with pytest.raises(RowError) as info:
        resolve_row(row, defaults)
    assert info.value.code is ErrorCode.BAD_PARAM and "pkg://skimage/data/astronaut.png" in info.value.message
    resolve_row({**row, "portrait": "s3://bucket/portraits/a.png"}, defaults)
    job = parse_job(
        {
            "manifest": "/m.parquet",
            "output": "/out",
            "model": {"backend": "still"},
            "runtime": {"allowed_portrait_roots": ["s3://bucket/portraits/"]},
        }
    )
    with pytest.raises(RowError, match="allowed_portrait_roots"):
        read_portrait(ASTRONAUT, None, job.portrait_policy())


def test_farm_validate_applies_the_allowed_portrait_roots(tmp_path) -> None:
    """`farm validate` and `farm run` share the row defaults: a portrait outside the roots is bad_param in both."""
    from farm.validate import validate_job
    from tests.helpers import ASTRONAUT, TOM_HANKS, still_job, write_manifest

    manifest = write_manifest(
        tmp_path / "m.parquet",
        [
            {"id": "inside", "portrait": ASTRONAUT, "prompt": "p"},
            {"id": "outside", "portrait": TOM_HANKS, "prompt": "p"},
            {"id": "escape", "portrait": "pkg://skimage/../../etc/passwd", "prompt": "p"},
        ],
    )
    job = still_job(manifest, str(tmp_path / "out"), runtime={"allowed_portrait_roots": ["pkg://skimage/"]})
    report = validate_job(job)
    assert report.rows == 3 and report.valid == 1
    assert report.reasons == {"bad_param": 2}
    assert any("allowed_portrait_roots" in e for e in report.examples["bad_param"])


def test_farm_status_on_a_silent_endpoint_ends_with_a_message_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards item 4 at the CLI: `farm status s3://...` on a hung endpoint ended in an uncaught ReadTimeoutError."""
    from farm.cli import main

    monkeypatch.setattr("farm.faults.DEFAULT_RETRY", RetryPolicy(2, 0.01, 0.02))
    with silent_tcp_server() as url:
        options = _s3_options(url)
        monkeypatch.setattr("farm.cli._storage_options", lambda pairs: {"s3": options})
        start = time.monotonic()
        code = main(["status", "s3://bucket/out"])
    err = capsys.readouterr().err
    assert code == 3 and err.startswith("error: storage:") and "Traceback" not in err
    assert time.monotonic() - start < 30


def test_classifier_knows_status_attributes_wrapped_resets_and_closed_sessions() -> None:
    """Found by benchmarks/bench_faults.py: these transient faults failed rows permanently (portrait_unreadable)."""
    from farm.faults import Fault, classify

    class HttpError(Exception):  # gcsfs: the status in .code
        def __init__(self, message: str, code: int) -> None:
            super().__init__(message)
            self.code = code

    class HttpResponseError(Exception):  # azure-core: the status in .status_code
        def __init__(self, message: str, status_code: int) -> None:
            super().__init__(message)
            self.status_code = status_code

    class ProtocolError(Exception):  # urllib3: the reset travels in the arguments
        pass

    assert classify(HttpError("unavailable", 503)) is Fault.INFRA
    assert classify(HttpError("no such object", 404)) is Fault.MISSING
    assert classify(HttpResponseError("busy", 503)) is Fault.INFRA
    assert classify(ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))) is Fault.INFRA
    assert classify(RuntimeError("Session is closed")) is Fault.INFRA
    assert classify(OSError("Couldn't deserialize thrift")) is Fault.OTHER  # a parser's error: damage, not a fault


def test_manifest_reads_survive_transient_storage_faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by benchmarks/bench_faults.py: one storage fault while listing or reading the manifest aborted the run."""
    import fsspec.implementations.local as local

    from farm.manifest import Manifest
    from tests.helpers import rows, write_manifest

    monkeypatch.setattr("farm.faults.DEFAULT_RETRY", RetryPolicy(3, 0.01, 0.02))
    monkeypatch.setattr("farm.manifest.DEFAULT_RETRY", RetryPolicy(3, 0.01, 0.02))
    path = write_manifest(tmp_path / "m.parquet", rows(50))
    real_open, real_info = local.LocalFileSystem._open, local.LocalFileSystem.info
    faults = {"open": 1, "info": 1}

    def flaky(name: str, real: Any) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if faults[name]:
                faults[name] -= 1
                raise ConnectionResetError(104, "connection reset by peer")
            return real(self, *args, **kwargs)

        return call

    monkeypatch.setattr(local.LocalFileSystem, "_open", flaky("open", real_open))
    monkeypatch.setattr(local.LocalFileSystem, "info", flaky("info", real_info))
    # fsspec's exists/isdir/isfile answer False on any error: a fault there must not read as "no such manifest"
    for name in ("exists", "isdir", "isfile"):
        monkeypatch.setattr(local.LocalFileSystem, name, lambda *a, **k: False)
    ids = [r["id"] for r in Manifest(path).rows()]
    assert ids == [f"row-{i:03d}" for i in range(50)] and faults == {"open": 0, "info": 0}


def test_a_store_error_while_an_earlier_one_is_handled_is_judged_on_its_own(
    s3_bucket: str, s3_endpoint: dict[str, Any]
) -> None:
    """Found by a hostile-storage run: after a 403 stopped a run, its clean-up listed a prefix that did not exist yet;
    Python chained the 403 being handled to that listing's "not found", which was then taken for a 403 (retried,
    then an InfraError) instead of an empty listing."""
    from botocore.exceptions import ClientError

    from farm import storage

    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
    try:
        try:
            raise denied
        except ClientError as exc:
            raise PermissionError("Access Denied") from exc
    except PermissionError:
        options = s3_endpoint["storage_options"]
        assert storage.list_files(f"{s3_bucket}/nothing-here", ".parquet", options) == []
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(f"{s3_bucket}/nothing-here/x.json", options)
        assert classify(FileNotFoundError("x"), outer=None) is Fault.MISSING


def test_a_write_into_a_bucket_that_is_gone_names_it(s3_endpoint: dict[str, Any]) -> None:
    """Found by a hostile-storage run: the output bucket deleted mid-run made every write a bare FileNotFoundError
    (a row error on the replicas, exit 2 from the driver). A PUT cannot miss its key: the bucket is gone."""
    from farm.storage import write_bytes_atomic

    with pytest.raises(InfraError, match=r"s3://gone-bucket/out/x\.json.*its bucket does not exist.*Create it"):
        write_bytes_atomic("s3://gone-bucket/out/x.json", b"{}", s3_endpoint["storage_options"])


def test_missing_and_empty_portraits_say_so(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(RowError, match="is empty \\(0 bytes\\)"):
        read_portrait(str(empty))
    with pytest.raises(RowError, match="does not exist"):
        read_portrait(str(tmp_path / "missing.png"))


def test_local_portraits_are_anchored_as_validate_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, astronaut: np.ndarray
) -> None:
    """Found by a crash-and-resume probe: ``~/a.png`` passed ``farm validate`` but ``farm run`` sent the replicas
    ``<cwd>/~/a.png``; ``file://relative`` was left relative to each replica's working directory."""
    from farm.storage import anchored

    home, work = tmp_path / "home", tmp_path / "work"
    (work / "faces").mkdir(parents=True)
    home.mkdir()
    Image.fromarray(astronaut).save(home / "a.png")
    Image.fromarray(astronaut).save(work / "faces" / "b.png")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cases = {
        "~/a.png": str(home / "a.png"),
        "faces/b.png": str(work / "faces" / "b.png"),
        "file://faces/b.png": f"file://{work}/faces/b.png",
        "file://~/a.png": f"file://{home}/a.png",
    }
    for given, expected in cases.items():
        assert anchored(given) == expected
        np.testing.assert_array_equal(read_portrait(anchored(given)), astronaut)
    for remote in ("s3://b/k.png", "https://h/x.png", "pkg://skimage/data/astronaut.png", "/abs/x.png"):
        assert anchored(remote) == remote
