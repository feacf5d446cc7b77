#!/usr/bin/env python
"""Hard negatives: the field model's head refitted on the crack-free tiles it wrongly flags (issue 27).

    python experiments/hard_negatives.py --field ../shared/data/field --out models/crack_lite0_site.pt

The field model (``models/crack_lite0_field.pt``) flags joints, block and stone walls, formwork and stains.
From the photos of ITS training split only (the split is rebuilt as in experiments/photo_answers.py), every
tile at 224 and 112 px is labelled from the mask (data/tiles.py: crack, no crack, or unused); the
crack-free tiles the model scores near or above its threshold are the hard negatives (its own mistakes),
and a sample of crack tiles keeps the cracks in view. The linear head is refitted on them plus the
training anchors the file carries (the refit of site calibration), the threshold then chosen on the
validation photos as the highest one that still flags ``--recall`` of the cracked photos. Scored on the
test photos, per source, against the model as it was. Features are cached (``--cache``): a second run
with other settings takes seconds. Writes the refitted model and results/hard_negatives/.
"""
from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_answers import classifier_test_photos  # noqa: E402 - the field model's split, rebuilt

from crack_lightning.data.tiles import TileRule  # noqa: E402
from crack_lightning.files import RESULTS_HELP, results_path, write_results  # noqa: E402
from crack_lightning.hardware import describe, machine  # noqa: E402

RULE = TileRule()


def photo_features(predictor, head, path: str):
    """Every tile's head input (N, D), each tile's label from the mask (1, 0, -1 unused), and whether the photo
    shows a crack."""
    from crack_lightning.data.images import decode_image
    from crack_lightning.inference.localize import localize_array

    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach().float().cpu()))
    try:
        loc = localize_array(decode_image(path), predictor)
    finally:
        hook.remove()
    stem = Path(path).stem
    mask_file = next((Path(path).parent.parent / "masks").glob(stem + ".*"), None)
    mask = np.asarray(Image.open(mask_file).convert("L")) > 127 if mask_file else np.zeros((loc.height, loc.width), bool)
    labels = [RULE.label(mask, t.x, t.y, t.width) for t in loc.tiles]
    return torch.cat(feats).half(), torch.tensor([-1 if v is None else v for v in labels]), bool(mask.any())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--field", default="../shared/data/field", type=Path)
    ap.add_argument("--model", default="models/crack_lite0_field.pt")
    ap.add_argument("--out", default="models/crack_lite0_site.pt")
    ap.add_argument("--cache", default="runs/hard_negatives/features.pt", type=Path)
    ap.add_argument("--per-source", type=int, default=60, help="training photos per source (all crack-free walls)")
    ap.add_argument("--mine", type=float, default=0.5, help="a crack-free tile scoring at least this x the threshold is hard")
    ap.add_argument("--share", type=float, default=0.5, help="weight of the mined tiles against the anchors")
    ap.add_argument("--recall", type=float, default=0.97, help="cracked validation photos the threshold keeps")
    ap.add_argument("--unseen", nargs="*", default=[], metavar="SOURCE",
                    help="sources whose training tiles are not mined (is what it learns of walls true of walls unseen?)")
    ap.add_argument("--results", default=None, help=RESULTS_HELP)
    args = ap.parse_args()
    from crack_lightning.inference.predictor import Predictor
    from crack_lightning.models.anchors import linear_head, refit_linear
    from crack_lightning.models.checkpoint import save_release

    predictor = Predictor(args.model, engine="torch", num_workers=0)
    model = predictor.model
    head = linear_head(model)
    w0, b0, t0 = head.weight.detach().float().clone(), head.bias.detach().float().clone(), float(predictor.threshold)
    if args.cache.is_file():
        data = torch.load(args.cache, weights_only=False)
    else:
        split = classifier_test_photos(args.field)
        rng = random.Random(0)
        by_source: dict[str, list[str]] = defaultdict(list)
        for p, s in sorted(split.items()):
            if s == "train":
                by_source[Path(p).parts[-3]].append(p)
        chosen = [p for src, ps in sorted(by_source.items())
                  for p in (ps if src == "concrete_nocrack" else rng.sample(ps, min(len(ps), args.per_source)))]
        chosen += sorted(p for p, s in split.items() if s in ("val", "test"))
        data = {}
        for p in tqdm(chosen, desc="tile features"):
            data[p] = (split[p], *photo_features(predictor, head, p))
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, args.cache)
    prob = lambda x, w, b: torch.sigmoid(x.float() @ w.T + b).squeeze(1)  # noqa: E731
    train = [(x, y) for p, (s, x, y, _) in data.items() if s == "train" and Path(p).parts[-3] not in args.unseen]
    xs = torch.cat([x for x, _ in train])
    ys = torch.cat([y for _, y in train])
    scores = prob(xs, w0, b0)
    hard = (ys == 0) & (scores >= args.mine * t0)
    cracks = torch.nonzero(ys == 1).flatten()
    cracks = cracks[torch.randperm(len(cracks), generator=torch.Generator().manual_seed(0))[: int(hard.sum())]]
    site_x = torch.cat([xs[hard], xs[cracks]])
    site_y = torch.cat([torch.zeros(int(hard.sum())), torch.ones(len(cracks))])
    anchors = model.meta["site_anchors"]
    w, b = refit_linear(w0, b0, anchors["features"].float(), anchors["labels"].float(), site_x, share=args.share,
                        site_y=site_y)
    w, b = w.half().float(), b.half().float()  # as the file holds them

    def photos(split: str, w, b):
        return [(Path(p).parts[-3], cracked, float(prob(x, w, b).max())) for p, (s, x, _, cracked) in data.items()
                if s == split]

    def photo_threshold(w, b) -> float:
        """The highest threshold that still flags ``--recall`` of the cracked validation photos."""
        cracked_scores = sorted(s for _, c, s in photos("val", w, b) if c)
        return cracked_scores[int(np.floor((1 - args.recall) * len(cracked_scores)))]

    threshold = photo_threshold(w, b)
    table, results = [], {"hardware": machine(), "settings": vars(args) | {"field": str(args.field), "cache": str(args.cache)},
                          "hard_negatives": int(hard.sum()), "crack_tiles": len(cracks), "threshold": threshold,
                          "threshold_before": t0, "test": {}}
    variants = {"before": (w0, b0, t0), "threshold only": (w0, b0, photo_threshold(w0, b0)),
                "after": (w, b, threshold)}
    results["threshold_only"] = variants["threshold only"][2]
    for name, (ww, bb, tt) in variants.items():
        rates: dict[str, list] = defaultdict(lambda: [0, 0])
        for src, c, s in photos("test", ww, bb):
            key = f"{src}/{'crack' if c else 'no crack'}"
            rates[key][0] += s >= tt
            rates[key][1] += 1
        results["test"][name] = {k: v for k, v in sorted(rates.items())}
    for key in results["test"]["before"]:
        (kb, n), (kt, _), (ka, _) = (results["test"][v][key] for v in variants)
        table.append(f"| {key} | {n} | {kb / n:.0%} ({kb}) | {kt / n:.0%} ({kt}) | **{ka / n:.0%}** ({ka}) |")
    md = [f"# Hard negatives: the field model's head refitted ({describe(results['hardware'])})", "",
          f"{int(hard.sum())} crack-free training tiles the model scored >= {args.mine} x its threshold, {len(cracks)} "
          f"crack tiles, share {args.share}{'; not mined: ' + ', '.join(args.unseen) if args.unseen else ''}; threshold {t0:.3f} -> {threshold:.3f} (keeps {args.recall:.0%} of the "
          "cracked validation photos). Test photos of the field model's split, flagged (any tile at the threshold):",
          f"'threshold only': the model as it was at the threshold chosen the same way ({results['threshold_only']:.3f}).",
          "", "| source / photos show | n | before | threshold only | after (refit + threshold) |", "|---|---|---|---|---|",
          *table]
    write_results(results_path(args.results, "hard_negatives"), results, "\n".join(md) + "\n")
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    model.threshold.fill_(threshold)
    metrics = dict(model.meta.get("metrics") or {})
    metrics["hard_negatives"] = {k: results[k] for k in ("hard_negatives", "crack_tiles", "threshold", "threshold_before", "test")}
    save_release(model, args.out, metrics=metrics)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
