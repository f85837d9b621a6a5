#!/usr/bin/env python3
"""Draws benches/keys.svg: ns per keyed check against live subjects, ratewarden and governor,
from criterion's output of the `keys` group (target/criterion/keys/...).

    cargo bench --bench ratewarden -- keys
    python3 benches/chart.py            # writes benches/keys.svg and prints the table
"""
import json
import math
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CRIT = os.path.join(ROOT, "target", "criterion", "keys")
SIZES = [1, 1000, 100000, 1000000]
SERIES = [
    ("ratewarden/api_key", "ratewarden, 30-byte API keys", "#1f77b4", ""),
    ("governor/api_key", "governor, 30-byte API keys", "#d62728", ""),
    ("ratewarden/ipv4", "ratewarden, IPv4", "#1f77b4", "6,4"),
    ("governor/ipv4", "governor, IPv4", "#d62728", "6,4"),
    ("ratewarden/ipv6", "ratewarden, IPv6", "#1f77b4", "2,3"),
    ("governor/ipv6", "governor, IPv6", "#d62728", "2,3"),
]


def mean_ns(series, n):
    # criterion escapes '/' in function names as '_'
    path = os.path.join(CRIT, series.replace("/", "_"), str(n), "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["mean"]["point_estimate"]
    except (OSError, KeyError, ValueError):
        return None


def main():
    data = {s: [mean_ns(s, n) for n in SIZES] for s, *_ in SERIES}
    if all(v is None for vs in data.values() for v in vs):
        sys.exit("no criterion output under target/criterion/keys; run `cargo bench --bench ratewarden -- keys` first")
    print("| live subjects | " + " | ".join(label for _, label, *_ in SERIES) + " |")
    print("|---" * (len(SERIES) + 1) + "|")
    for i, n in enumerate(SIZES):
        cells = ["-" if data[s][i] is None else f"{data[s][i]:.1f}" for s, *_ in SERIES]
        print(f"| {n:,} | " + " | ".join(cells) + " |")

    w, h, left, right, top, bottom = 720, 420, 70, 250, 30, 50
    vals = [v for vs in data.values() for v in vs if v is not None]
    ymax = max(vals) * 1.1
    xs = {n: left + (w - left - right) * i / (len(SIZES) - 1) for i, n in enumerate(SIZES)}
    y = lambda v: top + (h - top - bottom) * (1 - v / ymax)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">ns per keyed check (lower is better), one token bucket per key</text>']
    step = 10 ** math.floor(math.log10(ymax / 5)) if ymax > 0 else 1
    while ymax / step > 8:
        step *= 2
    t = 0.0
    while t <= ymax:
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
        t += step
    for n, x in xs.items():
        out.append(f'<text x="{x:.1f}" y="{h - bottom + 18}" text-anchor="middle">{n:,}</text>')
    out.append(f'<text x="{(left + w - right) / 2:.1f}" y="{h - 10}" text-anchor="middle">live subjects (log scale)</text>')
    for i, (s, label, color, dash) in enumerate(SERIES):
        pts = [(xs[n], y(v)) for n, v in zip(SIZES, data[s]) if v is not None]
        if not pts:
            continue
        d = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        da = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"{da}/>')
        for px, py in pts:
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>')
        ly = top + 20 + i * 20
        out.append(f'<line x1="{w - right + 15}" x2="{w - right + 45}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{da}/>')
        out.append(f'<text x="{w - right + 50}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    with open(os.path.join(ROOT, "benches", "keys.svg"), "w") as f:
        f.write("\n".join(out) + "\n")
    print("wrote benches/keys.svg")


if __name__ == "__main__":
    main()
