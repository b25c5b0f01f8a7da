"""Replica logs stay readable: the optional torchao's import-time notices and the weight loaders' progress bars are
kept out, other messages of the same loggers are not."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from farm.models.lynx.quiet import IMPORT_NOTICES, drop_import_notices, no_progress_bars

pytest.importorskip("torchao")  # the notices come from importing it (through diffusers' quantizers)


@pytest.mark.slow  # two fresh interpreters importing diffusers: ~20 s on 2 cores
def test_importing_diffusers_models_after_lynx_prints_no_torchao_notices() -> None:
    code = "import farm.models.lynx\nfrom diffusers import WanTransformer3DModel\nprint('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "imported" in done.stdout
    for fragments in IMPORT_NOTICES.values():
        for fragment in fragments:
            assert fragment not in done.stderr, done.stderr
    # without the filters, the same import does print them (so the test above shows something)
    bare = subprocess.run(
        [sys.executable, "-c", "from diffusers import WanTransformer3DModel"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert any(f in bare.stderr for fragments in IMPORT_NOTICES.values() for f in fragments), bare.stderr


def test_other_messages_of_those_loggers_pass(caplog: pytest.LogCaptureFixture) -> None:
    drop_import_notices()
    drop_import_notices()  # idempotent: one filter per logger
    logger = logging.getLogger("torchao")
    assert sum(type(f).__name__ == "DropNotices" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logger.warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logger.warning("float8 scaled_mm is not supported on this device")
    assert [r.getMessage() for r in caplog.records] == ["float8 scaled_mm is not supported on this device"]


def test_progress_bars_are_off_inside_and_as_before_after() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [lib.is_progress_bar_enabled() for lib in libraries]
    with no_progress_bars():
        assert not any(lib.is_progress_bar_enabled() for lib in libraries)
    assert [lib.is_progress_bar_enabled() for lib in libraries] == before
