"""Small inline SVG charts for report.html (no JavaScript, no library): the loss curve of a training (raw points and
a smoothed line) and a metric's paired difference from the base model by training step (points with 95% intervals).
Each scales to its box (``viewBox``, width 100%)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

W, H = 560, 240
LEFT, RIGHT, TOP, BOTTOM = 74, 18, 16, 42
COLORS = {"better": "#1a7f37", "worse": "#cf222e", "no measurable difference": "#59636e"}


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 0.5:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _label(value: float) -> str:
    text = f"{value:.4g}"
    return "0" if float(text) == 0 else text


class Frame:
    """Axes: data ranges mapped onto the plot area, with tick labels and grid lines."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], x_title: str, y_title: str) -> None:
        self.xt = nice_ticks(min(xs), max(xs), 6)
        self.yt = nice_ticks(min(ys), max(ys), 5)
        self.x0, self.x1 = min(self.xt[0], min(xs)), max(self.xt[-1], max(xs))
        self.y0, self.y1 = min(self.yt[0], min(ys)), max(self.yt[-1], max(ys))
        self.x_title, self.y_title = x_title, y_title

    def x(self, v: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return LEFT + (v - self.x0) / span * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return H - BOTTOM - (v - self.y0) / span * (H - TOP - BOTTOM)

    def axes(self) -> str:
        out = []
        for t in self.yt:
            y = self.y(t)
            out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>'
                       f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(t)}</text>')
        for t in self.xt:
            x = self.x(t)
            out.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{_label(t)}</text>')
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{H - BOTTOM}" y2="{H - BOTTOM}" stroke="#8c959f"/>')
        out.append(f'<text x="{(LEFT + W - RIGHT) / 2:.1f}" y="{H - 6}" text-anchor="middle">'
                   f'{html.escape(self.x_title)}</text>')
        out.append(f'<text transform="translate(16 {(TOP + H - BOTTOM) / 2:.1f}) rotate(-90)" text-anchor="middle">'
                   f'{html.escape(self.y_title)}</text>')
        return "".join(out)


def _svg(body: str, title: str) -> str:
    return (f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}" '
            f'font-family="system-ui, sans-serif" font-size="13" fill="#1f2328">'
            f"<title>{html.escape(title)}</title>{body}</svg>")


def loss_chart(steps: Sequence[int], loss: Sequence[float], smoothed: Sequence[float]) -> str:
    """Every step's loss as a dot and its moving average as a line."""
    frame = Frame(list(steps), list(loss) + list(smoothed), "training step", "loss")
    dots = "".join(f'<circle cx="{frame.x(s):.1f}" cy="{frame.y(v):.1f}" r="2.2" fill="#8c959f" fill-opacity="0.7">'
                   f"<title>step {s}: {v:g}</title></circle>" for s, v in zip(steps, loss))
    line = " ".join(f"{frame.x(s):.1f},{frame.y(v):.1f}" for s, v in zip(steps, smoothed))
    return _svg(frame.axes() + dots + f'<polyline points="{line}" fill="none" stroke="#0969da" stroke-width="2"/>',
                "training loss by step")


def lr_chart(steps: Sequence[int], lr: Sequence[float]) -> str:
    frame = Frame(list(steps), list(lr), "training step", "learning rate")
    line = " ".join(f"{frame.x(s):.1f},{frame.y(v):.1f}" for s, v in zip(steps, lr))
    return _svg(frame.axes() + f'<polyline points="{line}" fill="none" stroke="#8250df" stroke-width="2"/>',
                "learning rate by step")


def step_chart(points: Sequence[tuple[float, str, float, tuple[float, float] | None, str]], metric: str) -> str:
    """A metric's difference from the base model by training step: ``points`` are (x, label, diff, 95% interval,
    verdict); the base model is the dashed line at 0."""
    ys = [0.0] + [v for _, _, d, ci, _ in points for v in ((d,) + (ci or ()))]
    xs = [x for x, *_ in points]
    if len(set(xs)) == 1:  # one candidate: a little room on both sides
        xs = [xs[0] - 1, xs[0] + 1]
    frame = Frame(xs, ys, "training step", f"{metric} minus base")
    zero = frame.y(0.0)
    out = [frame.axes(), f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{zero:.1f}" y2="{zero:.1f}" stroke="#1f2328" '
                         f'stroke-dasharray="4 3"/><text x="{W - RIGHT}" y="{zero - 4:.1f}" text-anchor="end" '
                         f'fill="#59636e">base</text>']
    if len(points) > 1:
        line = " ".join(f"{frame.x(x):.1f},{frame.y(d):.1f}" for x, _, d, _, _ in points)
        out.append(f'<polyline points="{line}" fill="none" stroke="#afb8c1" stroke-width="1.5"/>')
    for x, label, d, ci, verdict in points:
        color = COLORS.get(verdict, "#59636e")
        cx = frame.x(x)
        if ci:
            lo, hi = frame.y(ci[0]), frame.y(ci[1])
            out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{lo:.1f}" y2="{hi:.1f}" stroke="{color}" '
                       f'stroke-width="2"/><line x1="{cx - 5:.1f}" x2="{cx + 5:.1f}" y1="{lo:.1f}" y2="{lo:.1f}" '
                       f'stroke="{color}"/><line x1="{cx - 5:.1f}" x2="{cx + 5:.1f}" y1="{hi:.1f}" y2="{hi:.1f}" '
                       f'stroke="{color}"/>')
        out.append(f'<circle cx="{cx:.1f}" cy="{frame.y(d):.1f}" r="4.5" fill="{color}"><title>'
                   f"{html.escape(label)}: {d:+.4g} ({html.escape(verdict)})</title></circle>")
    return _svg("".join(out), f"{metric} minus base, by training step")
