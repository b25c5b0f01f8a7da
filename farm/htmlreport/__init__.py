"""The visual report of an output (``farm report OUT --to report.html``): one self-contained HTML file.

No external URL anywhere: inline CSS, thumbnails as ``data:image/jpeg`` URIs, charts as inline SVG drawn here, one
small inline script. Sections: per-config summary (``farm.summary``), metric distributions, contact sheets of a
sample stratified by config, best and worst by ``identity_mean``, near-static videos, failures by error code.
Modules: ``picks`` (which rows), ``thumbs`` (pictures), ``svg`` (box plots), ``sections`` and ``page`` (HTML),
``build`` (``write_report``).
"""

from __future__ import annotations

from farm.htmlreport.build import write_report
from farm.htmlreport.thumbs import ThumbSpec

__all__ = ["ThumbSpec", "write_report"]
