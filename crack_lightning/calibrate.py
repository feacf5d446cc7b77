"""Site calibration: a decision threshold of the site's own, from photos of it that show no crack.

A model that has never seen a site's crack-free surfaces (formwork joints, block joints, texture)
flags some of them: 3 in 10 tiles of unseen crack-free walls in docs/field.md. Photographing a few
crack-free spots of the site and setting the threshold just above every one of them cuts those
alarms without any training, at a measured cost in cracks found (docs/field.md, site calibration).

    python predict.py CRACK_FREE_PHOTOS... --calibrate-site site_model.pt [--localize]
    python predict.py NEW_PHOTOS... --checkpoint site_model.pt
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .errors import InputError
from .io import path_text

MARGIN = 1e-6  # "just above": the highest crack-free score itself raises no alarm
HIGH = 0.95  # a threshold above this finds only the clearest cracks: the user should check the photos


def site_threshold(probabilities: Sequence[float], stored: float = 0.0) -> float:
    """The lowest threshold at which none of these crack-free scores raises an alarm, never below
    the ``stored`` one: a few quiet photos are no evidence that a lower threshold is safe."""
    return max(float(max(probabilities)) + MARGIN, stored)


def photo_scores(predictor, paths: Sequence[Path], localize: bool, tile: int, stride: int | None) -> list[float]:
    """Each crack-free photo's highest crack probability: of the whole image, or with ``localize``
    of its tiles (the scores ``predict.py --localize`` thresholds)."""
    from .images import BadImageError
    from .localize import localize as localize_photo

    if not localize:
        rows = list(predictor.iter_rows(paths))
        bad = [r for r in rows if r.error]
        if bad:
            raise InputError(f"{len(bad)} photo(s) cannot be read (e.g. {path_text(bad[0].path)}: {bad[0].error}): "
                             "calibrate on readable photos only")
        return [float(r.probability) for r in rows]
    scores = []
    for path in paths:
        try:
            loc, _ = localize_photo(path, predictor, tile, stride, progress=False)
        except BadImageError as exc:
            raise InputError(f"{path_text(path)} cannot be read ({exc}): calibrate on readable photos only") from None
        scores.append(max(t.probability for t in loc.tiles))
    return scores


def calibrate_site(checkpoint: Path, paths: Sequence[Path], out: Path, *, localize: bool = False,
                   tile: int = 227, stride: int | None = None, device: str = "cpu") -> dict:
    """Write ``out``: the model of ``checkpoint`` with the threshold just above every crack-free
    photo in ``paths``. Returns what was done (also stored in the new file's metrics)."""
    from .checkpoint import save_release
    from .errors import ConfigError
    from .predict import Predictor

    if Path(checkpoint).suffix == ".onnx":
        raise ConfigError("--calibrate-site needs a PyTorch model (.pt/.ckpt): calibrate first, then --export")
    predictor = Predictor(checkpoint, device=device)
    scores = photo_scores(predictor, paths, localize, tile, stride)
    before = float(predictor.threshold)
    threshold = site_threshold(scores, before)
    ranked = sorted(zip(scores, map(str, paths)), reverse=True)
    if threshold >= 1.0:
        raise InputError(f"{path_text(ranked[0][1])} scores {ranked[0][0]:.6f}: no threshold below 1 silences it. "
                         "Calibrate only on photos that show no crack")
    model = predictor.model  # the model already loaded to score the photos: only its threshold moves
    model.threshold.fill_(threshold)
    info = {"photos": len(scores), "tiles": localize, "threshold_before": round(before, 6),
            "threshold": round(threshold, 6), "alarms_before": sum(s >= before for s in scores),
            "highest": [{"photo": p, "probability": round(s, 6)} for s, p in ranked[:5]]}
    metrics = dict(getattr(model, "meta", {}).get("metrics") or {})
    metrics["site_calibration"] = info
    save_release(model, out, metrics=metrics)
    return info


def report(info: dict, out: Path) -> None:
    """What the user reads: the threshold move, and what it costs."""
    of = f"the {info['photos']} crack-free photos" + ("' tiles" if info["tiles"] else "")
    if info["alarms_before"] == 0:
        print(f"threshold {info['threshold']:.3f} unchanged: it raises no alarm on {of} already -> {path_text(out)}")
        return
    which = "had a tile that raised" if info["tiles"] else "raised"
    print(f"threshold {info['threshold_before']:.3f} -> {info['threshold']:.3f}: {info['alarms_before']} of the "
          f"{info['photos']} crack-free photos {which} an alarm, none does now -> {path_text(out)}")
    print("fewer cracks will be found too (docs/field.md, site calibration); use this model for this site: "
          f"predict.py PHOTOS --checkpoint {path_text(out)}", file=sys.stderr)
    if info["threshold"] >= HIGH:
        shown = ", ".join(f"{path_text(h['photo'])} ({h['probability']:.3f})" for h in info["highest"][:3])
        print(f"warning: the threshold is now {info['threshold']:.3f}: only the clearest cracks will be found. "
              f"Check that these photos really show no crack: {shown}", file=sys.stderr)


def is_release(path: Path) -> bool:
    """``ours`` for the output check: a release model file this project wrote may be replaced."""
    from .checkpoint import RELEASE_FORMAT, CheckpointError, read_checkpoint

    try:
        return read_checkpoint(path).get("format") == RELEASE_FORMAT
    except CheckpointError:
        return False
