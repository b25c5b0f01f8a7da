"""Remote keys and archive members are hostile input: nothing lands outside its folder, clashes are refused."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest

from farm.cache import MANIFEST, UnsafeNameError, fetch_file, fetch_folder, safe_relpath
from farm.identity.insightface_pack import local_pack_dir


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$FARM_CACHE`` four folders down, so that ``../../../../x`` from a cached folder still lands in tmp_path."""
    cache = tmp_path / "a" / "b" / "c" / "cache"
    monkeypatch.setenv("FARM_CACHE", str(cache))
    return cache


def _put(s3_endpoint: dict[str, Any], bucket: str, objects: dict[str, bytes]) -> None:
    """Objects with keys exactly as given (``..`` included): botocore sends the key verbatim."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint["endpoint_url"], region_name="us-east-1")
    for key, body in objects.items():
        client.put_object(Bucket=bucket.removeprefix("s3://"), Key=key, Body=body)


def _written_outside(root: Path, cache: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_relative_to(cache)]


def test_dotdot_key_in_a_weights_bucket_is_refused(
    tmp_path: Path, cache_dir: Path, s3_bucket: str, s3_endpoint
) -> None:
    _put(s3_endpoint, s3_bucket, {"weights/a.bin": b"a" * 4, "weights/../../../../escaped.txt": b"pwned"})
    with pytest.raises(UnsafeNameError) as err:
        fetch_folder(f"{s3_bucket}/weights", "weights", s3_endpoint["storage_options"])
    message = str(err.value)
    assert "'../../../../escaped.txt'" in message and "outside the folder" in message
    assert str(cache_dir / "weights") in message  # names the local folder too
    assert _written_outside(tmp_path, cache_dir) == []


def test_keys_are_normalised_and_clashes_refused(cache_dir: Path, s3_bucket: str, s3_endpoint) -> None:
    options = s3_endpoint["storage_options"]
    _put(s3_endpoint, s3_bucket, {"ok/x/./y.bin": b"y", "ok//z.bin": b"zz", "ok/sub/../w.bin": b"w"})
    local = fetch_folder(f"{s3_bucket}/ok", "weights", options)
    assert {p.relative_to(local).as_posix() for p in local.rglob("*.bin")} == {"x/y.bin", "z.bin", "w.bin"}
    assert (local / "z.bin").read_bytes() == b"zz"  # read from the real key, not the normalised name

    _put(s3_endpoint, s3_bucket, {"clash/a.bin": b"1", "clash/sub/../a.bin": b"2"})
    with pytest.raises(UnsafeNameError, match=r"'a.bin' and 'sub/../a.bin' .* both become 'a.bin'"):
        fetch_folder(f"{s3_bucket}/clash", "weights", options)
    _put(s3_endpoint, s3_bucket, {"nest/a": b"1", "nest/a/b": b"2"})
    with pytest.raises(UnsafeNameError, match="'a' in .* is a file but 'a/b' needs it as a folder"):
        fetch_folder(f"{s3_bucket}/nest", "weights", options)
    _put(s3_endpoint, s3_bucket, {f"own/{MANIFEST}": b"{}", "own/a.bin": b"a"})
    with pytest.raises(UnsafeNameError, match="cache's own"):
        fetch_folder(f"{s3_bucket}/own", "weights", options)


def test_a_hostile_key_is_not_hidden_by_a_cached_copy(tmp_path: Path, cache_dir: Path, s3_bucket: str, s3_endpoint):
    options = s3_endpoint["storage_options"]
    _put(s3_endpoint, s3_bucket, {"w/a.bin": b"a"})
    assert (fetch_folder(f"{s3_bucket}/w", "weights", options) / "a.bin").read_bytes() == b"a"
    _put(s3_endpoint, s3_bucket, {"w/../../../../../late.txt": b"x"})
    with pytest.raises(UnsafeNameError, match="late.txt"):  # not mistaken for "unreachable, use the copy"
        fetch_folder(f"{s3_bucket}/w", "weights", options)
    assert _written_outside(tmp_path, cache_dir) == []


def test_single_file_names_are_checked(cache_dir: Path) -> None:
    import fsspec

    fsspec.filesystem("memory").pipe("/single/model.bin", b"m")
    assert fetch_file("memory://single/model.bin", "weights").read_bytes() == b"m"
    for bad in ("..", "/etc/passwd", "a/../../b", ".", "x\x00y"):
        with pytest.raises(UnsafeNameError):
            safe_relpath(bad, "test://", cache_dir)
    assert safe_relpath("a//./b/../c.onnx", "test://", cache_dir) == "a/c.onnx"


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps the name verbatim (writestr(str) would too)
        for name, link_target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, link_target)
    return str(path)


@pytest.mark.parametrize(
    ("members", "symlinks", "expected"),
    [
        ({"pack/det.onnx": b"d", "../../../../evil.onnx": b"e"}, None, "outside the folder"),
        ({"pack/det.onnx": b"d", "/tmp/evil.onnx": b"e"}, None, "absolute path"),
        ({"pack/det.onnx": b"d", "pack/x/../det.onnx": b"e"}, None, "both become 'pack/det.onnx'"),
        ({"pack/det.onnx": b"d"}, {"pack/link.onnx": "/etc/passwd"}, "is a symlink"),
        ({"pack/det.onnx": b"d", f"{MANIFEST}": b"{}"}, None, "cache's own"),
    ],
    ids=["dotdot", "absolute", "clash", "symlink", "reserved"],
)
def test_hostile_zip_pack_is_refused_whole(
    tmp_path: Path, cache_dir: Path, members: dict[str, bytes], symlinks: dict[str, str] | None, expected: str
) -> None:
    archive = _zip(tmp_path / "pack.zip", members, symlinks)
    with pytest.raises(UnsafeNameError, match=expected) as err:
        local_pack_dir(archive)
    assert archive in str(err.value)
    assert _written_outside(tmp_path, cache_dir) == [tmp_path / "pack.zip"]
    assert not [p for p in cache_dir.rglob("*") if p.is_file() and p.suffix != ".lock"]  # nothing half-unpacked


def test_clean_zip_pack_still_unpacks(tmp_path: Path, cache_dir: Path) -> None:
    archive = _zip(tmp_path / "pack.zip", {"pack/": b"", "pack/det.onnx": b"d", "pack.zip": b"not the archive"})
    folder = local_pack_dir(archive)
    assert folder.name == "pack" and (folder / "det.onnx").read_bytes() == b"d"
    assert (folder.parent / "pack.zip").read_bytes() == b"not the archive"  # a member named like the download
