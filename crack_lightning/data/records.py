"""A record per training item (a file, or a tile of an annotated photo) and the ``split.csv`` that keeps them."""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SPLITS = ("train", "val", "test")


@dataclass
class Record:
    """One training image: a file, or a tile (``box`` ``"x,y,w,h"``) of an annotated photo."""

    path: str
    label: int
    sha256: str
    split: str = ""
    box: str = ""  # "" = the whole file
    group: str = ""  # records of one group (one original photo) share a split; "" = by content hash
    source: str = ""  # the data root it came from (balancing, per-source metrics)


SPLIT_CSV_HEADER = ["path", "label", "class_name", "split", "sha256", "box", "group", "source"]


def write_split_csv(records: list[Record], path: Path, class_names: Sequence[str]) -> None:
    """Every image with its label, split and hash. UTF-8; a path that is not valid UTF-8 is
    written with ``\\xNN`` escapes and a cell a spreadsheet would run gets a leading ``'``
    (:mod:`crack_lightning.files`); :func:`read_split_csv` undoes both."""
    from crack_lightning.files import atomic_write, csv_path, csv_text

    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(SPLIT_CSV_HEADER)
        for r in records:
            w.writerow([csv_path(r.path), r.label, csv_text(class_names[r.label]), r.split, r.sha256, r.box,
                        csv_text(r.group), csv_text(r.source)])


def read_split_csv(path: Path) -> list[Record]:
    from crack_lightning.files import csv_value, path_from_csv

    with open(path, newline="", encoding="utf-8") as f:
        return [Record(path_from_csv(row["path"]), int(row["label"]), row["sha256"], row["split"],
                       row.get("box") or "", csv_value(row.get("group") or ""), csv_value(row.get("source") or ""))
                for row in csv.DictReader(f)]


def subsample(records: list[Record], max_per_class: int, seed: int) -> list[Record]:
    """A seeded subset of at most ``max_per_class`` images per class of each source (0 = all)."""
    if max_per_class <= 0:
        return records
    rng = random.Random(seed)
    out = []
    for key in sorted({(r.source, r.label) for r in records}):
        mine = [r for r in records if (r.source, r.label) == key]
        rng.shuffle(mine)
        out += mine[:max_per_class]
    return sorted(out, key=lambda r: (r.path, r.box))


def split_summary(records: list[Record], class_names: list[str]) -> str:
    """``split: train 120 (60 Negative / 60 Positive), val 40 (...), test 40 (...)``"""
    counts = class_counts(records)
    parts = [f"{s} {sum(counts[s].values())} (" + " / ".join(f"{counts[s].get(k, 0)} {n}"
                                                          for k, n in enumerate(class_names)) + ")"
             for s in SPLITS if s in counts]
    return "split: " + ", ".join(parts)


def class_counts(records: list[Record]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for r in records:
        out.setdefault(r.split, {}).setdefault(r.label, 0)
        out[r.split][r.label] += 1
    return out
