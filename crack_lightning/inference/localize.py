"""Where are the cracks? Slide the patch classifier over a full-size photo.

The photo is decoded once (EXIF-rotated, converted to RGB); tiles are cut and
classified in batches, so memory stays at the photo itself plus one batch of
tiles, whatever the number of tiles. Each tile goes through the same
:func:`~crack_lightning.data.transforms.eval_transform` as training patches.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from crack_lightning.data.images import decode_image
from crack_lightning.data.tiles import PHOTO_TILES, Tile, iter_tiles
from crack_lightning.data.transforms import eval_transform
from crack_lightning.errors import Stopped
from crack_lightning.files import (
    PNG_METADATA,
    atomic_write,
    csv_path,
    csv_text,
    path_text,
)
from crack_lightning.inference.outputs import SUMMARY_FIELDS, TILES_CSV_HEADER


@dataclass
class Localization:
    photo: str
    width: int
    height: int
    tiles: list[Tile]
    threshold: float

    @property
    def crack_tiles(self) -> list[Tile]:
        return [t for t in self.tiles if t.probability >= self.threshold]

    @property
    def probability(self) -> float:
        """The photo's crack probability: its highest tile's (flagged exactly when a tile is)."""
        return max(t.probability for t in self.tiles)

    def crack_fraction(self) -> float:
        """Share of the surface inside a flagged tile (the tinted, outlined area)."""
        scale = max(1, min(self.width, self.height) // 500)
        heat = self.heat(scale)[: self.height // scale, : self.width // scale]
        return float((heat >= self.threshold).mean()) if heat.size else 0.0

    def heat(self, scale: int) -> np.ndarray:
        """Per-pixel highest probability of the tiles over it, downsampled by ``scale``: a small tile that
        sees a thin crack is not averaged away by the larger tile around it."""
        heat = np.zeros((self.height // scale + 1, self.width // scale + 1), np.float32)
        for t in self.tiles:
            sl = (slice(t.y // scale, (t.y + t.height) // scale), slice(t.x // scale, (t.x + t.width) // scale))
            np.maximum(heat[sl], t.probability, out=heat[sl])
        return heat


def localize(path: str | Path, predictor, tile: int = 0, stride: int | None = None,
             progress: bool = False) -> tuple[Localization, np.ndarray]:
    """Classify every tile of the photo at ``path``; return the tiles and the decoded photo."""
    image = decode_image(path)
    return localize_array(image, predictor, tile, stride, str(path), progress), image


def photo_tiles(width: int, height: int, sides: Sequence[int], stride: int | None = None) -> list[Tile]:
    """The tiles of a photo at every side in ``sides``, each overlapping its neighbours by half (or ``stride``)."""
    return [t for side in sides for t in iter_tiles(width, height, side, stride or max(1, side // 2))]


def localize_array(image: np.ndarray, predictor, tile: int = 0, stride: int | None = None,
                   name: str = "photo", progress: bool = False,
                   should_stop: Callable[[], bool] | None = None) -> Localization:
    """Classify every tile of a decoded ``HxWx3`` photo (what :func:`localize` and the server share):
    tiles of side ``tile``, or 0: the predictor's photo tiles (``photo_tiles``, several sides).
    ``should_stop`` is asked before every batch: true raises :class:`Stopped`."""
    height, width = image.shape[:2]
    tf = eval_transform(predictor.pre)
    tiles = photo_tiles(width, height, [tile] if tile else getattr(predictor, "photo_tiles", PHOTO_TILES), stride)
    for start in tqdm(range(0, len(tiles), predictor.batch_size), desc=f"tiles of {Path(name).name}",
                      unit="batch", disable=not progress):
        if should_stop is not None and should_stop():
            raise Stopped(name)
        chunk = tiles[start:start + predictor.batch_size]
        batch = torch.stack([tf(image=image[t.y:t.y + t.height, t.x:t.x + t.width])["image"] for t in chunk])
        for t, p in zip(chunk, predictor.probabilities(batch).tolist()):
            t.probability = float(p)
    return Localization(name, width, height, tiles, float(predictor.threshold))


def write_tiles_csv(loc: Localization, path: Path) -> None:
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(TILES_CSV_HEADER)
        for t in loc.tiles:
            w.writerow([t.x, t.y, t.width, t.height, f"{t.probability:.6f}"])


def veil(heat: np.ndarray, threshold: float) -> np.ndarray:
    """RGBA floats: only flagged tiles are tinted, a light red that deepens with the probability (at most 45 %
    opaque), so the rest of the photo stays untouched and the crack under the colour remains visible."""
    out = np.zeros(heat.shape + (4,), np.float32)
    out[..., 0] = 1.0
    out[..., 3] = np.where(heat >= threshold, 0.2 + 0.25 * heat, 0.0)
    return out


def _display_scale(loc: Localization, max_side: int) -> int:
    """The integer reduction that brings the photo's longest side to at most ``max_side``."""
    return max(1, int(np.ceil(max(loc.width, loc.height) / max_side)))


def heat_layer_png(loc: Localization, max_side: int = 1600) -> bytes:
    """The crack-probability veil alone, as a transparent RGBA PNG with the photo's aspect
    (longest side at most ``max_side``): laid over the photo it gives :func:`write_heatmap`'s
    colouring, so a web page can overlay it on the full-size photo at any zoom."""
    scale = _display_scale(loc, max_side)
    heat = loc.heat(scale)[: max(1, loc.height // scale), : max(1, loc.width // scale)]
    buf = io.BytesIO()
    Image.fromarray((veil(heat, loc.threshold) * 255).round().astype(np.uint8), "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def write_heatmap(loc: Localization, image: np.ndarray, path: Path, max_side: int = 1600) -> None:
    """The photo (downscaled) with crack probability as a red :func:`veil` and the crack area outlined."""
    scale = _display_scale(loc, max_side)
    small = np.asarray(Image.fromarray(image).reduce(scale)) if scale > 1 else image
    heat = loc.heat(scale)[: small.shape[0], : small.shape[1]]
    fig_w = 10
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * small.shape[0] / small.shape[1] + 0.8))
    ax.imshow(small)
    ax.imshow(veil(heat, loc.threshold), interpolation="nearest")
    if heat.max() >= loc.threshold > heat.min():
        ax.contour(heat, levels=[loc.threshold], colors="yellow", linewidths=1.2)
    ax.set_axis_off()
    ax.set_title(f"{path_text(Path(loc.photo).name)}: {len(loc.crack_tiles)} of {len(loc.tiles)} tiles crack, "
                 f"{loc.crack_fraction():.1%} of the surface (yellow line: threshold {loc.threshold:.2f})",
                 fontsize=10)
    sm = plt.cm.ScalarMappable(cmap=matplotlib.colors.LinearSegmentedColormap.from_list(
        "veil", [(1, 1, 1, 0), (1, 0, 0, 0.6)]), norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, fraction=0.03, pad=0.01, label="crack probability")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(fig)





def summary_row(loc: Localization, label: str, probability: float) -> dict:
    """The photo's ``summary.csv`` row: its answer (as ``predict.py`` gives it) and its tiles."""
    return {
        "photo": loc.photo, "width": loc.width, "height": loc.height, "label": label,
        "probability": f"{probability:.6f}", "tiles": len(loc.tiles),
        "crack_tiles": len(loc.crack_tiles), "crack_fraction": f"{loc.crack_fraction():.4f}",
        "max_probability": f"{loc.probability:.4f}", "threshold": f"{loc.threshold:.4f}",
        "error": "",
    }


def write_summary(rows: list[dict], path: Path) -> None:
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        w.writerows({**row, "photo": csv_path(row["photo"]), "error": csv_text(row.get("error", ""))} for row in rows)
