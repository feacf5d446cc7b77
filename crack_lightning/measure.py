"""Measure cracks in a crack mask: each crack's length along its skeleton and its width across it.

Inspectors act on widths in millimetres (repair rules: <= 0.1, 0.1-0.3, > 0.3 mm), so a crack map is
turned into one row per crack: a crack is a connected component of the cleaned mask; its length is
the length of its skeleton (traced branch by branch, each branch measured along points a few pixels
apart, so a diagonal or curved crack is not over-counted the way a pixel-step count is); its width at
a skeleton point is twice the distance to the background there, less half a pixel (the distance runs to
the nearest background pixel's centre, which lies up to a pixel beyond the crack's edge depending on
its direction: within a pixel of the drawn width at every angle, tested), read away from junctions,
where the distance belongs to the meeting of several cracks. The mean width is the median along the
skeleton; the maximum is the widest point of that profile smoothed over five skeleton pixels (one
stray pixel is not a crack's width).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np

SEVERITY_MM = (0.1, 0.3)  # class edges in mm: hairline <= 0.1 < fine <= 0.3 < wide
SEVERITY_NAMES = ("hairline", "fine", "wide")
_STEP = 4  # pixels between the points a branch is measured along
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


@dataclass
class Crack:
    """One crack (connected component of the mask), in pixels; ``bbox`` as x, y, width, height."""

    id: int
    length_px: float
    mean_width_px: float
    max_width_px: float
    x: int
    y: int
    width: int
    height: int

    def row(self, mm_per_pixel: float | None = None, edges: Sequence[float] = SEVERITY_MM) -> dict:
        """A CSV row; with a scale, every length and width also in mm and the severity of the widest point."""
        out = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        if mm_per_pixel:
            out.update(length_mm=round(self.length_px * mm_per_pixel, 3),
                       mean_width_mm=round(self.mean_width_px * mm_per_pixel, 4),
                       max_width_mm=round(self.max_width_px * mm_per_pixel, 4),
                       severity=severity(self.max_width_px * mm_per_pixel, edges))
        return out


def severity(width_mm: float, edges: Sequence[float] = SEVERITY_MM) -> str:
    """The class of a width: the first class whose upper edge it does not exceed."""
    names = list(SEVERITY_NAMES) if len(edges) == 2 else [f"class_{i + 1}" for i in range(len(edges) + 1)]
    return next((n for n, e in zip(names, edges) if width_mm <= e), names[len(edges)])


def clean(mask: np.ndarray, min_area: int = 0) -> np.ndarray:
    """The mask as booleans, without components smaller than ``min_area`` pixels (specks, noise)."""
    from skimage.morphology import remove_small_objects

    mask = np.asarray(mask).astype(bool)
    return remove_small_objects(mask, max_size=min_area - 1, connectivity=2) if min_area > 1 else mask


def measure(mask: np.ndarray, min_length_px: float = 0.0) -> list[Crack]:
    """Every crack of a boolean mask at least ``min_length_px`` long, longest first."""
    from scipy.ndimage import distance_transform_edt, find_objects
    from skimage.measure import label
    from skimage.morphology import skeletonize

    mask = np.asarray(mask).astype(bool)
    labels = label(mask, connectivity=2)
    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]  # the image border is not background
    cracks = []
    for i, box in enumerate(find_objects(labels), start=1):
        if box is None:
            continue
        part = labels[box] == i
        skeleton = skeletonize(part)
        if not skeleton.any():
            continue
        points = np.argwhere(skeleton)
        length, junctions = _skeleton_length(skeleton)
        d = distance[box][skeleton]
        width = 2.0 * d - 0.5
        away = _away_from(points, junctions, d)  # widths where one crack is measured, not a meeting of several
        width = width[away] if away.any() else width
        smooth = np.array([np.median(width[max(0, k - 2):k + 3]) for k in range(len(width))])
        length = max(length, float(smooth.max()))  # a blob whose skeleton is a point is as long as it is wide
        if length < min_length_px:
            continue
        cracks.append(Crack(0, float(length), float(np.median(width)), float(smooth.max()), int(box[1].start),
                            int(box[0].start), int(box[1].stop - box[1].start), int(box[0].stop - box[0].start)))
    cracks.sort(key=lambda c: -c.length_px)
    for k, c in enumerate(cracks, start=1):
        c.id = k
    return cracks


def _away_from(points: np.ndarray, junctions: list[tuple[int, int]], d: np.ndarray) -> np.ndarray:
    keep = np.ones(len(points), bool)
    for jy, jx in junctions:
        reach = 2.0 * float(d.max()) + 1.0
        keep &= (points[:, 0] - jy) ** 2 + (points[:, 1] - jx) ** 2 > reach ** 2
    return keep


def _skeleton_length(skeleton: np.ndarray) -> tuple[float, list[tuple[int, int]]]:
    """Total length of a one-pixel skeleton, branch by branch, and where its junctions are."""
    pixels = {(int(y), int(x)) for y, x in np.argwhere(skeleton)}

    def neighbours(p):
        return [(p[0] + dy, p[1] + dx) for dy, dx in _NEIGHBOURS if (p[0] + dy, p[1] + dx) in pixels]

    degree = {p: len(neighbours(p)) for p in pixels}
    nodes = {p for p, k in degree.items() if k != 2}
    junctions = [p for p in nodes if degree[p] > 2]
    seen: set[frozenset] = set()
    total = 0.0
    for chain in _chains(pixels, nodes, neighbours, seen):
        total += _polyline_length(chain)
    return total, junctions


def _chains(pixels, nodes, neighbours, seen) -> Iterator[list[tuple[int, int]]]:
    """Pixel chains between nodes (ends and junctions); a closed loop with no node is one chain."""
    starts = list(nodes) or [next(iter(pixels))]
    for start in starts:
        for first in neighbours(start):
            edge = frozenset((start, first))
            if edge in seen:
                continue
            seen.add(edge)
            chain, prev, cur = [start, first], start, first
            while cur not in nodes and cur != start:
                step = [q for q in neighbours(cur) if q != prev and frozenset((cur, q)) not in seen]
                if not step:
                    break
                # prefer the orthogonal neighbour: a diagonal next to it is the same step taken twice
                step.sort(key=lambda q: abs(q[0] - cur[0]) + abs(q[1] - cur[1]))
                seen.add(frozenset((cur, step[0])))
                prev, cur = cur, step[0]
                chain.append(cur)
            yield chain


def _polyline_length(chain: list[tuple[int, int]]) -> float:
    """Length along points ``_STEP`` pixels apart (and the chain's ends): a staircase of pixels measured as
    the line it approximates."""
    if len(chain) < 2:
        return 0.0
    keep = chain[::_STEP] + ([chain[-1]] if (len(chain) - 1) % _STEP else [])
    return float(sum(math.dist(a, b) for a, b in zip(keep, keep[1:])))


def longest_crack_in(mask: np.ndarray, boxes: Sequence[tuple[int, int, int, int]]) -> list[float]:
    """For each ``(x, y, width, height)`` box, the length of the longest crack of ``mask`` with a pixel inside it
    (0.0: none). A box is judged by the whole crack that runs through it, not the piece it holds."""
    from scipy.ndimage import find_objects
    from skimage.measure import label

    labels = label(np.asarray(mask).astype(bool), connectivity=2)
    lengths = np.zeros(labels.max() + 1)
    for i, box in enumerate(find_objects(labels), start=1):
        if box is not None:
            lengths[i] = max((c.length_px for c in measure(labels[box] == i)), default=0.0)
    return [float(lengths[np.unique(labels[y:y + h, x:x + w])].max()) for x, y, w, h in boxes]
