"""Site calibration: adapt a model to one site from photos of it that show no crack.

A model that has never seen a site's crack-free surfaces (formwork joints, block joints, texture)
flags some of them: 3 in 10 tiles of unseen crack-free walls in docs/field.md. Two steps, both from
a few crack-free photos of the site (docs/field.md, site calibration, for what each costs):

- ``head`` (default, when the model carries training anchors): the linear head is fitted again on
  the features of the site's crack-free photos (label: no crack) together with the features of
  :data:`ANCHORS` training tiles stored in the release file, pulled towards the trained head. The
  backbone is untouched. Measured: far fewer false alarms at a small cost in cracks found.
- ``threshold``: the threshold just above every crack-free photo (never lowered). After ``head``
  this runs too, on the refitted scores.

    python predict.py CRACK_FREE_PHOTOS... --calibrate-site site_model.pt [--localize]
    python predict.py NEW_PHOTOS... --checkpoint site_model.pt
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from crack_lightning.errors import InputError
from crack_lightning.files import path_text
from crack_lightning.models.anchors import (
    SITE_L2,
    SITE_SHARE,
    anchor_accuracy,
    linear_head,
    refit_linear,
)

MARGIN = 1e-5  # "just above": the highest crack-free score raises no alarm, in either engine (ONNX, PyTorch)


HIGH = 0.95  # a threshold above this finds only the clearest cracks: the user should check the photos






MODES = ("head", "threshold")


def site_threshold(probabilities: Sequence[float], stored: float = 0.0) -> float:
    """The lowest threshold at which none of these crack-free scores raises an alarm, never below
    the ``stored`` one: a few quiet photos are no evidence that a lower threshold is safe."""
    return max(float(max(probabilities)) + MARGIN, stored)


def photo_scores(predictor, paths: Sequence[Path], localize: bool, tile: int | None, stride: int | None) -> list[float]:
    """Each crack-free photo's crack probability as prediction answers it (:meth:`Predictor.answer`: a patch
    whole, a photo from its tiles), or with ``localize`` / ``tile`` its highest tile at those tiles."""
    from crack_lightning.data.images import decode_image
    from crack_lightning.errors import BadImageError
    from crack_lightning.inference.localize import localize_array

    scores = []
    for path in paths:
        try:
            image = decode_image(path)
        except BadImageError as exc:
            raise InputError(f"{path_text(path)} cannot be read ({exc}): calibrate on readable photos only") from None
        if localize or tile:
            scores.append(localize_array(image, predictor, tile or 0, stride, str(path)).probability)
        else:
            scores.append(predictor.answer(image, str(path)).probability)
    return scores


def photo_features(predictor, head: nn.Linear, paths: Sequence[Path], localize: bool, tile: int | None,
                   stride: int | None) -> tuple[list[float], list[torch.Tensor]]:
    """:func:`photo_scores`, plus each photo's features as ``head`` receives them (one row per image or tile
    scored), read off the live model by a forward hook: exactly what prediction computes."""
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach().float().cpu()))
    try:
        scores, sizes = [], []
        for path in paths:
            done = sum(len(f) for f in feats)
            scores += photo_scores(predictor, [path], localize, tile, stride)
            sizes.append(sum(len(f) for f in feats) - done)
        return scores, list(torch.cat(feats).split(sizes))
    finally:
        hook.remove()


def calibrate_site(checkpoint: Path, paths: Sequence[Path], out: Path, *, localize: bool = False,
                   tile: int | None = None, stride: int | None = None, device: str = "cpu", mode: str = "head",
                   threshold: float | None = None, anyway: bool = False) -> dict:
    """Write ``out``: the model of ``checkpoint`` adapted to the crack-free photos in ``paths``
    (``mode``, see the module docstring), starting from ``threshold`` (else the stored one). Photos the
    model is sure show a crack (>= :data:`HIGH`) are refused unless ``anyway``: calibrating on them
    teaches the model to miss cracks. Returns what was done (also stored in the new file's metrics)."""
    from crack_lightning.errors import ConfigError
    from crack_lightning.inference.predictor import Predictor
    from crack_lightning.models.checkpoint import save_release

    if Path(checkpoint).suffix == ".onnx":
        raise ConfigError("--calibrate-site needs a PyTorch model (.pt/.ckpt): calibrate first, then --export")
    if mode not in MODES:
        raise ConfigError(f"--calibrate-mode must be one of {', '.join(MODES)}, got {mode!r}")
    # the head's inputs are read off the live model
    predictor = Predictor(checkpoint, device=device, engine="torch", threshold=threshold)
    model = predictor.model
    before = float(predictor.threshold)
    head, anchors = linear_head(model), (getattr(model, "meta", {}) or {}).get("site_anchors")
    if mode == "head" and (head is None or not anchors):
        why = ("its head is not one linear layer" if head is None else
               "it carries no training anchors (trained before they were stored; tools/anchors.py adds them)")
        print(f"note: the head cannot be refitted for this model: {why}; moving the threshold only", file=sys.stderr)
        mode = "threshold"
    refit = None
    if mode == "threshold":
        scores = first = photo_scores(predictor, paths, localize, tile, stride)
    else:
        first, per_photo = photo_features(predictor, head, paths, localize, tile, stride)
    cracked = sorted(((p, str(path)) for p, path in zip(first, paths) if p >= HIGH), reverse=True)
    if cracked:
        shown = ", ".join(f"{path_text(path)} ({p:.3f})" for p, path in cracked[:3])
        said = (f"{len(cracked)} of the {len(first)} photos look cracked to the model (p >= {HIGH}): {shown}. "
                "Calibrating on them teaches it to miss such cracks")
        if not anyway:
            raise InputError(f"{said}: show it only photos without a crack, or add --calibrate-anyway")
        print(f"warning: {said}", file=sys.stderr)
    if mode == "head":
        site_x = torch.cat(per_photo)
        ax, ay = anchors["features"].float(), anchors["labels"].float()
        if ax.ndim != 2 or ax.shape[1:] != site_x.shape[1:] or len(ay) != len(ax):
            raise InputError(f"{path_text(checkpoint)}: its stored anchors do not fit its head "
                             f"({tuple(ax.shape)} vs features {tuple(site_x.shape)}): the file is damaged or edited")
        old = (head.weight.detach().float().cpu().clone(), head.bias.detach().float().cpu().clone())  # not views
        weight, bias = refit_linear(*old, ax, ay, site_x)
        # as the file will hold them (fp16): the threshold is chosen on the scores the saved model gives
        weight, bias = weight.half().float(), bias.half().float()
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            head.bias.copy_(bias.to(head.bias))
            # each photo's score as the adapted model predicts it: the refitted head on the same features
            scores = [float(torch.sigmoid(head(f.to(head.weight))).max()) for f in per_photo]
        refit = {"site_tiles": len(site_x), "anchors": len(ax), "share": SITE_SHARE, "l2": SITE_L2,
                 "anchor_accuracy_before": anchor_accuracy(ax, ay, *old, before)}
    threshold = site_threshold(scores, before)
    if refit:
        refit["anchor_accuracy"] = anchor_accuracy(ax, ay, weight, bias, threshold)
    ranked = sorted(zip(scores, map(str, paths)), reverse=True)
    if threshold >= 1.0:
        raise InputError(f"{path_text(ranked[0][1])} scores {ranked[0][0]:.6f}: no threshold below 1 silences it. "
                         "Calibrate only on photos that show no crack")
    model.threshold.fill_(threshold)  # the model already loaded to score the photos
    info = {"photos": len(scores), "tiles": localize, "mode": mode, "head_refit": refit,
            "threshold_before": round(before, 6),
            "threshold": round(threshold, 6), "alarms_before": sum(s >= before for s in first),
            "highest": [{"photo": p, "probability": round(s, 6)} for s, p in ranked[:5]]}
    metrics = dict(getattr(model, "meta", {}).get("metrics") or {})
    metrics["site_calibration"] = info
    save_release(model, out, metrics=metrics)
    return info


def report(info: dict, out: Path) -> None:
    """What the user reads: what moved (head, threshold), and what it costs."""
    of = f"the {info['photos']} crack-free photos" + ("' tiles" if info["tiles"] else "")
    refit = info.get("head_refit")
    if refit:
        tiles = f"{refit['site_tiles']} tiles of " if info["tiles"] else ""
        print(f"head refitted on {tiles}the {info['photos']} crack-free photos and {refit['anchors']} training "
              f"anchors (anchors right: {refit['anchor_accuracy_before']:.1%} before, {refit['anchor_accuracy']:.1%} now)")
    moved = (f"threshold {info['threshold_before']:.3f} -> {info['threshold']:.3f}"
             if info["threshold"] > info["threshold_before"] else f"threshold {info['threshold']:.3f} unchanged")
    if info["alarms_before"] == 0:
        print(f"{moved}: {of} raised no alarm before -> {path_text(out)}")
        return
    which = "had a tile that raised" if info["tiles"] else "raised"
    print(f"{moved}: {info['alarms_before']} of the {info['photos']} crack-free photos {which} an alarm before, "
          f"none does now -> {path_text(out)}")
    print("fewer cracks will be found too (docs/field.md, site calibration); use this model for this site: "
          f"predict.py PHOTOS --checkpoint {path_text(out)}", file=sys.stderr)
    if info["threshold"] >= HIGH:
        shown = ", ".join(f"{path_text(h['photo'])} ({h['probability']:.3f})" for h in info["highest"][:3])
        print(f"warning: the threshold is now {info['threshold']:.3f}: only the clearest cracks will be found. "
              f"Check that these photos really show no crack: {shown}", file=sys.stderr)


def is_site_model(path: Path) -> bool:
    """``ours`` for ``--calibrate-site``'s output check: only a model an earlier calibration wrote may be
    replaced, never another model file (a shipped model, a run's ``model.pt``)."""
    from crack_lightning.errors import CheckpointError
    from crack_lightning.models.checkpoint import RELEASE_FORMAT, read_checkpoint

    try:
        ckpt = read_checkpoint(path)
    except CheckpointError:
        return False
    return ckpt.get("format") == RELEASE_FORMAT and "site_calibration" in (ckpt.get("metrics") or {})
