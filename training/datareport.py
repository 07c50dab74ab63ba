"""``fieldid data check --report FILE.html``: one self-contained page to look at the findings.

Everything is inline — thumbnails as base64 JPEG ``data:`` URIs, CSS in a ``<style>`` block,
the class-count chart as inline SVG — so the file opens offline, from an e-mail or a shared
drive, with no CDN and no script. Torch-free (Pillow only).

Each finding type is a ``<section id=... data-count=N>``: a grid of thumbnail cards (file,
given label, suggested label, score) or, for pairs, both photos side by side. At most
:data:`MAX_CARDS` cards per section; the JSON report carries every finding.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .images import ImageError, load_rgb
from .quality import QUALITY_KINDS
from .records import atomic_write_text

if TYPE_CHECKING:
    from .datacheck import DataReport

__all__ = ["MAX_CARDS", "render_html", "write_html_report"]

MAX_CARDS = 60
THUMB_SIDE = 128
_SPLIT_COLOURS = {"train": "#4C78A8", "val": "#F58518", "test": "#54A24B", "all": "#4C78A8"}

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#666} .count{display:inline-block;min-width:1.6em;padding:0 6px;border-radius:10px;background:#eee;
text-align:center;font-size:13px;margin-left:6px} .bad .count{background:#f8d7d2}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.num{text-align:right}
.grid{display:flex;flex-wrap:wrap;gap:10px} .card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;
width:140px;font-size:12px;overflow-wrap:anywhere} .card img{width:128px;height:128px;object-fit:contain;background:#eee;
display:block;margin:0 auto 4px} .pair{width:290px} .pair .imgs{display:flex;gap:6px} .pair img{width:136px;height:136px}
.lab{font-weight:600} .sugg{color:#b03a2e;font-weight:600} .score{color:#555} .note{background:#fff7e0;border:1px solid #f0d890;
padding:6px 10px;border-radius:6px;margin:6px 0} .more{color:#666;margin-top:6px}
"""


# Shared with datacheck's text report (which imports them from here: one direction, no cycle).
UNTRUSTED = ("warning: the linear probe is no better than always answering the commonest class; the label "
            "issues below are noise (too few photos, or classes the backbone cannot tell apart) and "
            "--write-exclude leaves them out")
QUALITY_VALUE = {"blurry": "sharpness", "dark": "brightness", "bright": "brightness", "low_information": "entropy",
                  "odd_size": "shorter side", "odd_aspect": "aspect ratio"}


def folder_label(rel: str) -> str:
    """The class folder of a relative path (``train/cat/x.jpg`` and ``cat/x.jpg`` -> ``cat``)."""
    parts = rel.split("/")
    return parts[-2] if len(parts) >= 2 else ""


class _Thumbs:
    """Base64 JPEG thumbnails of dataset photos, each encoded once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, str] = {}

    def uri(self, rel: str) -> str:
        if rel not in self._cache:
            try:
                img = load_rgb(self.root / rel, target=THUMB_SIDE)
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=80)
                self._cache[rel] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            except (ImageError, OSError):
                svg = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{THUMB_SIDE}' height='{THUMB_SIDE}'>"
                       "<rect width='100%' height='100%' fill='#ddd'/><text x='50%' y='50%' font-size='12' "
                       "text-anchor='middle'>unreadable</text></svg>")
                self._cache[rel] = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode("ascii")
        return self._cache[rel]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(thumbs: _Thumbs, rel: str) -> str:
    return f'<img src="{thumbs.uri(rel)}" alt="{_e(rel)}" title="{_e(rel)}">'


def _section(sid: str, title: str, count: int, body: str, *, note: str = "", bad: bool = True) -> str:
    cls = ' class="bad"' if bad and count else ""
    note_html = f'<p class="muted">{note}</p>' if note else ""
    inner = body if count else '<p class="muted">none found</p>'
    return (f'<section id="{sid}" data-count="{count}"{cls}><h2>{_e(title)}<span class="count">{count}</span></h2>'
            f"{note_html}{inner}</section>")


def _more(total: int) -> str:
    return f'<p class="more">... and {total - MAX_CARDS} more in the JSON report</p>' if total > MAX_CARDS else ""


def _cards(thumbs: _Thumbs, rows: list[dict[str, Any]], lines: Any) -> str:
    cards = []
    for r in rows[:MAX_CARDS]:
        cards.append(f'<div class="card">{_img(thumbs, r["file"])}<div>{_e(r["file"])}</div>{lines(r)}</div>')
    return f'<div class="grid">{"".join(cards)}</div>{_more(len(rows))}'


def _pairs(thumbs: _Thumbs, rows: list[dict[str, Any]], lines: Any) -> str:
    cards = []
    for r in rows[:MAX_CARDS]:
        cards.append(f'<div class="card pair"><div class="imgs">{_img(thumbs, r["a"])}{_img(thumbs, r["b"])}</div>'
                     f'<div>{_e(r["a"])}<br>{_e(r["b"])}</div>{lines(r)}</div>')
    return f'<div class="grid">{"".join(cards)}</div>{_more(len(rows))}'


def _bar_chart(counts: dict[str, dict[str, int]]) -> str:
    """Horizontal stacked bars, one per class, one colour per split (inline SVG)."""
    splits = list(counts)
    classes = sorted({c for cls in counts.values() for c in cls})
    totals = {c: sum(counts[s].get(c, 0) for s in splits) for c in classes}
    top = max(totals.values(), default=1) or 1
    label_w, bar_w, row_h = 190, 460, 22
    height = row_h * len(classes) + 40
    parts = [f'<svg id="class-chart" width="{label_w + bar_w + 70}" '
             f'height="{height}" role="img" aria-label="photos per class">']
    for i, c in enumerate(classes):
        y = 10 + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" font-size="12">{_e(c)}</text>')
        x = float(label_w)
        for s in splits:
            w = bar_w * counts[s].get(c, 0) / top
            if w > 0:
                parts.append(f'<rect class="bar" data-class="{_e(c)}" data-split="{_e(s)}" '
                             f'data-count="{counts[s].get(c, 0)}" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 6}" '
                             f'fill="{_SPLIT_COLOURS.get(s, "#999")}"><title>{_e(s)}: {counts[s].get(c, 0)}</title></rect>')
            x += w
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 14}" font-size="12">{totals[c]}</text>')
    ly = height - 14
    for k, s in enumerate(splits):
        parts.append(f'<rect x="{label_w + k * 90}" y="{ly - 10}" width="12" height="12" fill="{_SPLIT_COLOURS.get(s, "#999")}"/>'
                     f'<text x="{label_w + k * 90 + 16}" y="{ly}" font-size="12">{_e(s)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _within_class_pairs(report: "DataReport") -> list[dict[str, Any]]:
    """Same-class duplicate pairs from all three matchers (exact, phash, feature), each pair once."""

    seen: set[frozenset[str]] = set()
    out: list[dict[str, Any]] = []

    def add(a: str, b: str, how: str) -> None:
        key = frozenset((a, b))
        if key not in seen and folder_label(a) == folder_label(b):
            seen.add(key)
            out.append({"a": a, "b": b, "how": how})

    for g in report.exact_duplicates:
        for other in g[1:]:
            add(g[0], other, "byte-identical")
    for g in report.near_duplicates:
        for other in g[1:]:
            add(g[0], other, "perceptual hash")
    for r in report.duplicate_pairs:
        if "same-class" in r["kinds"]:
            add(r["a"], r["b"], f"similarity {r['similarity']}")
    return out


def _quality_sections(report: "DataReport", thumbs: _Thumbs) -> Iterable[str]:

    for kind in QUALITY_KINDS:
        rows = report.quality.get(kind, [])
        what = QUALITY_VALUE[kind]
        yield _section(f"quality-{kind.replace('_', '-')}", f"Photo quality: {kind.replace('_', ' ')}", len(rows),
                       _cards(thumbs, rows, lambda r, w=what: f'<div class="lab">{_e(r["label"])}</div>'
                                                           f'<div class="score">{_e(w)} {_e(r["value"])}</div>'),
                       note="unusual for this dataset (robust z-score against its own photos)")


def render_html(report: "DataReport") -> str:
    """The report page as one HTML string."""
    thumbs = _Thumbs(Path(report.root))
    n_photos = sum(sum(c.values()) for c in report.counts.values())
    classes = sorted({c for cls in report.counts.values() for c in cls})
    deep = report.deep
    conflicts = [r for r in report.leakage if "conflicting-labels" in r["kinds"]]
    within = _within_class_pairs(report)
    out: list[str] = ["<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
                      f"<title>fieldid data check: {_e(report.root)}</title><style>{_CSS}</style></head><body>",
                      f"<h1>Data check: {_e(report.root)}</h1>"]
    layout = "pre-split: " + ", ".join(report.counts) if report.presplit else "flat (split at train time)"
    out.append(f'<p class="muted">{n_photos} readable photos, {len(classes)} classes, {_e(layout)}. '
               + ("The check never changes a photo; act on it with <code>--write-exclude</code> and "
                  "<code>fieldid train --exclude</code>.</p>"))
    if deep:
        probe = deep.get("probe", {})
        out.append(f'<p class="muted">Full check: {_e(deep["model"])} features at {_e(deep["image_size"])} px '
                   f'({_e(deep["features_from_cache"])} from the cache, {_e(deep["features_computed"])} computed); '
                   f'{_e(probe.get("folds"))}-fold linear probe, out-of-sample accuracy {_e(probe.get("accuracy"))}; '
                   f'{_e(deep["splits"])}.</p>')
    else:
        out.append('<p class="note">Fast check (<code>--fast</code>): no label issues, feature near-duplicates or '
                   "outliers.</p>")

    summary = [("label-issues", "Label issues", len(report.label_issues)),
               ("leakage", "Leaking pairs", len(report.leakage)),
               ("duplicates", "Near-duplicates within a class", len(within)),
               ("conflicts", "Label conflicts", len(conflicts)),
               ("outliers", "Outliers", len(report.outliers)),
               *((f"quality-{k.replace('_', '-')}", f"Quality: {k.replace('_', ' ')}", len(report.quality.get(k, [])))
                 for k in QUALITY_KINDS),
               ("skipped", "Skipped files", len(report.skipped))]
    rows = "".join(f'<tr><td><a href="#{sid}">{_e(t)}</a></td><td class="num" data-summary="{sid}">{n}</td></tr>'
                   for sid, t, n in summary)
    out.append(f'<table id="summary"><tr><th>finding</th><th>count</th></tr>{rows}</table>')

    count_rows = "".join(f"<tr><td>{_e(c)}</td>" + "".join(f'<td class="num">{report.counts[s].get(c, 0)}</td>'
                                                           for s in report.counts) + "</tr>" for c in classes)
    ratio = f"{report.imbalance_ratio:.2f}" if report.imbalance_ratio != float("inf") else "inf"
    out.append(_section("class-counts", "Photos per class", len(classes),
                        _bar_chart(report.counts) + "<table><tr><th>class</th>"
                        + "".join(f"<th>{_e(s)}</th>" for s in report.counts) + f"</tr>{count_rows}</table>",
                        note=f"imbalance ratio (largest / smallest class): {ratio}", bad=False))

    pair_notes = "".join(
        f'<p class="note"><b>{_e(p["classes"][0])} &harr; {_e(p["classes"][1])}</b>: {p["counts"][0]} photos given '
        f'{_e(p["classes"][0])} look like {_e(p["classes"][1])} and {p["counts"][1]} the other way (chance: '
        f'{p["expected"][0]} and {p["expected"][1]}). Likely an unclear boundary (ordinal grades, a vague '
        f"definition), not typos: agree where it lies, or merge the classes.</p>" for p in report.confused_pairs)
    if deep and not deep.get("probe", {}).get("better_than_majority", True):

        pair_notes = f'<p class="note">{_e(UNTRUSTED)}</p>' + pair_notes
    out.append(_section(
        "label-issues", "Label issues: the given label is probably wrong", len(report.label_issues),
        pair_notes + _cards(thumbs, report.label_issues,
                            lambda r: f'<div>given <span class="lab">{_e(r["given"])}</span></div>'
                                      f'<div>suggested <span class="sugg">{_e(r["suggested"])}</span></div>'
                                      f'<div class="score">score {r["score"]:.2f}'
                                      + (" &middot; unclear boundary" if r["boundary"] else "") + "</div>"),
        note="out-of-sample linear probe + confident learning (Northcutt et al., JAIR 2021); most suspicious first"
        if deep else "needs the full check"))

    leak_rows = "".join(
        f'<tr><td>{_img(thumbs, r["a"])}</td><td>{_img(thumbs, r["b"])}</td><td>{_e(r["a"])}<br>{_e(r["b"])}</td>'
        f'<td>{_e(" / ".join(r["splits"]))}</td><td>{_e(" / ".join(r["labels"]))}</td><td>{_e(", ".join(r["kinds"]))}</td>'
        f'<td>{_e(r["match"])}</td><td class="num">{_e(r["distance"])}</td></tr>' for r in report.leakage[:MAX_CARDS])
    out.append(_section(
        "leakage", "Leakage: the same photo in two splits or under two labels", len(report.leakage),
        '<table class="leaks"><tr><th>a</th><th>b</th><th>files</th><th>splits</th><th>labels</th><th>kind</th>'
        f"<th>match</th><th>distance</th></tr>{leak_rows}</table>{_more(len(report.leakage))}",
        note="a test photo with a copy in training inflates the test score; distance: phash bits (exact/near) "
             "or 1 - similarity of the aligned thumbnails (aligned)"))
    out.append(_section("duplicates", "Near-duplicates within a class (redundant)", len(within),
                        _pairs(thumbs, within, lambda r: f'<div class="score">{_e(r["how"])}</div>')))
    out.append(_section("conflicts", "Label conflicts: the same photo under different classes", len(conflicts),
                        _pairs(thumbs, conflicts, lambda r: f'<div class="lab">{_e(" / ".join(r["labels"]))}</div>'
                                                            f'<div class="score">{_e(r["match"])}</div>')))
    out.append(_section("outliers", "Outliers: far from every class", len(report.outliers),
                        _cards(thumbs, report.outliers, lambda r: f'<div class="lab">{_e(r["label"])}</div>'
                                                                  f'<div class="score">score {r["score"]:.1f}, closest '
                                                                  f'{_e(r["nearest_class"])}</div>'),
                        note="k-NN feature distance far above every class's own (robust z-score)"
                        if deep else "needs the full check"))
    out.extend(_quality_sections(report, thumbs))
    skipped = "".join(f"<tr><td>{_e(r['file'])}</td><td>{_e(r['reason'])}</td><td>{_e(r['detail'])}</td></tr>"
                      for r in report.skipped)
    out.append(_section("skipped", "Skipped files (training will not use them)", len(report.skipped),
                        f"<table><tr><th>file</th><th>reason</th><th>detail</th></tr>{skipped}</table>"))
    out.append("</body></html>")
    return "\n".join(out)


def write_html_report(report: "DataReport", path: str | Path) -> Path:
    """Write :func:`render_html` to ``path`` atomically."""
    return atomic_write_text(path, render_html(report), errors="replace")
