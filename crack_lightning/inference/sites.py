"""Site profiles: an inspector's marks on one site's photos, and the photo model refitted on them.

An inspector marks a photo, or one tile of it, as "crack" or "no crack" (a whole photo marked "crack"
stands for its most crack-like tiles: where the crack is, it does not say). Each mark stores the photo
model's features of what was marked (the head's inputs, as :mod:`~crack_lightning.inference.calibrate`
reads them), so a refit never needs the photo again. After every mark the head is refitted on all the site's
marks plus the training anchors the model file carries (:func:`~crack_lightning.models.anchors.refit_linear`),
the threshold is raised just above every "no crack" mark (never lowered), and the result is saved as an
ordinary release file: ``predict.py --model <site>/model.pt`` answers exactly as the server does for the site.

    <root>/<site>/model.pt       the site's photo model (what GET /v1/sites/<site>/model exports)
    <root>/<site>/features.pt    the marks' features and labels
    <root>/<site>/marks.jsonl    one line per mark: who, when, which photo (name, sha256), which tile, label
    <root>/<site>/log.jsonl      every mark, refit and reset: who, when, what
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from crack_lightning.data.tiles import photo_tile_count
from crack_lightning.errors import InputError
from crack_lightning.files import atomic_write
from crack_lightning.inference.calibrate import site_threshold
from crack_lightning.limits import SERVER_MAX_TILES, SITE_MAX_FEATURES
from crack_lightning.models.anchors import linear_head, refit_linear

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LABELS = ("no crack", "crack")
CRACK_PHOTO_TILES = 4  # a whole photo marked "crack" teaches its this many most crack-like tiles


def check_site(name: str) -> str:
    """A site name is a folder name: letters, digits, ``_ . -``, at most 64, never a path."""
    if not SITE_NAME.match(name or "") or ".." in name:
        raise InputError(f"site names are 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                         f"got {name!r}")
    return name


class SiteProfiles:
    """The profiles under ``root`` for a server whose photos are answered by ``base`` (a single-file
    :class:`~crack_lightning.inference.predictor.Predictor`); ``patches`` answers patch-sized inputs."""

    def __init__(self, root: str | Path, base, patches=None):
        self.root, self.base, self.patches = Path(root), base, patches
        self._features = None  # the photo model in PyTorch, whose head's inputs a mark stores (built at the first mark)
        self._loaded: dict[str, tuple[float, Any]] = {}
        self._base_export: tuple[bytes, dict] | None = None  # the server's photo export and its weights (refits seed from it)
        self._lock = threading.Lock()

    @property
    def _torch(self):
        from crack_lightning.inference.predictor import Predictor

        if self._features is None:
            self._features = Predictor(self.base.checkpoint, engine="torch", num_workers=0)
        return self._features

    def folder(self, site: str) -> Path:
        return self.root / check_site(site)

    def names(self) -> list[dict]:
        if not self.root.is_dir():
            return []
        return [self.summary(p.name) for p in sorted(self.root.iterdir()) if p.is_dir() and SITE_NAME.match(p.name)]

    def summary(self, site: str) -> dict:
        folder = self.folder(site)
        marks = _lines(folder / "marks.jsonl")
        model = folder / "model.pt"
        refits = [e for e in _lines(folder / "log.jsonl") if e.get("event") == "refit"]
        threshold = refits[-1]["threshold"] if model.is_file() and refits else None  # the file's, as its refit logged it
        return {"site": site, "marks": len(marks), "tiles": sum(m.get("features", 0) for m in marks), "no_crack": sum(m["label"] == "no crack" for m in marks),
                "crack": sum(m["label"] == "crack" for m in marks), "refitted": model.is_file(), "threshold": threshold}

    def log(self, site: str) -> list[dict]:
        return _lines(self.folder(site) / "log.jsonl")

    def predictor(self, site: str):
        """The predictor for requests naming ``site``: patches as the server's, photos by the site's model
        (the server's own until a first mark)."""
        from crack_lightning.inference.predictor import Predictor

        model = self.folder(site) / "model.pt"
        if not model.is_file():
            return None
        stamp = model.stat().st_mtime_ns
        with self._lock:
            cached = self._loaded.get(site)
            if cached is None or cached[0] != stamp:
                patch = self.patches.checkpoint if self.patches is not None else model
                cached = (stamp, Predictor(patch, photo_model=model, batch_size=self.base.batch_size))
                self._loaded[site] = cached
        return cached[1]

    def mark(self, site: str, image, name: str, data: bytes, label: str, box: tuple[int, int, int, int] | None,
             who: str = "") -> dict:
        """Store one mark (the whole photo, or the tile ``box = (x, y, w, h)``) and refit the site's model."""
        from crack_lightning.data.transforms import eval_transform
        from crack_lightning.inference.localize import localize_array

        if label not in LABELS:
            raise InputError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        folder = self.folder(site)
        count = 1 if box else photo_tile_count(image.shape[1], image.shape[0], self._torch.photo_tiles)
        if count > SERVER_MAX_TILES:
            raise InputError(f"this {image.shape[1]}x{image.shape[0]} photo makes {count:,} tiles; a mark takes at "
                             f"most {SERVER_MAX_TILES:,}: mark a tile of it, or a smaller photo")
        held = self.summary(site)["tiles"]
        if held + count > SITE_MAX_FEATURES:
            raise InputError(f"site {site} holds {held:,} marked tiles; at most {SITE_MAX_FEATURES:,}: reset it "
                             "(DELETE /v1/sites/NAME) or start another site")
        head = linear_head(self._torch.model)
        feats: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach().float().cpu()))
        try:
            if box is None:
                loc = localize_array(image, self._torch, 0, None, name)  # every tile of the photo
            else:
                x, y, w, h = box
                if w < 8 or h < 8 or x < 0 or y < 0 or x + w > image.shape[1] or y + h > image.shape[0]:
                    raise InputError(f"the tile {box} is not inside the {image.shape[1]}x{image.shape[0]} photo")
                crop = eval_transform(self._torch.pre)(image=image[y:y + h, x:x + w])["image"]
                self._torch.probabilities(crop[None])
        finally:
            hook.remove()
        x_new = torch.cat(feats)
        if box is None and label == "crack":
            # "this photo shows a crack" says not where: its most crack-like tiles stand for it (a click on the
            # crack, a tile mark, says where)
            top = torch.tensor([t.probability for t in loc.tiles]).argsort(descending=True)[:CRACK_PHOTO_TILES]
            x_new = x_new[top]
        y_new = torch.full((len(x_new),), float(LABELS.index(label)))
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / ".lock")):
            store = folder / "features.pt"
            old = torch.load(store, weights_only=True) if store.is_file() else {"x": x_new[:0], "y": y_new[:0],
                                                                               "group": torch.zeros(0, dtype=torch.long)}
            group = int(old["group"].max()) + 1 if len(old["group"]) else 0
            feats_all = {"x": torch.cat([old["x"], x_new.half()]), "y": torch.cat([old["y"], y_new]),
                         "group": torch.cat([old["group"], torch.full((len(x_new),), group, dtype=torch.long)])}
            with atomic_write(store, "wb") as f:
                torch.save(feats_all, f)
            entry = {"when": _now(), "who": who, "photo": name, "sha256": hashlib.sha256(data).hexdigest(),
                     "tile": list(box) if box else None, "label": label, "features": len(x_new)}
            _append(folder / "marks.jsonl", entry)
            _append(folder / "log.jsonl", {"event": "mark", **entry})
            info = self._refit(folder, feats_all)
            _append(folder / "log.jsonl", {"event": "refit", "when": _now(), "who": who, **info})
        return {**self.summary(site), **info}

    def _refit(self, folder: Path, marks: dict) -> dict:
        from crack_lightning.models.checkpoint import save_release

        model = copy.deepcopy(self._torch.model)  # the server's photo model as its file holds it: every refit's start
        head = linear_head(model)
        anchors = (getattr(model, "meta", {}) or {}).get("site_anchors")
        if head is None or not anchors:
            raise InputError("this model cannot learn from marks: its head is not one linear layer, or it carries no "
                             "training anchors")
        x, y, group = marks["x"].float(), marks["y"].float(), marks["group"]
        weight, bias = refit_linear(head.weight.detach().float(), head.bias.detach().float(),
                                    anchors["features"].float(), anchors["labels"].float(), x, site_y=y)
        weight, bias = weight.half().float(), bias.half().float()  # as the file holds them
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
            scores = torch.sigmoid(head(x)).squeeze(1)
        clear = [float(scores[(group == g) & (y == 0)].max()) for g in group[y == 0].unique().tolist()]
        threshold = site_threshold(clear, float(self.base.threshold)) if clear else float(self.base.threshold)
        if threshold >= 1.0:
            raise InputError("a tile marked 'no crack' scores 1.0: no threshold silences it")
        model.threshold.fill_(threshold)
        cracks = [float(scores[(group == g) & (y == 1)].max()) for g in group[y == 1].unique().tolist()]
        info = {"threshold": round(threshold, 6), "no_crack_marks": len(clear), "crack_marks": len(cracks),
                "crack_marks_found": sum(s >= threshold for s in cracks)}
        metrics = dict(getattr(model, "meta", {}).get("metrics") or {})
        metrics["site_profile"] = {"site": folder.name, **info}
        save_release(model, folder / "model.pt", metrics=metrics)
        self._seed_export(folder / "model.pt")
        return info

    def _seed_export(self, path: Path) -> None:
        """Cache the ONNX export of a refitted site file, made from the server's own export by swapping the head
        (byte-equal to exporting it, 0.1 s instead of several): the next request naming the site starts at once."""
        from crack_lightning.models.checkpoint import float_weights, read_checkpoint
        from crack_lightning.models.runtime import (
            cached_export,
            derived_export,
            file_key,
            use_onnx,
        )

        base = self.base
        if Path(base.checkpoint).suffix == ".onnx" or not use_onnx(base.engine, base.device):
            return  # an ONNX file cannot learn from marks; on a GPU the site's model runs in PyTorch
        if self._base_export is None:  # once per server: the base file is hashed and its weights read at most once
            self._base_export = (cached_export(file_key(base.checkpoint, "probability", base.pre.size), base._export),
                                 float_weights(base._ckpt["state_dict"]))
        derived = derived_export(*self._base_export, float_weights(read_checkpoint(path)["state_dict"]))
        if derived is not None:
            cached_export(file_key(path, "probability", base.pre.size), lambda: derived)

    def reset(self, site: str, who: str = "") -> dict:
        """Forget the site's marks and model; the log keeps what was done, and the reset."""
        folder = self.folder(site)
        if not folder.is_dir():
            raise KeyError(site)
        with FileLock(str(folder / ".lock")):
            for name in ("model.pt", "features.pt", "marks.jsonl"):
                (folder / name).unlink(missing_ok=True)
            _append(folder / "log.jsonl", {"event": "reset", "when": _now(), "who": who})
        self._loaded.pop(site, None)
        return self.summary(site)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _append(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

