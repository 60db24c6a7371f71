"""A sweep as a table, a CSV and a plot:  python -m app.sweep_summary SWEEP_DIR [--out DIR]

SWEEP_DIR is a Hydra multirun directory (`multirun/DATE/TIME`, or `hydra.sweep.dir`): one numbered
subdirectory per job, each with the `metrics.json` that `run.py` writes. The sweep's axes are the
overrides whose values differ between jobs. Writes `summary.csv`, `summary.md` (the table printed
here) and `summary.svg` (decode tokens/s and MiB streamed per token against the expert budget, or
the first numeric axis, one line per value of the other axes) into --out
(default: SWEEP_DIR). The plot is plain SVG, written without a plotting library: any browser
shows it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from html import escape
from pathlib import Path

METRICS = "metrics.json"
PREFERRED_X = "placement.expert_budget_gb"


def load_jobs(sweep_dir: Path) -> list[dict]:
    """One row per job: its overrides as a dict and the figures the table shows."""
    rows = []
    for path in sorted(sweep_dir.rglob(METRICS), key=lambda p: _job_key(p, sweep_dir)):
        record = json.loads(path.read_text())
        overrides = dict(o.split("=", 1) for o in record.get("overrides", []) if "=" in o)
        timings, dispatch = record["timings"], record["counters"]["dispatch"]
        offload = record["counters"].get("offload")  # None: every expert resident, no offload controller
        carried = sum(t["tokens"] for t in dispatch["tiers"])
        padded = sum(t["padding"] for t in dispatch["tiers"])
        rows.append({
            "job": str(path.parent.relative_to(sweep_dir)),
            "overrides": overrides,
            "decode_tok_s": timings["decode_tokens_per_s"],
            "ttft_ms": timings["ttft_s"] * 1e3,
            "generated": timings["generated_tokens"],
            "launches": sum(t["launches"] for t in dispatch["tiers"]),
            "padding_pct": 100 * padded / (carried + padded) if carried + padded else 0.0,
            "hit_pct": None if offload is None else 100 * offload["hit_rate"],
            "stall_pct": None if offload is None else 100 * offload["stall_fraction"],
            "mib_streamed_per_token": None if offload is None else offload["bytes_per_token"] / 2**20,
        })
    return rows


def _job_key(path: Path, root: Path):
    parts = path.parent.relative_to(root).parts
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def axes(rows: list[dict]) -> list[str]:
    """Override keys whose values differ between jobs, in the order they were given."""
    keys = []
    for row in rows:
        keys += [k for k in row["overrides"] if k not in keys]
    return [k for k in keys if len({row["overrides"].get(k) for row in rows}) > 1]


COLUMNS = [("decode_tok_s", "decode tok/s", "{:.1f}"), ("ttft_ms", "TTFT ms", "{:.0f}"),
           ("generated", "tokens", "{}"), ("launches", "expert launches", "{}"),
           ("padding_pct", "padding %", "{:.1f}"), ("hit_pct", "hit %", "{:.1f}"), ("stall_pct", "stall %", "{:.1f}"),
           ("mib_streamed_per_token", "MiB streamed/token", "{:.3g}")]


def table(rows: list[dict], keys: list[str]) -> list[list[str]]:
    header = ["job"] + keys + [title for _, title, _ in COLUMNS]
    body = []
    for row in rows:
        cells = [row["job"]] + [row["overrides"].get(k, "") for k in keys]
        cells += ["-" if row[name] is None else fmt.format(row[name]) for name, _, fmt in COLUMNS]
        body.append(cells)
    return [header] + body


def markdown(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 2) if first + i * step <= high + 1e-9 * step]


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


def svg_plot(rows: list[dict], keys: list[str]) -> str | None:
    """Two panels against the x axis: decode tokens/s, bytes streamed per token. None without any axis."""
    if not keys:
        return None
    numeric = [k for k in keys if all(_number(r["overrides"].get(k)) is not None for r in rows)]
    x_key = PREFERRED_X if PREFERRED_X in numeric else (numeric[0] if numeric else keys[0])
    others = [k for k in keys if k != x_key]
    categories = sorted({r["overrides"].get(x_key, "") for r in rows})
    xs = {r["job"]: (_number(r["overrides"][x_key]) if x_key in numeric else categories.index(r["overrides"].get(x_key, "")))
          for r in rows}
    series: dict[str, list[dict]] = {}
    for row in rows:
        label = ", ".join(f"{k}={row['overrides'].get(k, '')}" for k in others) or "all jobs"
        series.setdefault(label, []).append(row)
    panels = [("decode_tok_s", "decode tokens/s"), ("mib_streamed_per_token", "MiB streamed per token")]
    width, height, pad = 420, 300, 56
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height + 24 * len(series) + 20}" '
           'font-family="sans-serif" font-size="12">', '<rect width="100%" height="100%" fill="white"/>']
    x_values = sorted(set(xs.values()))
    x_low, x_high = x_values[0], x_values[-1]
    if x_low == x_high:
        x_low, x_high = x_low - 1, x_high + 1
    for p, (metric, title) in enumerate(panels):
        left = p * width
        to_x = lambda v: left + pad + (v - x_low) / (x_high - x_low) * (width - 2 * pad)  # noqa: E731
        out.append(f'<text x="{left + width / 2}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>')
        out.append(f'<line x1="{left + pad}" y1="{height - pad}" x2="{left + width - pad / 2}" y2="{height - pad}" stroke="black"/>')
        out.append(f'<line x1="{left + pad}" y1="30" x2="{left + pad}" y2="{height - pad}" stroke="black"/>')
        out.append(f'<text x="{left + width / 2}" y="{height - 16}" text-anchor="middle">{escape(x_key)}</text>')
        for v in x_values:
            label = f"{v:g}" if x_key in numeric else categories[int(v)]
            out.append(f'<text x="{to_x(v):.1f}" y="{height - pad + 16}" text-anchor="middle">{escape(label)}</text>')
        values = [r[metric] for r in rows if r[metric] is not None]
        if not values:
            out.append(f'<text x="{left + width / 2}" y="{height / 2}" text-anchor="middle" fill="#777">'
                       'every expert resident: nothing streamed</text>')
            continue
        y_high = max(values) * 1.1 or 1.0
        to_y = lambda v: height - pad - v / y_high * (height - pad - 30)  # noqa: E731
        for tick in _ticks(0.0, y_high):
            out.append(f'<line x1="{left + pad - 4}" y1="{to_y(tick):.1f}" x2="{left + pad}" y2="{to_y(tick):.1f}" stroke="black"/>')
            out.append(f'<text x="{left + pad - 6}" y="{to_y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
        for i, members in enumerate(series.values()):
            colour = COLOURS[i % len(COLOURS)]
            points = sorted((xs[r["job"]], r[metric]) for r in members if r[metric] is not None)
            path = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
            out += [f'<circle cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" r="3.5" fill="{colour}"/>' for x, y in points]
    for i, label in enumerate(series):
        y = height + 10 + 24 * i
        out.append(f'<rect x="{pad}" y="{y}" width="14" height="14" fill="{COLOURS[i % len(COLOURS)]}"/>')
        out.append(f'<text x="{pad + 22}" y="{y + 12}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def summarise(sweep_dir: Path, out_dir: Path | None = None) -> str:
    """Write summary.csv, summary.md and summary.svg; return the table."""
    out_dir = out_dir or sweep_dir
    rows = load_jobs(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir}: no {METRICS} in any job directory (is it a run.py --multirun directory?)")
    keys = axes(rows)
    cells = table(rows, keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows(cells)
    text = markdown(cells)
    (out_dir / "summary.md").write_text(text + "\n")
    plot = svg_plot(rows, keys)
    if plot is not None:
        (out_dir / "summary.svg").write_text(plot)
    notes = [f"wrote {out_dir / 'summary.csv'}, {out_dir / 'summary.md'}"
             + (f", {out_dir / 'summary.svg'}" if plot else " (no plot: nothing varies between jobs)")]
    return "\n".join([text] + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.sweep_summary", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a run.py --multirun output directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write the summary files (default: sweep_dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        print(summarise(args.sweep_dir, args.out))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
