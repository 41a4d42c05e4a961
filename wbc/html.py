"""Self-contained HTML pages: images embedded as data URIs, inline CSS, no network, printable.

Every page carries a small script that, once the page has loaded, writes into the DOM whether
every image decoded and whether any script or resource error happened (`data-wbc-status` on
<html>): a headless browser's `--dump-dom` then shows the page's own verdict (tests use it).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from wbc.fsutil import atomic_write

CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:1.5em auto;max-width:1200px;
padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#f3f3f3}.best{font-weight:bold}.second{text-decoration:underline}
img.fig{max-width:100%;height:auto;display:block;margin:.5em 0}
.gallery{display:flex;flex-wrap:wrap;gap:8px;margin:.4em 0 1em}
.cell{width:236px;border:1px solid #ddd;border-radius:4px;padding:4px;font-size:.78em;break-inside:avoid}
.cell.wrong{border-color:#c62828;background:#fff5f5}.cell.flag{border-color:#ef6c00;background:#fff8e1}
.cell img{width:112px;height:112px;object-fit:cover}
.cell .path{color:#666;word-break:break-all}
.bar{display:flex;align-items:center;gap:4px}.bar span.b{display:inline-block;height:8px;background:#4292c6}
.bar span.n{width:3.2em}
nav a{margin-right:1em}
@media print{nav{display:none}.cell{width:30%}}
"""

# Runs after load: count images that failed to decode and errors (script errors and failed
# resources, caught in the capture phase), then publish the verdict on <html data-wbc-status>.
STATUS_JS = """
<script>
(function(){
  var errors=[];
  window.addEventListener('error',function(e){errors.push(e.message||('resource '+(e.target&&(e.target.src||e.target.href))));},true);
  var ce=console.error;console.error=function(){errors.push([].join.call(arguments,' '));ce.apply(console,arguments);};
  window.addEventListener('load',function(){
    var imgs=document.images,bad=0;
    for(var i=0;i<imgs.length;i++){if(!imgs[i].complete||imgs[i].naturalWidth===0){bad++;}}
    var s=(bad||errors.length)?('error images='+imgs.length+' broken='+bad+' errors='+errors.join(' | '))
                              :('ok images='+imgs.length);
    document.documentElement.setAttribute('data-wbc-status',s);
  });
})();
</script>
"""


def esc(text) -> str:
    return html.escape(str(text))


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def jpeg_uri(image: np.ndarray, size: int | None = 112, quality: int = 85) -> str:
    """(H, W, 3) uint8 -> a JPEG data URI, resized so its longer side is `size` (None = as is)."""
    from PIL import Image

    im = Image.fromarray(np.asarray(image, np.uint8))
    if size:
        im.thumbnail((size, size), Image.Resampling.BOX)  # area average: a clean 3x reduction, 1.6x faster than bilinear
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure(fig, alt: str, dpi: int = 100) -> str:
    """A figure as an embedded <img>: SVG text (`wbc.svg`), PNG bytes, or a matplotlib Figure."""
    if isinstance(fig, str):
        from wbc.svg import data_uri

        src = data_uri(fig)
    elif isinstance(fig, bytes):
        src = png_uri(fig)
    else:
        from wbc.figures import png_bytes

        src = png_uri(png_bytes(fig, dpi))
    return f'<img class="fig" alt="{esc(alt)}" src="{src}">'


def table(head: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless raw (callers that pass markup escape it themselves)."""
    cell = (lambda c: str(c)) if raw else esc
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


def prob_bars(pairs: list[tuple[str, float]]) -> str:
    """Horizontal bars of the top classes' probabilities: [(class, p)]."""
    return "".join(f'<div class="bar"><span class="n">{esc(c)}</span><span class="b" style="width:{100 * p:.0f}px">'
                   f"</span>{100 * p:.0f}%</div>" for c, p in pairs)


def page(title: str, body: list[str], subtitle: str = "") -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style>{STATUS_JS}</head><body>"
            f"<h1>{esc(title)}</h1>" + (f'<p class="meta">{subtitle}</p>' if subtitle else "")
            + "\n".join(body) + "</body></html>\n")


def write_page(path: Path, text: str) -> Path:
    """Write then rename: a half-written report never sits under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(text)
    return path
