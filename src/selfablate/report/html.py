"""A self-contained report.html: the table and every figure inlined (base64), so it opens
offline and can be mailed as one file. A small inline script counts the images that decoded and
writes the count into the page (`data-images-loaded`), which the tests read back from Chromium."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok + '/' + imgs.length;
  document.body.dataset.tableRows = document.querySelectorAll('table tbody tr').length;
  document.getElementById('status').textContent = ok + ' of ' + imgs.length + ' figures loaded';
});
</script>"""


def markdown_table_to_html(md: str) -> str:
    """The pipe table of table.md as an HTML table (other lines become paragraphs)."""
    rows = [line for line in md.splitlines() if line.startswith("|") and not set(line) <= set("|-")]
    cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
    notes = "".join(f"<p>{html.escape(line)}</p>" for line in md.splitlines() if line and not line.startswith("|"))
    return f"{notes}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: Path, title: str, table_md: str, figures: list[tuple[str, Path]]) -> Path:
    figs = []
    for caption, png in figures:
        data = base64.b64encode(png.read_bytes()).decode()
        figs.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style>
</head><body><h1>{html.escape(title)}</h1><p id="status"></p>
{markdown_table_to_html(table_md)}
{''.join(figs)}
{CHECK}
</body></html>
"""
    path.write_text(page)
    return path
