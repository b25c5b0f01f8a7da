"""The one error an export raises for what its caller asked (a bad filter, format, shard size or destination)."""

from __future__ import annotations


class ExportError(ValueError):
    """A request the export cannot do as asked; the message names the value and the fix. A ``ValueError``, so
    callers that catch that keep working; the CLI reports it as a usage error."""
