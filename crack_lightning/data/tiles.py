"""Training data from annotated photos: ``images/NAME.jpg`` + ``masks/NAME.png`` (white = crack).

Inspection photos show hair-thin cracks over a few percent of the frame, so a photo is cut
into square tiles at several sizes (a small tile, resized to the model's input, shows a thin
crack larger) and each tile is labelled from its mask by one rule:

* crack:    at least ``crack_fraction`` (default 0.5 %) of the tile's pixels are crack;
* no crack: no crack pixel inside the tile grown by ``clear_margin`` pixels (default 8)
            on every side (a crack just outside the border is not a clean negative);
* otherwise the tile is not used (a crack too small to call either way).

All tiles of one photo, and of every crop of one original photo (``group_pattern``), share
a group, and a group never straddles two splits.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import matplotlib
import numpy as np
from PIL import Image

from crack_lightning.data.images import decode_image, is_image_file, open_image
from crack_lightning.data.records import Record
from crack_lightning.errors import BadImageError
from crack_lightning.files import sha256_file

matplotlib.use("Agg")


MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass(frozen=True)
class TileRule:
    """How photos with masks become labelled tiles (see the module docstring)."""

    sizes: tuple[int, ...] = (224, 112)
    crack_fraction: float = 0.005
    clear_margin: int = 8
    group_pattern: str = ""  # regex; its first group (or whole match) names the original photo

    def label(self, mask: np.ndarray, x: int, y: int, size: int) -> int | None:
        """1 crack, 0 no crack, None unused, for the tile at ``(x, y)`` of a boolean mask."""
        tile = mask[y:y + size, x:x + size]
        if tile.mean() >= self.crack_fraction:
            return 1
        m = self.clear_margin
        grown = mask[max(0, y - m):y + size + m, max(0, x - m):x + size + m]
        return None if grown.any() else 0


@dataclass
class LabelledTile:
    """A tile cut from an annotated photo for training: where it is, its label, its photo's group."""

    photo: str
    box: tuple[int, int, int, int]  # x, y, width, height
    label: int
    group: str
    photo_sha256: str = ""
    extra: dict = field(default_factory=dict)


def is_mask_root(root: str | Path) -> bool:
    """A folder of annotated photos: ``images/`` and ``masks/`` side by side."""
    root = Path(root)
    return (root / "images").is_dir() and (root / "masks").is_dir()


def group_of(stem: str, pattern: str = "") -> str:
    """The original photo a file was cropped from. With ``pattern``, its first group (or the whole
    match); without, the name with trailing ``_<number>`` tokens removed (crop offsets), which
    errs towards larger groups: never a leak, at worst a coarser split."""
    if pattern:
        m = re.search(pattern, stem)
        if m:
            return m.group(1) if m.groups() else m.group(0)
        return stem
    return re.sub(r"(_\d+)+$", "", stem) or stem


def find_mask(root: Path, image: Path) -> Path | None:
    for ext in MASK_EXTENSIONS:
        candidate = root / "masks" / (image.stem + ext)
        if candidate.is_file():
            return candidate
    return None


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Boolean crack mask at the photo's ``(width, height)``; any pixel above mid-grey is crack."""
    img = open_image(path)
    with img:
        mask = img.convert("L")
        if mask.size != size:
            mask = mask.resize(size, Image.NEAREST)
        return np.asarray(mask) > 127


def tile_photo(image: Path, mask_path: Path, rule: TileRule) -> list[LabelledTile]:
    """The labelled tiles of one photo (a non-overlapping grid per size; the last row and column
    flush with the edge)."""

    with open_image(image) as img:
        width, height = img.size
    mask = read_mask(mask_path, (width, height))
    group = group_of(image.stem, rule.group_pattern)
    tiles = []
    for size in rule.sizes:
        if size > min(width, height):
            continue
        for y in tile_origins(height, size, size):
            for x in tile_origins(width, size, size):
                label = rule.label(mask, x, y, size)
                if label is not None:
                    tiles.append(LabelledTile(str(image), (x, y, size, size), label, group))
    return tiles


def scan_mask_root(root: str | Path, rule: TileRule, source: str = "") -> tuple[list, list[tuple[str, str]]]:
    """Records of every labelled tile under ``root`` (a :func:`is_mask_root` folder), and the photos
    that could not be used as ``(path, reason)``."""
    root = Path(root)
    source = source or root.name
    records, bad = [], []
    for image in sorted(p for p in (root / "images").iterdir() if p.is_file() and is_image_file(p)):
        mask = find_mask(root, image)
        if mask is None:
            bad.append((str(image), "no mask in masks/ with the same name"))
            continue
        try:
            decode_image(image)
            tiles = tile_photo(image, mask, rule)
            digest = sha256_file(image)
        except BadImageError as exc:
            bad.append((str(image), str(exc)))
            continue
        for t in tiles:
            box = ",".join(map(str, t.box))
            tile_sha = hashlib.sha256(f"{digest}:{box}".encode()).hexdigest()
            records.append(Record(t.photo, t.label, tile_sha, "", box=box, group=f"{source}/{t.group}",
                                  source=source))
    return records, bad


def crop(image: np.ndarray, box: str) -> np.ndarray:
    """The ``"x,y,w,h"`` box of a decoded photo."""
    x, y, w, h = (int(v) for v in box.split(","))
    return image[y:y + h, x:x + w]


TRAINING_TILE = 227  # the Mendeley patches were cut at this size from 4032x3024 photos
# A photo is answered from its tiles at these sides (the field model's training tiles: a hair-thin crack
# stays visible in a 112 px tile, where a whole photo shrunk to 224 px loses it); an input no larger than
# PATCH_LIMIT on either side is a patch, answered whole (as the Mendeley patches were trained).
PHOTO_TILES = (224, 112)
PATCH_LIMIT = 340  # 1.5x the training patch


def is_patch(width: int, height: int) -> bool:
    """Whether an input of this size is answered whole (a patch) rather than from its tiles (a photo)."""
    return max(width, height) <= PATCH_LIMIT


@dataclass
class Tile:
    """A square window of a photo that prediction scores (``--localize``)."""

    x: int
    y: int
    width: int
    height: int
    probability: float = 0.0


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis covering ``[0, length)``; the last tile is flush with the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_count(width: int, height: int, tile: int, stride: int) -> int:
    """How many tiles :func:`iter_tiles` yields, without making them (a request's work, bounded before it)."""
    return len(tile_origins(width, tile, stride)) * len(tile_origins(height, tile, stride))


def photo_tile_count(width: int, height: int, sides, stride: int = 0) -> int:
    """How many tiles a photo makes at every side in ``sides`` (each overlapping by half, or ``stride``)."""
    return sum(tile_count(width, height, t, stride or max(1, t // 2)) for t in sides)


def iter_tiles(width: int, height: int, tile: int, stride: int) -> Iterator[Tile]:
    for y in tile_origins(height, tile, stride):
        for x in tile_origins(width, tile, stride):
            yield Tile(x, y, min(tile, width), min(tile, height))
