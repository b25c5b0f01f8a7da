"""farm.htmlreport: one self-contained HTML file, checked as text and in a real headless Chromium (network off)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from farm import storage
from farm.htmlreport import ThumbSpec, write_report
from farm.records import COLUMN_NAMES, Record
from farm.results import ResultWriter, result_schema
from farm.storage import OutputLayout
from farm.video import encode_mp4

ASTRONAUT = "pkg://skimage/data/astronaut.png"
INJECTED = "<script>alert(1)</script> a person waves"
EXTRA_TYPES = {"config_id": pa.string(), "motion_mean": pa.float64(), "motion_static": pa.bool_()}
SECTIONS = ("summary", "distributions", "sheets", "best", "worst", "static", "failures")


def _video(seed: int) -> bytes:
    """8 frames of 32x48 whose colour changes over time (so frames differ and thumbnails are not blank)."""
    ramp = np.linspace(0, 255, 8, dtype=np.float64)[:, None, None, None]
    base = np.random.default_rng(seed).integers(0, 255, size=(1, 32, 48, 3)).astype(np.float64)
    return encode_mp4(((base + ramp) % 256).astype(np.uint8), fps=8, preset="ultrafast")


def _record(values: dict[str, Any]) -> Record:
    """A record with ``values`` as Record columns, or carried where the Record has no such column (yet)."""
    rec = Record()
    rec.set(**{k: v for k, v in values.items() if k in COLUMN_NAMES})
    rec.carried.update({k: v for k, v in values.items() if k not in COLUMN_NAMES})
    return rec


def _row(i: int, layout: OutputLayout) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"r{i:02d}",
        "status": "ok",
        "video": layout.video(f"r{i:02d}"),
        "portrait": ASTRONAUT,
        "prompt": INJECTED if i == 1 else f"a person, take {i}",
        "model": "still",
        "config_id": "g5.0-ip1.0-s42" if i % 2 else "g7.0-ip0.5-s42",
        "identity_mean": 0.5 + i / 40,
        "face_rate": 1.0,
        "generate_s": 1.0 + i / 10,
        "motion_mean": 0.1 * i,
        "motion_static": i < 4,
    }
    if i == 3:
        row.update(status="failed", error_code="no_face", error_message="no face in <b>portrait</b>", video=None)
    if i == 8:
        row.update(status="failed", error_code="generation_error", error_message="CUDA out of memory", video=None)
    if i == 10:
        row.update(status="skipped", error_code="rights_not_confirmed", video=None)
    if i == 6:
        row.update(identity_mean=None, portrait="pkg://skimage/data/no_such_portrait.png")
    return row


def build_output(root: Path, count: int = 12, extra: tuple[str, ...] = tuple(EXTRA_TYPES)) -> str:
    """An output of ``count`` rows over 2 configs: 2 failed, 1 skipped, r11's video missing, r06's portrait missing."""
    layout = OutputLayout(str(root))
    carried = pa.schema([(k, EXTRA_TYPES[k]) for k in extra if k not in COLUMN_NAMES])
    writer = ResultWriter(layout, result_schema(carried), run_seq=1, every_rows=1000)
    for i in range(count):
        row = {k: v for k, v in _row(i, layout).items() if (k in COLUMN_NAMES and k not in EXTRA_TYPES) or k in extra}
        if row["video"] and i != 11:
            storage.write_bytes_atomic(row["video"], _video(i))
        writer.add(_record(row))
    writer.flush()
    return layout.root


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("report")
    output = build_output(root / "out")
    target = root / "report.html"
    return target, write_report(output, str(target), thumbs=200, max_rows_per_section=4)


def test_report_is_self_contained(report: tuple[Path, dict[str, Any]]) -> None:
    html = report[0].read_text()
    assert "http://" not in html and "https://" not in html
    for attr in re.findall(r"""\b(?:src|href|srcset|action|poster|data)\s*=\s*["']?([^"'\s>]*)""", html):
        assert attr.startswith(("data:image/jpeg;base64,", "#")), attr
    assert not re.search(r"<(link|iframe|object|embed|base)\b", html, re.I)
    assert "url(" not in html and "@import" not in html
    assert len(re.findall(r"<script\b", html)) == 1  # the page's own image counter
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;portrait&lt;/b&gt;" in html


def test_report_sections_and_notes(report: tuple[Path, dict[str, Any]]) -> None:
    path, info = report
    html = path.read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in html
    assert info["records"] == 12 and info["groups"] == 2
    assert info["videos_shown"] == 9  # every ok row with a video recorded (r11's file is missing)
    assert info["videos_unreadable"] == 1 and info["portraits_unreadable"] == 1
    assert info["left_out_by_size_cap"] == 0 and info["bytes"] == len(path.read_bytes())
    assert "video unreadable" in html and "portrait unreadable" in html
    assert "no_face" in html and "generation_error" in html and "rights_not_confirmed" in html
    assert "g5.0-ip1.0-s42" in html and "<svg " in html
    assert "Contact sheets show 9 of 9 ok videos, sampled evenly over 2 config(s)" in html
    assert "3 of 3 videos flagged motion_static shown" in html


def test_report_without_sweep_or_motion_columns(tmp_path: Path) -> None:
    output = build_output(tmp_path / "out", count=3, extra=())
    info = write_report(output, str(tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text()
    assert info["groups"] == 1 and "(by model)" in html
    assert "no motion_static values" in html and "section skipped" in html


def test_size_cap_leaves_pictures_out_with_a_note(tmp_path: Path) -> None:
    output = build_output(tmp_path / "out", count=6)
    info = write_report(output, str(tmp_path / "r.html"), spec=ThumbSpec(max_bytes=1, workers=2))
    html = (tmp_path / "r.html").read_text()
    assert info["left_out_by_size_cap"] == info["videos_shown"] - 1  # the first row spends the whole budget
    assert "the report reached its size cap" in html


def _chromium_run(*args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with every host name unresolvable: a page that needs the network shows it."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); the browser checks need it")
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND"]
    flags += ["--virtual-time-budget=10000", "--no-first-run", "--disable-extensions"]
    done = subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _chromium(*args: str) -> str:
    return _chromium_run(*args).stdout


def _console_messages(uri: str) -> list[str]:
    """What the page wrote to the browser console while loading (uncaught errors included), from Chromium's log:
    lines like ``[...:INFO:CONSOLE:1] "Uncaught ReferenceError: ...", source: file:///...report.html (1)``."""
    log = _chromium_run("--enable-logging=stderr", "--v=0", "--dump-dom", uri).stderr
    return [line for line in log.splitlines() if re.search(r":CONSOLE\b", line)]  # the only page loaded is ``uri``


def test_report_in_headless_chromium(report: tuple[Path, dict[str, Any]]) -> None:
    path, _ = report
    dom = _chromium("--dump-dom", path.resolve().as_uri())
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, "the page's load script did not run"
    assert int(loaded.group(1)) == int(total.group(1)) > 8 * 4  # portraits and 4 frames per readable video
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in dom
    assert len(re.findall(r"<script\b", dom)) == 1  # the injected prompt stayed text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a person waves" in dom


def test_report_loads_without_console_errors(report: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    # The check must see an error where there is one, or a change in Chromium's log format would pass silently.
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    caught = _console_messages(broken.resolve().as_uri())
    assert any("Uncaught" in line and "undefinedFunction" in line for line in caught), caught
    assert _console_messages(report[0].resolve().as_uri()) == []


def test_report_screenshot_is_not_blank(report: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2400", report[0].resolve().as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, plots and thumbnails, not one colour


def test_report_and_summary_import_neither_ray_nor_torch() -> None:
    code = "import sys, farm.htmlreport, farm.summary; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    )
    assert not loaded & {"ray", "torch"}


def test_contact_sheet_sample_is_stratified_capped_and_deterministic() -> None:
    from farm.htmlreport.picks import stratified

    sizes = {"a": 100, "b": 5, "c": 50}
    rows = [
        {"id": f"{c}{i:03d}", "status": "ok", "video": "v.mp4", "config_id": c}
        for c, n in sizes.items()
        for i in range(n)
    ]
    rows.append({"id": "x", "status": "failed", "video": None, "config_id": "a"})
    picked = stratified(rows, ["config_id"], 30, seed=0)
    assert {label: len(r) for label, r in picked.items()} == {"a": 13, "b": 5, "c": 12}
    assert all(r["status"] == "ok" for group in picked.values() for r in group)
    assert picked == stratified(rows, ["config_id"], 30, seed=0)
    assert [r["id"] for r in picked["a"]] == sorted(r["id"] for r in picked["a"])
