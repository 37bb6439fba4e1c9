"""The pictures: each phase's loss and learning-rate curves, and the evaluation's per-category scores, as small PNGs.

Drawn with matplotlib's Agg backend (no display), imported only when a picture is drawn: the training process
and the stages that draw nothing never pay for importing it. The same files are shown in the Dagster asset
metadata (`png_markdown`: markdown with the picture inline) and by `dvc plots show` (dvc.yaml's `plots:`).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

DPI = 80  # small files: a 6.4 x 3.2 inch figure is 512 x 256 pixels, about 20-30 KB


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; the training process may run where there is none
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> bytes:
    """The figure as PNG bytes, written atomically to `path` (without a timestamp: same numbers, same file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    _pyplot().close(fig)
    data = buf.getvalue()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return data


def loss_plot(records: list[dict], path: Path, title: str) -> bytes:
    """Loss (left) and learning rate (right) against the optimizer step, from the metrics records."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(6.4, 3.2), constrained_layout=True)
    ax_loss.plot(
        steps, [r["loss"] for r in records], marker="." if len(records) < 50 else None, color="tab:blue", linewidth=2
    )
    ax_loss.set(title=f"{title}: loss", xlabel="step", ylabel="loss")
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange", linewidth=2)
    ax_lr.set(title=f"{title}: learning rate", xlabel="step", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def scores_plot(by_category: dict[str, dict], path: Path, title: str = "evaluation") -> bytes:
    """One bar per category: its score (`accuracy`, 0-1), labelled with the metric and the question count."""
    plt = _pyplot()
    names = list(by_category)
    scores = [float(by_category[c]["accuracy"]) for c in names]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), constrained_layout=True)
    bars = ax.bar(range(len(names)), scores, color="tab:green")
    ax.set_xticks(range(len(names)), [f"{c}\n{by_category[c]['metric']}, n={by_category[c]['n']}" for c in names])
    ax.tick_params(axis="x", labelsize=7)
    ax.set(title=f"{title}: score per category", ylabel="score", ylim=(0, 1.05))
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown showing the picture inline (a data: URI), as the Dagster UI renders a markdown metadata value."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
