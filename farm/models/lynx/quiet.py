"""Messages of the libraries under Lynx that say nothing about the run, kept out of replica logs: import-time
notices of the optional ``torchao`` (its compiled kernels built for other Pythons or GPUs, its Triton probe, torch's
notice about its enums, diffusers' note on torchao-serialized checkpoints; fp8 uses none of them) and the weight
loaders' progress bars (a replica logs its load phases itself). Other messages of those loggers pass."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

IMPORT_NOTICES: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


class DropNotices(logging.Filter):
    """Drops a logger's records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def drop_import_notices() -> None:
    """Install the filters (once per logger; before the first import of diffusers' models or torchao)."""
    for name, fragments in IMPORT_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNotices) for f in logger.filters):
            logger.addFilter(DropNotices(fragments))


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' and diffusers' loading bars off inside the block, as they were after it."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()
