"""Plots of serving-benchmark results: throughput and latency against the number of adapters,
the arrival rate, α and cv, one line per variant (and mode), as PNG files.

    python -m benchmarks.plots results.jsonl [more.jsonl ...] --out plots/

Each figure holds the other sweep parameters fixed: a results file that swept two rates
gives one "vs number of adapters" figure per rate. Repeated runs of one setting are drawn as
their mean.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on the device or in CI
import matplotlib.pyplot as plt  # after use(): the backend is chosen first

from benchmarks.serving.report import load_results, mean_of_repeats

SWEPT = ("preset", "num_adapters", "rate", "alpha", "cv")
PANELS = (
    ("throughput_req_s", "throughput (req/s)"),
    ("avg_latency_s", "average latency (s)"),
    ("p99_ttft_s", "p99 time to first token (s)"),
)
X_LABELS = {
    "num_adapters": "number of adapters",
    "rate": "arrival rate (req/s)",
    "alpha": "popularity exponent α",
    "cv": "arrival coefficient of variation",
}


def series_name(row: dict[str, Any]) -> str:
    return row["variant"] if row["mode"] == "inprocess" else f"{row['variant']} ({row['mode']})"


def _context(x_key: str, context: tuple[Any, ...]) -> list[tuple[str, str]]:
    """The fixed parameters of a figure as (name, value) text pairs."""
    others = [k for k in SWEPT if k != x_key]
    return [
        (k, f"{v:g}" if isinstance(v, float) else str(v))
        for k, v in zip(others, context, strict=True)
    ]


def plot_against(rows: list[dict[str, Any]], x_key: str, out_dir: Path) -> list[Path]:
    """One PNG per combination of the other swept parameters that has two or more x values."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in SWEPT if k != x_key)].append(row)
    written = []
    for context, group in sorted(groups.items(), key=lambda item: str(item[0])):
        if len({r[x_key] for r in group}) < 2:
            continue
        fixed = _context(x_key, context)
        path = out_dir / f"vs_{x_key}_{'_'.join(k + v for k, v in fixed)}.png"
        _draw(group, x_key, path, title=", ".join(f"{k}={v}" for k, v in fixed))
        written.append(path)
    return written


def _draw(rows: list[dict[str, Any]], x_key: str, path: Path, title: str) -> None:
    by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_series[series_name(row)].append(row)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], PANELS, strict=True):
        for name, points in sorted(by_series.items()):
            points = sorted(
                (p for p in points if p.get(metric) is not None), key=lambda p: p[x_key]
            )
            ax.plot([p[x_key] for p in points], [p[metric] for p in points], marker="o", label=name)
        ax.set_xlabel(X_LABELS.get(x_key, x_key))
        ax.set_ylabel(label)
        if x_key == "num_adapters":
            ax.set_xscale("log")
        ax.set_ylim(bottom=0)  # differences look as large as they are
        ax.grid(True, alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("results", nargs="+", help="JSON-lines files of serving_bench")
    parser.add_argument("--out", default="plots", help="folder for the PNG files")
    args = parser.parse_args(argv)
    rows = mean_of_repeats(load_results(args.results))  # repeated runs: one point, the mean
    written = [p for x in X_LABELS for p in plot_against(rows, x, Path(args.out))]
    for path in written:
        print(path)
    if not written:
        print("nothing to plot: no parameter took two or more values with the others fixed")
    return written


if __name__ == "__main__":
    main()
