"""Evaluation report for labelled predictions: pictures people read faster than tables.

Writes ``confusion_matrix.png``, ``roc.png``, ``precision_recall.png``,
``histogram.png`` (probability per true class, with the threshold),
``mistakes.png`` (the most confident wrong answers) and ``report.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    binary_precision_recall_curve,
    binary_roc,
)

from crack_lightning.data.images import decode_image
from crack_lightning.errors import BadImageError
from crack_lightning.files import PNG_METADATA, atomic_write, path_text, write_json
from crack_lightning.models.metrics import binary_metrics


def _save(fig, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(fig)


def make_report(paths: Sequence[str], probs: Sequence[float], labels: Sequence[int], threshold: float,
                out_dir: str | Path, class_names: Sequence[str], title: str = "", n_mistakes: int = 16) -> dict:
    """Write the report files into ``out_dir``; return the ``report.json`` content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = torch.tensor(list(probs), dtype=torch.float32)
    y = torch.tensor(list(labels), dtype=torch.long)
    m = binary_metrics(p, y, threshold)
    neg, pos = class_names
    suffix = f" — {path_text(title)}" if title else ""

    # confusion matrix
    cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        share = v / max(cm[i].sum(), 1)
        ax.text(j, i, f"{v}\n({share:.1%})", ha="center", va="center", fontsize=12,
                color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks([0, 1], [neg, pos])
    ax.set_yticks([0, 1], [neg, pos])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix{suffix}\naccuracy {m['acc']:.4f}, threshold {threshold:.3f}", fontsize=10)
    _save(fig, out / "confusion_matrix.png")

    both = bool(y.any()) and not bool(y.all())
    if both:
        fpr, tpr, _ = binary_roc(p, y)
        fig, ax = plt.subplots(figsize=(4.6, 4))
        ax.plot(fpr, tpr, lw=2, label=f"AUROC {m['auroc']:.4f}")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.scatter([m["fp"] / max(m["fp"] + m["tn"], 1)], [m["recall"]], color="red", zorder=3,
                   label="operating point")
        ax.set_xscale("symlog", linthresh=1e-3)  # near-perfect models live in the first 1%
        ax.set_xlim(0, 1)
        ax.set_xlabel("false-positive rate (log scale above 0.001)")
        ax.set_ylabel("true-positive rate (recall)")
        ax.set_title(f"ROC{suffix}", fontsize=10)
        ax.legend(loc="lower right")
        _save(fig, out / "roc.png")

        prec, rec, _ = binary_precision_recall_curve(p, y)
        fig, ax = plt.subplots(figsize=(4.6, 4))
        ax.plot(rec, prec, lw=2)
        ax.scatter([m["recall"]], [m["precision"]], color="red", zorder=3, label="operating point")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_ylim(min(0.5, float(prec.min())), 1.01)
        ax.set_title(f"Precision-recall{suffix}", fontsize=10)
        ax.legend(loc="lower left")
        _save(fig, out / "precision_recall.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0, 1, 41)
    for label, name, color in ((0, neg, "tab:blue"), (1, pos, "tab:orange")):
        ax.hist(p[y == label].numpy(), bins=bins, alpha=0.6, label=f"true {name} ({int((y == label).sum())})",
                color=color)
    ax.axvline(threshold, color="red", ls="--", label=f"threshold {threshold:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel(f"predicted probability of {pos}")
    ax.set_ylabel("images (log scale)")
    ax.set_title(f"Probability by true class{suffix}", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, out / "histogram.png")

    # worst mistakes: wrong side of the threshold, furthest from it
    wrong = [(abs(float(p[i]) - threshold), i) for i in range(len(p)) if int(p[i] >= threshold) != int(y[i])]
    wrong.sort(reverse=True)
    shown = wrong[:n_mistakes]
    cols = 4
    rows = max(1, (len(shown) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, i) in zip(axes.flat, shown):
        try:
            ax.imshow(decode_image(paths[i]))
        except BadImageError:
            pass
        ax.set_title(f"true {class_names[int(y[i])]}\np={float(p[i]):.3f}\n{path_text(Path(paths[i]).name)}", fontsize=8)
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=14)
    fig.suptitle(f"Worst mistakes ({len(wrong)} in all){suffix}", fontsize=11)
    _save(fig, out / "mistakes.png")

    report = {
        "title": title, "threshold": threshold, "metrics": m, "class_names": list(class_names),
        "mistakes": [{"path": paths[i], "true": class_names[int(y[i])], "probability": float(p[i])}
                     for _, i in wrong],
        "files": sorted(f.name for f in out.glob("*.png")),
    }
    write_json(out / "report.json", report)
    return report


