#!/usr/bin/env python
"""Which rule turns a photo's tiles into its answer? Rules compared on the site model's tiles (issue 27).

    python experiments/photo_rules.py --field ../shared/data/field

Every validation and test photo of the field model's split (rebuilt as in experiments/photo_answers.py)
is tiled once by the default photo model (``models/crack_lite0_site.pt``, 224 and 112 px tiles); the
tile scores are cached (``--cache``). Each rule below then gets ONE threshold, chosen on the validation
photos as the highest that still flags ``--recall`` of the cracked ones (the shipped model's criterion),
and is scored on the test photos. The rule is chosen on validation (fewest crack-free photos flagged,
then most cracked ones); the test photos only report. Writes results/photo_rules/.

``--segmenter MODEL`` adds rules that ask a crack map too (a segmentation model trained on the same split:
``train.py --config configs/segment.yaml``): "confirmed, L px" scores a photo by its best tile that a crack
at least L px long runs through (L over a grid; the chosen L is the longest for which a threshold still
keeps ``--recall`` of the cracked validation photos), "crack map alone" by its longest crack.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_answers import classifier_test_photos  # noqa: E402 - the field model's split, rebuilt

from crack_lightning.files import RESULTS_HELP, results_path, write_results  # noqa: E402
from crack_lightning.hardware import describe, machine  # noqa: E402


def _inside(small, big) -> bool:
    return big[0] <= small[0] and big[1] <= small[1] and small[0] + small[2] <= big[0] + big[2] \
        and small[1] + small[2] <= big[1] + big[2]


def rule_scores(tiles: np.ndarray) -> dict[str, float]:
    """A photo's score under each rule; ``tiles`` rows are (x, y, side, probability)."""
    p = tiles[:, 3]
    big, small = tiles[tiles[:, 2] == tiles[:, 2].max()], tiles[tiles[:, 2] < tiles[:, 2].max()]
    top = np.sort(p)[::-1]
    # a small tile counts as much as the best large tile around it agrees (a crack is seen at both scales)
    agree = max((min(s[3], max(b[3] for b in big if _inside(s, b))) for s in small), default=float(big[:, 3].max()))
    return {
        "max tile (shipped)": float(top[0]),
        "2nd highest tile": float(top[1]) if len(top) > 1 else float(top[0]),
        "max 224 px tile": float(big[:, 3].max()),
        "max 112 px tile": float(small[:, 3].max()) if len(small) else float(big[:, 3].max()),
        "both scales agree": float(max(agree, 0.0)),
        "mean of top 3": float(top[:3].mean()),
    }


LENGTHS = (0, 20, 40, 60, 80, 120, 160, 240)  # px: the crack a confirming tile must be crossed by


def crack_lengths(data: dict, model_path: str, cache: Path) -> dict[str, np.ndarray]:
    """Per photo, per tile (the order of its cached tiles): the longest crack of the crack map through it."""
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    from crack_lightning.data.images import decode_image
    from crack_lightning.inference.segment import load_segmenter, segment_array
    from crack_lightning.measure import longest_crack_in

    model = load_segmenter(model_path, "cpu", "auto")
    out = {}
    for path, (_, _, _, tiles) in tqdm(sorted(data.items()), desc="crack maps"):
        seg = segment_array(decode_image(path), model, path)
        out[path] = np.array(longest_crack_in(seg.mask, [(int(x), int(y), int(s), int(s)) for x, y, s, _ in tiles]))
    torch.save(out, cache)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--field", default="../shared/data/field", type=Path)
    ap.add_argument("--model", default="models/crack_lite0_site.pt")
    ap.add_argument("--cache", default="runs/photo_rules/tiles.pt", type=Path)
    ap.add_argument("--recall", type=float, default=0.97, help="cracked validation photos the threshold keeps")
    ap.add_argument("--segmenter", default=None, help="a segmentation model trained on the same split")
    ap.add_argument("--results", default=None, help=RESULTS_HELP)
    args = ap.parse_args()
    if args.cache.is_file():
        data = torch.load(args.cache, weights_only=False)
    else:
        from crack_lightning.data.images import decode_image
        from crack_lightning.inference.localize import localize_array
        from crack_lightning.inference.predictor import Predictor

        predictor = Predictor(args.model, num_workers=0)
        split = classifier_test_photos(args.field)
        data = {}
        for path in tqdm(sorted(p for p, s in split.items() if s in ("val", "test")), desc="photos"):
            loc = localize_array(decode_image(path), predictor)
            stem = Path(path).stem
            mask_file = next((Path(path).parent.parent / "masks").glob(stem + ".*"), None)
            cracked = bool(mask_file and (np.asarray(Image.open(mask_file).convert("L")) > 127).any())
            tiles = np.array([(t.x, t.y, t.width, t.probability) for t in loc.tiles], np.float64)
            data[path] = (split[path], Path(path).parts[-3], cracked, tiles)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, args.cache)

    scored = {p: (s, src, c, rule_scores(t)) for p, (s, src, c, t) in data.items()}
    if args.segmenter:
        lengths = crack_lengths(data, args.segmenter, args.cache.with_name(f"cracks_{Path(args.segmenter).parent.name}.pt"))
        for p, (_, _, _, t) in data.items():
            rules_of = scored[p][3]
            for L in LENGTHS:
                rules_of[f"confirmed, {L} px"] = float(np.max(np.where(lengths[p] >= max(L, 1e-9), t[:, 3], 0.0)))
            rules_of["crack map alone (px)"] = float(lengths[p].max())
    rules = list(next(iter(scored.values()))[3])
    results = {"hardware": machine(), "settings": {"model": args.model, "recall": args.recall,
                                                        "segmenter": args.segmenter}, "rules": {}}
    rows = []
    for rule in rules:
        cracked_val = sorted(r[rule] for s, _, c, r in scored.values() if s == "val" and c)
        threshold = cracked_val[int(np.floor((1 - args.recall) * len(cracked_val)))]
        rates: dict[str, dict[str, list[int]]] = {"val": defaultdict(lambda: [0, 0]), "test": defaultdict(lambda: [0, 0])}
        for s, src, c, r in scored.values():
            for key in (f"{src}/{'crack' if c else 'no crack'}", "all/crack" if c else "all/no crack"):
                rates[s][key][0] += r[rule] >= threshold
                rates[s][key][1] += 1
        results["rules"][rule] = {"threshold": threshold, **{s: dict(sorted(v.items())) for s, v in rates.items()}}
        cell = lambda s, k: "{}/{}".format(*rates[s].get(k, [0, 0]))  # noqa: E731
        rows.append(f"| {rule} | {threshold:.4f} | {cell('val', 'all/crack')} | {cell('val', 'concrete_nocrack/no crack')} "
                    f"| {cell('val', 'all/no crack')} | {cell('test', 'all/crack')} | "
                    f"{cell('test', 'concrete_nocrack/no crack')} | {cell('test', 'all/no crack')} |")
    feasible = [r for r in rules if r.startswith("confirmed") and results["rules"][r]["threshold"] > 0]
    if feasible:  # the longest confirming crack that still lets a threshold keep the recall target
        results["chosen_length_rule"] = feasible[-1]
        rows = [row.replace(f"| {feasible[-1]} |", f"| **{feasible[-1]}** (chosen) |", 1) for row in rows]
    n_val = sum(s == "val" for s, *_ in scored.values())
    md = [f"# Photo rules over the site model's tiles ({describe(results['hardware'])})", "",
          f"`python experiments/photo_rules.py` - model `{args.model}`; each rule's threshold = the highest that flags "
          f"{args.recall:.0%} of the cracked validation photos ({n_val} validation photos); flagged photos:", "",
          "| rule | threshold | val cracked | val crack-free walls | val all crack-free | test cracked | "
          "test crack-free walls | test all crack-free |", "|---|---|---|---|---|---|---|---|", *rows]
    write_results(results_path(args.results, "photo_rules"), results, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
