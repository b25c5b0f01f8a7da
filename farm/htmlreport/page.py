"""The page around the sections: inline CSS, a navigation bar, and one small inline script.

The script only counts the images the browser decoded (``body[data-images-loaded]`` / ``data-images-total``) once
the page has loaded, so a headless browser can check the thumbnails; the page works the same without it.
"""

from __future__ import annotations

from html import escape

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 48px;color:#222;background:#fff}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 0;z-index:1}
nav a{margin-right:14px;color:#245;text-decoration:none}
h1{font-size:20px;margin:12px 0 4px}h2{font-size:17px;margin:28px 0 8px}h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;display:block;overflow-x:auto;max-width:100%}
td:first-child{min-width:12em}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.note{color:#555}.warn{color:#a40;font-size:12px}
.cards{display:block}
.card{display:inline-block;vertical-align:top;margin:0 8px 8px 0;border:1px solid #ddd;border-radius:4px;padding:6px;
min-width:300px;max-width:calc(100% - 24px)}
.pics{display:flex;gap:4px;align-items:flex-start}.strip{display:flex;gap:2px;align-items:flex-start}
img.frame,img.portrait{display:block;flex:none;width:auto;height:auto;max-width:144px;max-height:96px}
.card figcaption{width:0;min-width:100%;font-size:12px;margin-top:4px}.prompt{color:#444;overflow-wrap:anywhere}
.ph{display:inline-block;width:96px;height:64px;background:repeating-linear-gradient(45deg,#eee,#eee 6px,#ddd 6px,
#ddd 12px);color:#777;font-size:11px;text-align:center;line-height:64px}
details.sheet{margin:8px 0}details.sheet>summary{cursor:pointer;font-weight:600}
figure.plot{margin:8px 0}figure.plot figcaption{font-weight:600}
svg text{font:11px system-ui,sans-serif;fill:#333}
svg .box{fill:#cfe0f3;stroke:#3a6ea5}svg .wh,svg .ax{stroke:#777}svg .med{stroke:#123;stroke-width:2}
svg .mean{fill:#c33}
"""

SCRIPT = """
addEventListener("load", function () {
  var all = Array.prototype.slice.call(document.images);
  var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.dataset.imagesTotal = String(all.length);
  document.body.dataset.imagesLoaded = String(ok.length);
});
"""


def page(title: str, intro: str, nav: list[tuple[str, str]], sections: list[str]) -> str:
    """The whole document: ``title`` is escaped here; ``intro`` and ``sections`` are HTML already escaped."""
    links = "".join(f'<a href="#{anchor}">{escape(label)}</a>' for anchor, label in nav)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><nav>{links}</nav></header>{intro}{''.join(sections)}"
        f"<script>{SCRIPT}</script></body></html>\n"
    )
