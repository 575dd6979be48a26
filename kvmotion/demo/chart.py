"""The demo's picture (pure): the client's UDP round-trip time over the run, on a log scale, with
each migration's phases shaded and its client-visible gap marked; below it, on the same time axis,
one lane per host showing which VMs ran there. Plain SVG, written by hand.

Probes come every millisecond, far more than pixels: each pixel column draws the range (min to
max) of the round trips sent in it and their median (a line), and a red tick on the "no reply"
band where a probe got none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from kvmotion.net.probe import UdpSample

WIDTH, HEIGHT = 1200, 480
LEFT, RIGHT, TOP, BOTTOM = 72, 24, 86, 44
NOREPLY_BAND = 14  # px above the plot where unanswered probes are ticked
LABEL_W, LABEL_ROWS = 130, 3  # px a migration's label needs; rows its labels may stagger into
LANE_H, LANE_GAP, LANES_TOP = 22, 4, 28  # host lanes: height, spacing, room for their caption
VM_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b", "#9d755d")

PHASE_COLOURS = {
    "prepare": "#e6e6e6",
    "precopy": "#cfe0ff",
    "switchover": "#ffc27a",
    "commit": "#b6e3b6",
}


@dataclass(frozen=True)
class MigrationMark:
    """One migration on the chart; times in seconds since the probe's start."""

    label: str  # e.g. "1  host-a → host-b"
    phases: tuple[tuple[str, float, float], ...]  # (phase, start, end)
    gap_start: float | None
    gap_ms: float | None


@dataclass(frozen=True)
class HostLane:
    """One host's lane: the VMs that ran there; times in seconds since the probe's start."""

    host: str
    stays: tuple[tuple[str, float, float], ...]  # (vm, start, end)


@dataclass(frozen=True)
class _Column:
    rtts_ms: tuple[float, ...]  # sorted
    unanswered: int

    @property
    def median(self) -> float:
        return self.rtts_ms[len(self.rtts_ms) // 2]


def _columns(samples: Sequence[UdpSample], t_end: float, n: int) -> list[_Column]:
    rtts: list[list[float]] = [[] for _ in range(n)]
    miss = [0] * n
    for s in samples:
        i = min(n - 1, max(0, int(s.t_send / t_end * n)))
        if s.rtt is None:
            miss[i] += 1
        else:
            rtts[i].append(s.rtt * 1000)
    return [_Column(tuple(sorted(r)), m) for r, m in zip(rtts, miss, strict=True)]


def _decades(samples: Sequence[UdpSample]) -> tuple[int, int]:
    rtts = [s.rtt * 1000 for s in samples if s.rtt is not None and s.rtt > 0]
    if not rtts:
        return -1, 2
    lo = math.floor(math.log10(min(rtts)))
    hi = math.ceil(math.log10(max(rtts)))
    return lo, max(hi, lo + 1)


def _fmt_ms(v: float) -> str:
    return f"{v:g} ms" if v >= 1 else f"{v * 1000:g} µs"


def render_svg(samples: Sequence[UdpSample], marks: Sequence[MigrationMark], title: str, subtitle: str,
               lanes: Sequence[HostLane] = ()) -> str:
    """An SVG document (str) of the latency timeline with the migrations marked, and a lane per host
    of the VMs that ran there (none when `lanes` is empty)."""
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    lane_end = max((b for lane in lanes for _, _, b in lane.stays), default=0.0)
    t_end = max(max((s.t_send for s in samples), default=1.0), lane_end) or 1.0
    height = HEIGHT + (LANES_TOP + len(lanes) * (LANE_H + LANE_GAP) + 8 if lanes else 0)
    d_lo, d_hi = _decades(samples)

    def x(t: float) -> float:
        return LEFT + max(0.0, min(1.0, t / t_end)) * pw

    def y(ms: float) -> float:
        v = (math.log10(max(ms, 10.0**d_lo)) - d_lo) / (d_hi - d_lo)
        return TOP + ph - max(0.0, min(1.0, v)) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{escape(title)}</text>',
        f'<text x="{LEFT}" y="40" fill="#444">{escape(subtitle)}</text>',
    ]
    # migration phases behind everything; labels closer than LABEL_W apart go one row lower
    for m in marks:
        for phase, a, b in m.phases:
            w = max(x(b) - x(a), 1.0)
            out.append(
                f'<rect x="{x(a):.1f}" y="{TOP}" width="{w:.1f}" height="{ph}" fill="{PHASE_COLOURS.get(phase, "#eee")}">'
                f"<title>{escape(m.label)}: {phase} {(b - a) * 1000:.0f} ms</title></rect>"
            )
    label_x, row = -math.inf, 0
    for m in marks:  # labels over every shading
        if m.phases:
            a = min(p[1] for p in m.phases)
            row = (row + 1) % LABEL_ROWS if x(a) - label_x < LABEL_W else 0
            label_x, ly = x(a), TOP + 14 + row * 30
            out.append(f'<text x="{x(a) + 3:.1f}" y="{ly}" font-weight="bold">{escape(m.label)}</text>')
            if m.gap_ms is not None:
                out.append(f'<text x="{x(a) + 3:.1f}" y="{ly + 14}" fill="#b00">client gap {m.gap_ms:.0f} ms</text>')
    # axes and grid
    for d in range(d_lo, d_hi + 1):
        v = 10.0**d
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ccc" stroke-dasharray="3,3"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_fmt_ms(v)}</text>')
    step = _time_step(t_end)
    t = 0.0
    while t <= t_end + 1e-9:
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{TOP + ph}" y2="{TOP + ph + 5}" stroke="#333"/>')
        out.append(f'<text x="{x(t):.1f}" y="{TOP + ph + 18}" text-anchor="middle">{t:g} s</text>')
        t += step
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(
        f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 14}" text-anchor="middle">time since the client started (s)</text>'
    )
    out.append(
        f'<text transform="translate(16,{TOP + ph / 2}) rotate(-90)" text-anchor="middle">UDP round trip (log scale)</text>'
    )
    # the data: one range per pixel column, unanswered probes ticked above the plot
    cols = _columns(samples, t_end, pw)
    band, ticks, median, pen_down = [], [], [], False
    for i, c in enumerate(cols):
        cx = LEFT + i + 0.5
        if c.rtts_ms:
            y0, y1 = y(c.rtts_ms[0]), y(c.rtts_ms[-1])
            band.append(f"M{cx:.1f} {y0 + 0.5:.1f}V{min(y1, y0 - 0.5) - 0.5:.1f}")
            median.append(f"{'L' if pen_down else 'M'}{cx:.1f} {y(c.median):.1f}")
            pen_down = True
        else:
            pen_down = False  # no reply in this column: the line breaks
        if c.unanswered:
            ticks.append(f"M{cx:.1f} {TOP - NOREPLY_BAND}v{NOREPLY_BAND - 2}")
    if band:
        out.append(f'<path d="{"".join(band)}" stroke="#8fb0e8" stroke-width="1" fill="none"/>')
    if median:
        out.append(f'<path d="{"".join(median)}" stroke="#17336b" stroke-width="1.2" fill="none" stroke-linejoin="round"/>')
    if ticks:
        out.append(f'<path d="{"".join(ticks)}" stroke="#d00" stroke-width="1" fill="none"/>')
    # the largest gap of each migration
    for m in marks:
        if m.gap_start is not None and m.gap_ms is not None:
            a, b = x(m.gap_start), x(m.gap_start + m.gap_ms / 1000)
            out.append(
                f'<line x1="{a:.1f}" x2="{max(b, a + 2):.1f}" y1="{TOP + ph - 3}" y2="{TOP + ph - 3}" stroke="#d00" stroke-width="4">'
                f"<title>{escape(m.label)}: client gap {m.gap_ms:.0f} ms</title></line>"
            )
    # legend, top right above the plot
    lx = WIDTH - RIGHT - 5 * 92
    for k, (phase, colour) in enumerate(PHASE_COLOURS.items()):
        out.append(f'<rect x="{lx + k * 92}" y="40" width="12" height="12" fill="{colour}" stroke="#999"/>')
        out.append(f'<text x="{lx + k * 92 + 16}" y="50">{phase}</text>')
    gx = lx + 4 * 92
    out.append(f'<line x1="{gx}" x2="{gx + 16}" y1="46" y2="46" stroke="#d00" stroke-width="4"/>')
    out.append(f'<text x="{gx + 20}" y="50">client gap</text>')
    out.append(f'<rect x="{lx}" y="56" width="12" height="12" fill="#8fb0e8"/>')
    out.append(f'<line x1="{lx}" x2="{lx + 12}" y1="62" y2="62" stroke="#17336b" stroke-width="1.5"/>')
    out.append(f'<text x="{lx + 16}" y="66">round trip: median, min–max per pixel</text>')
    out.append(f'<line x1="{gx}" x2="{gx}" y1="56" y2="68" stroke="#d00"/>')
    out.append(f'<text x="{gx + 6}" y="66">no reply</text>')
    out += _lanes(lanes, x, pw)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _lanes(lanes: Sequence[HostLane], x, pw: int) -> list[str]:
    """The host lanes below the chart: a bar per stay of a VM on the host, coloured by VM; a lane has
    a row per VM that ever ran there, so VMs sharing the host show side by side."""
    if not lanes:
        return []
    top = HEIGHT + LANES_TOP
    out = [f'<text x="{LEFT}" y="{top - 8}" font-weight="bold">which VM ran on which host (from the center\'s tasks)</text>']
    vms = sorted({vm for lane in lanes for vm, _, _ in lane.stays})
    colour = {vm: VM_COLOURS[i % len(VM_COLOURS)] for i, vm in enumerate(vms)}
    lx = WIDTH - RIGHT - 90 * len(vms)
    for i, vm in enumerate(vms):
        out.append(f'<rect x="{lx + i * 90}" y="{top - 19}" width="12" height="12" fill="{colour[vm]}"/>')
        out.append(f'<text x="{lx + i * 90 + 16}" y="{top - 9}">{escape(vm)}</text>')
    for k, lane in enumerate(lanes):
        y = top + k * (LANE_H + LANE_GAP)
        out.append(f'<rect x="{LEFT}" y="{y}" width="{pw}" height="{LANE_H}" fill="#f6f6f6" stroke="#ccc"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + LANE_H / 2 + 4}" text-anchor="end">{escape(lane.host)}</text>')
        rows = sorted({vm for vm, _, _ in lane.stays})
        h = (LANE_H - 2) / max(1, len(rows))
        for vm, a, b in lane.stays:
            ry = y + 1 + rows.index(vm) * h
            x0, x1 = x(a), x(b)
            out.append(
                f'<rect class="stay" x="{x0:.1f}" y="{ry:.1f}" width="{max(x1 - x0, 1.0):.1f}" height="{h:.1f}" '
                f'fill="{colour[vm]}"><title>{escape(vm)} on {escape(lane.host)}: {a:.1f}–{b:.1f} s</title></rect>'
            )
            if x1 - x0 > 7 * len(vm) and h >= 10:
                out.append(f'<text x="{x0 + 3:.1f}" y="{ry + h / 2 + 4:.1f}" fill="white" font-size="10">{escape(vm)}</text>')
    return out


def _time_step(t_end: float) -> float:
    for step in (1, 2, 5, 10, 15, 20, 30, 60, 120, 300):
        if t_end / step <= 12:
            return float(step)
    return 600.0
