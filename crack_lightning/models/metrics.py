"""Binary metrics and the decision-threshold rule, shared by training, prediction and reports.

Computed on the full set of probabilities (gathered across processes) rather
than accumulated per batch, so that the threshold chosen on validation and the
numbers reported are exact and identical everywhere.
"""
from __future__ import annotations

import torch


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, rule: str = "f1", target_fpr: float = 0.001) -> float:
    """Pick the decision threshold on validation data.

    ``f1``: the threshold that maximises F1 (ties: the one nearest 0.5).
    ``fpr``: recall first, as an inspector wants: the lowest threshold whose
    false-positive rate stays within ``target_fpr``. ``fixed``: 0.5.
    Thresholds sit half-way between neighbouring probabilities so they generalise.
    """
    probs = probs.detach().double().flatten().cpu()
    labels = labels.detach().flatten().cpu().bool()
    if rule == "fixed" or labels.all() or not labels.any():
        return 0.5
    order = torch.argsort(probs, descending=True)
    p, y = probs[order], labels[order]
    tp = torch.cumsum(y.double(), 0)
    fp = torch.cumsum((~y).double(), 0)
    nxt = torch.cat([p[1:], p.new_zeros(1)])
    cuts = (p + nxt) / 2
    distinct = torch.ones_like(p, dtype=torch.bool)  # only cut between distinct probabilities
    distinct[:-1] = p[:-1] != p[1:]
    if rule == "fpr":
        allowed = int(target_fpr * int((~y).sum()))
        ok = torch.nonzero((fp <= allowed) & distinct).flatten()
        return float(cuts[int(ok.max())]) if len(ok) else float(p[0]) + 1e-9
    f1 = 2 * tp / (tp + fp + y.sum())
    f1 = torch.where(distinct, f1, torch.full_like(f1, -1.0))
    best = f1.max()
    candidates = cuts[f1 >= best - 1e-12]
    return float(candidates[torch.argmin((candidates - 0.5).abs())])


def binary_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5,
                   decided: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy, precision, recall, F1, AUROC and the confusion counts at ``threshold`` (or of the
    ``decided`` crack answers, where they were not all made at one threshold)."""
    probs = probs.detach().float().flatten().cpu()
    labels = labels.detach().flatten().cpu().long()
    pred = (probs >= threshold).long() if decided is None else decided.flatten().cpu().long()
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    n = max(tp + tn + fp + fn, 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    both = bool(labels.any()) and not bool(labels.all())
    auroc = float("nan")
    if both:  # torchmetrics costs a second at start-up: imported when an AUROC is asked for
        from torchmetrics.functional.classification import binary_auroc

        auroc = float(binary_auroc(probs, labels))
    return {
        "acc": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1, "auroc": auroc,
        "tp": tp, "tn": tn, "fp": fp, "fn": fn, "n": tp + tn + fp + fn, "threshold": float(threshold),
    }
