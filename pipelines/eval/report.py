"""``report.html``: sample queries with their top-5 results and each sentence token's attention map.

One self-contained file (images inlined as base64 JPEG thumbnails), so it can be opened from anywhere,
logged to MLflow or mailed.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image

from isa.data.benchmarks import Query
from isa.images import decode_image

THUMB = 112  # thumbnail side in pixels
MAX_PIXELS = 1 << 28

_STYLE = f"""
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}
.query{{border-top:1px solid #ccc;padding:12px 0}}
.row{{display:flex;gap:8px;align-items:flex-start;margin:6px 0}}
.label{{width:220px;font-size:13px}}
figure{{margin:0;text-align:center;font-size:11px;width:{THUMB}px}}
figure img{{width:{THUMB}px;height:{THUMB}px;object-fit:cover;border:3px solid transparent}}
figure.hit img{{border-color:#1a9c3a}}
figure.target img{{border-color:#1a9c3a;border-style:dashed}}
.miss{{color:#b00020}}
"""


@dataclass
class Sample:
    """One query as shown in the report."""

    query: Query
    results: dict[str, list[str]]  # method -> its top-5 image names
    attention: dict[str, np.ndarray]  # method -> (M, h, w) token attention over the reference


def _thumbnail(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((THUMB, THUMB), Image.BICUBIC)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _load(uri: str) -> Image.Image:
    with fsspec.open(uri, "rb") as handle:
        return _thumbnail(decode_image(handle.read(), MAX_PIXELS))


def attention_overlay(reference: Image.Image, attention: np.ndarray) -> Image.Image:
    """The reference thumbnail tinted red where one token looks; ``attention`` is (h, w)."""
    heat = attention / max(float(attention.max()), 1e-12)
    mask = Image.fromarray((heat * 255).astype(np.uint8)).resize(reference.size, Image.BILINEAR)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255 * 0.7
    base = np.asarray(reference, dtype=np.float32)
    red = np.zeros_like(base)
    red[..., 0] = 255
    return Image.fromarray((base * (1 - alpha) + red * alpha).astype(np.uint8))


def _figure(image: Image.Image, caption: str, kind: str = "") -> str:
    """One thumbnail; ``kind``: "hit" (a ground truth among the results), "target" (the query's target), or ""."""
    cls = f' class="{kind}"' if kind else ""
    return f'<figure{cls}><img src="{_data_uri(image)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _query_block(sample: Sample, thumbs: Mapping[str, Image.Image]) -> str:
    query = sample.query
    truths = set(query.ground_truths or ((query.target,) if query.target else ()))
    modifier = " / ".join(query.modifiers)
    parts = [f'<div class="query"><h3>query {html.escape(query.query_id)}: “{html.escape(modifier)}”</h3>']
    target = ""
    if query.target is not None and query.target in thumbs:  # test splits have none
        target = _figure(thumbs[query.target], f"target: {query.target}", "target")
    parts.append(
        f'<div class="row"><div class="label">{"reference, target" if target else "reference"}</div>'
        + _figure(thumbs[query.reference], query.reference)
        + target
    )
    for method, maps in sample.attention.items():
        overlays = "".join(
            _figure(attention_overlay(thumbs[query.reference], token_map), f"token {m + 1}")
            for m, token_map in enumerate(maps)
        )
        parts.append(f'<div class="label">{html.escape(method)}: where each word looks</div>{overlays}')
    parts.append("</div>")
    for method, names in sample.results.items():
        figures = "".join(
            _figure(thumbs[n], f"{n} (target)" if n == query.target else n, "hit" if n in truths else "")
            for n in names
            if n in thumbs
        )
        label = html.escape(method)
        if truths and not truths & set(names):
            label += '<br><span class="miss">target not in the top 5</span>'
        parts.append(f'<div class="row"><div class="label">{label}</div>{figures}</div>')
    return "".join(parts) + "</div>"


def render(title: str, table_markdown: str, samples: Sequence[Sample], images: Mapping[str, str]) -> str:
    """The report page. ``images`` maps image names to URIs (the benchmark's images)."""
    needed = {s.query.reference for s in samples} | {s.query.target for s in samples if s.query.target is not None}
    needed |= {n for s in samples for names in s.results.values() for n in names}
    thumbs = {name: _load(images[name]) for name in sorted(needed) if name in images}
    body = "".join(_query_block(s, thumbs) for s in samples)
    legend = (
        "<p>Dashed green frame: the query's target, next to its reference. Green frame: a ground truth among a "
        "method's top 5. Red: where a sentence token attends on the reference image.</p>"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<pre>{html.escape(table_markdown)}</pre>{legend}{body}</body></html>"
    )
