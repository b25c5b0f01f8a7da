"""The node cache: fetched once, refetched when the remote changes, used when the remote is gone."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import fsspec
import pytest

from farm.cache import MANIFEST, CacheError, fetch_folder, verify_checksums


@pytest.fixture()
def remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/w-{tmp_path.name}"
    fs.pipe({f"{root}/a.bin": b"a" * 10, f"{root}/sub/b.bin": b"b" * 3})
    return f"memory://{root}"


def test_fetch_once_refetch_on_change_and_offline_copy(remote: str) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch_folder(remote, "test"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    local = results[0]
    assert len(set(results)) == 1 and (local / "sub" / "b.bin").read_bytes() == b"bbb"
    recorded = json.loads((local / MANIFEST).read_text())["files"]
    assert set(recorded) == {"a.bin", "sub/b.bin"}
    verify_checksums(local)
    fs = fsspec.filesystem("memory")
    path = remote.removeprefix("memory://")
    fs.pipe(f"{path}/a.bin", b"new")  # the remote changed: fetched again
    assert (fetch_folder(remote, "test") / "a.bin").read_bytes() == b"new"
    fs.rm(path, recursive=True)  # the remote is gone: the verified copy serves
    assert (fetch_folder(remote, "test") / "a.bin").read_bytes() == b"new"
    (local / "a.bin").write_bytes(b"tampered")  # a size that no longer matches the manifest: not trusted
    with pytest.raises(FileNotFoundError, match="no verified copy"):
        fetch_folder(remote, "test")


def test_checksum_mismatch_is_named(remote: str) -> None:
    local = fetch_folder(remote, "test")
    (local / "a.bin").write_bytes(b"x" * 10)
    with pytest.raises(CacheError, match="a.bin: sha256 differs"):
        verify_checksums(local)
