"""The ablation plot: one bar per row, the main metric against the swept value.

Drawn with matplotlib when it is installed, else with Pillow (a dependency already), so no new package is needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

WIDTH, HEIGHT = 800, 500  # pixels


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, ylabel: str) -> bytes:
    """A PNG (``WIDTH`` x ``HEIGHT``) of ``values`` per label; a missing (NaN) value gets no bar."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _pillow(labels, values, title, xlabel, ylabel)
    return _matplotlib(labels, values, title, xlabel, ylabel)


def _matplotlib(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, ylabel: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(WIDTH / 100, HEIGHT / 100), dpi=100)
    heights = [0.0 if math.isnan(v) else v for v in values]
    bars = axes.bar(range(len(labels)), heights, color="#4878a8")
    axes.bar_label(bars, labels=["–" if math.isnan(v) else f"{v:.2f}" for v in values])
    axes.set_xticks(range(len(labels)), labels)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _pillow(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, ylabel: str) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 80, WIDTH - 30, 50, HEIGHT - 80  # plot area
    finite = [v for v in values if not math.isnan(v)]
    high = _nice_max(max(finite, default=0.0))
    draw.text((WIDTH // 2, 20), title, fill="black", font=font, anchor="mm")
    draw.text((WIDTH // 2, HEIGHT - 25), xlabel, fill="black", font=font, anchor="mm")
    draw.text((15, (top + bottom) // 2), ylabel, fill="black", font=font, anchor="lm")
    for i in range(6):  # y grid and ticks
        y = bottom - (bottom - top) * i / 5
        draw.line([(left, y), (right, y)], fill="#dddddd")
        draw.text((left - 8, y), f"{high * i / 5:.3g}", fill="black", font=font, anchor="rm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    slot = (right - left) / max(len(labels), 1)
    for i, (label, value) in enumerate(zip(labels, values)):
        x0, x1 = left + slot * (i + 0.2), left + slot * (i + 0.8)
        if not math.isnan(value):
            y = bottom - (bottom - top) * (value / high if high > 0 else 0)
            draw.rectangle([(x0, y), (x1, bottom)], fill="#4878a8")
            draw.text(((x0 + x1) / 2, y - 4), f"{value:.2f}", fill="black", font=font, anchor="md")
        else:
            draw.text(((x0 + x1) / 2, bottom - 4), "–", fill="black", font=font, anchor="md")
        draw.text(((x0 + x1) / 2, bottom + 8), label, fill="black", font=font, anchor="ma")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)
