"""Loss curves of metrics.jsonl files: one run's train and held-out loss (loss.png), or several
runs side by side (docs/results.md). Needs matplotlib (skipped with a warning without it)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path


def read_metrics(file: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(file).read_text().splitlines() if line.strip()]


def _points(records: list[dict], key: str, min_tokens: int = 0) -> list[tuple[int, float]]:
    """(tokens, value) of the records holding key; a null value (non-finite) is a gap."""
    return [(r["tokens"], math.nan if r[key] is None else r[key])
            for r in records if key in r and r["tokens"] >= min_tokens]


def _plot(curves: list[tuple[str, list, str, dict]], png: str | Path, title: str) -> bool:
    """(label, points, format, style) curves of loss against tokens into png, replaced atomically;
    False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the loss plot", stacklevel=3)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts, fmt, style in curves:
        if pts:
            ax.plot(*zip(*pts), fmt, label=label, **style)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png).with_name(f".{Path(png).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return True


def plot_metrics(metrics_file: str | Path, png: str | Path, title: str | None = None) -> bool:
    """Train and held-out loss of one run against tokens."""
    records = read_metrics(metrics_file)
    return _plot([("train", _points(records, "loss"), "-", dict(lw=1, alpha=0.7)),
                  ("held-out", _points(records, "val_loss"), "o-", dict(ms=3))],
                 png, title or Path(metrics_file).parent.name)


def plot_runs(runs: dict[str, str | Path], png: str | Path, title: str = "held-out loss",
              key: str = "val_loss", min_tokens: int = 0) -> bool:
    """Held-out (or train, key="loss") loss of several runs against tokens: {label: metrics.jsonl}.

    min_tokens: leave out earlier points (zoom on the tail, where runs differ)."""
    fmt = "o-" if key == "val_loss" else "-"
    return _plot([(label, _points(read_metrics(file), key, min_tokens), fmt, dict(ms=3, lw=1))
                  for label, file in runs.items()], png, title)
