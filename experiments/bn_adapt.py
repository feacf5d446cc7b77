#!/usr/bin/env python
"""Can a model adapt to a new site from its unlabelled photos? Batch-norm re-estimation (AdaBN).

    python experiments/bn_adapt.py --run RUN_DIR --field ../shared/data/field

AdaBN (Li et al. 2016) re-estimates every batch-norm layer's running mean and variance on photos of
the target domain, no labels needed, then predicts as before. Measured on the rissbilder
leave-one-source-out fold (RUN_DIR: a model trained without either concrete-wall source), tiles by
the issue-15 protocol (experiments/loso.py), at the model's stored threshold:

- ``site``: statistics from half of the held-out photos of both wall sources (crack and crack-free,
  as a user's site folder would be), scores on the other half, then the halves swapped;
- ``crack_free``: statistics from half of the crack-free wall photos only (what a user who
  calibrates a site shows it), false alarms on the other half, scores on every rissbilder photo.

Writes the figures beside the unadapted ones (``--out``). No weight is trained.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
from loso import scores, tile_batches  # noqa: E402

from crack_lightning.files import RESULTS_HELP as OUT_HELP
from crack_lightning.files import results_path, write_results
from crack_lightning.hardware import machine as hardware
from crack_lightning.inference.predictor import Predictor


@torch.no_grad()
def reestimate_bn(model: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> None:
    """Replace every batch-norm layer's running statistics by those of ``images`` (cumulative mean)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(images), batch):
        model(images[order[i:i + batch]])
    model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the rissbilder-fold run folder (model.pt)")
    ap.add_argument("--field", default="../shared/data/field")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args()
    out = results_path(args.out, "bn_adapt")

    predictor = Predictor(Path(args.run) / "model.pt", num_workers=0, engine="torch")  # adapts the live model
    model, thr = predictor.model, float(predictor.threshold)
    if not isinstance(model, torch.nn.Module):
        sys.exit("bn_adapt.py: needs a PyTorch checkpoint, not an ONNX file")

    def load(source: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        records, batches = tile_batches(predictor.pre, [Path(args.field) / source])
        return torch.cat(list(batches)), torch.tensor([float(r.label) for r in records]), [r.path for r in records]

    xw, _, pw = load("concrete_nocrack")
    xr, yr, pr = load("rissbilder")

    @torch.no_grad()
    def probs(x: torch.Tensor) -> torch.Tensor:
        model.eval()
        return torch.cat([predictor.probabilities(x[i:i + 64]) for i in range(0, len(x), 64)])

    def row(walls: torch.Tensor, riss: torch.Tensor) -> dict:
        return {"false_alarms_crack_free_walls": round(float((walls >= thr).float().mean()), 4),
                "n_walls": len(walls), "rissbilder": scores(riss, yr, thr)}

    start = {k: v.clone() for k, v in model.state_dict().items()}
    results = {"hardware": hardware(), "run": args.run, "threshold": round(thr, 4), "modes": {}}
    results["modes"]["stored"] = row(probs(xw), probs(xr))

    photos = sorted(set(pw + pr))
    random.Random(0).shuffle(photos)
    half = set(photos[::2])
    in_w, in_r = torch.tensor([p in half for p in pw]), torch.tensor([p in half for p in pr])
    sw, sr = torch.zeros(len(xw)), torch.zeros(len(xr))
    for side in (True, False):
        model.load_state_dict(start)
        reestimate_bn(model, torch.cat([xw[in_w == side], xr[in_r == side]]))
        sw[in_w != side], sr[in_r != side] = probs(xw[in_w != side]), probs(xr[in_r != side])
    results["modes"]["site"] = row(sw, sr)

    walls = sorted(set(pw))
    random.Random(1).shuffle(walls)
    shown = torch.tensor([p in set(walls[: len(walls) // 2]) for p in pw])
    model.load_state_dict(start)
    results["modes"]["crack_free_unadapted"] = row(probs(xw[~shown]), probs(xr))
    reestimate_bn(model, xw[shown])
    results["modes"]["crack_free"] = row(probs(xw[~shown]), probs(xr))

    md = ["| batch-norm statistics from | false alarms, crack-free walls | rissbilder precision | recall | F1 |",
          "|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        t = r["rissbilder"]
        md.append(f"| {mode} | {r['false_alarms_crack_free_walls']:.1%} of {r['n_walls']} | {t['precision']:.3f} | "
                  f"{t['recall']:.3f} | {t['f1']:.3f} |")
    write_results(out, results, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
