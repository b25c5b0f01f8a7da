"""Lynx Farm: Parquet manifests of (portrait, prompt) rows -> personalized videos + identity scores.

Python API (README "Reading results"): ``farm.open_results(uri)`` returns an output's results as a pyarrow Table,
one row per id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

__version__ = "0.1.0"


def open_results(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """An output's results, one row per id (the newest record of each), as a ``pyarrow.Table``.

    ``uri`` is the job's output (local path or fsspec URI such as ``s3://bucket/out``); ``storage_options`` are
    fsspec options (flat, or per protocol). Use ``.to_pandas()`` / ``polars.from_arrow(...)`` for a DataFrame.
    """
    from farm.table import open_results as _open_results

    return _open_results(uri, storage_options)


__all__ = ["__version__", "open_results"]
