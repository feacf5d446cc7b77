"""The leak-free split: byte-identical files (and tiles of one photo) always land in the same split."""
from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path

from crack_lightning.config.schema import DataConfig
from crack_lightning.data.records import (
    SPLITS,
    Record,
    class_counts,
    split_summary,
    subsample,
    write_split_csv,
)
from crack_lightning.data.scan import scan_sources
from crack_lightning.errors import DataError


def split_records(records: list[Record], val_fraction: float, test_fraction: float, seed: int) -> list[Record]:
    """Assign ``train/val/test`` by whole groups, per source, stratified by class, seeded.

    A group is one original photo (``Record.group``, all its tiles) or, for plain files, all
    byte-identical copies, across sources too. Copies whose labels differ are dropped (their label is
    unknowable); the caller reports them. Each source is stratified on its own, with its own seeded
    order (as if it were split alone), so validation and test span them all.
    """
    conflicted = {r.sha256 for r in label_conflicts(records)}
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.sha256 not in conflicted:
            groups[r.group or r.sha256].append(r)

    def majority(g: list[Record]) -> int:  # a photo's tiles can be of both classes
        return int(2 * sum(r.label for r in g) >= len(g))

    buckets: dict[tuple[str, int], list[str]] = defaultdict(list)
    for key, g in groups.items():
        buckets[(g[0].source, majority(g))].append(key)
    rngs: dict[str, random.Random] = {}
    out: list[Record] = []
    for source, label in sorted(buckets):
        rng = rngs.setdefault(source, random.Random(seed))
        keys = sorted(buckets[(source, label)])
        rng.shuffle(keys)
        total = sum(len(groups[k]) for k in keys)
        targets = {"test": test_fraction * total, "val": val_fraction * total}
        counts = {"test": 0, "val": 0}
        for k in keys:
            split = next((s for s in ("test", "val") if counts[s] < targets[s]), "train")
            if split != "train":
                counts[split] += len(groups[k])
            for r in groups[k]:
                r.split = split
                out.append(r)
    return sorted(out, key=lambda r: (r.path, r.box))


def label_conflicts(records: list[Record]) -> list[Record]:
    """Records whose byte-identical copies appear under both classes."""
    labels: dict[str, set[int]] = defaultdict(set)
    for r in records:
        labels[r.sha256].add(r.label)
    return [r for r in records if len(labels[r.sha256]) > 1]


def check_no_leak(records: list[Record]) -> None:
    """Raise if any file content, or any photo group, appears in two splits (also for user-given splits)."""
    for what, key in (("identical image(s)", lambda r: r.sha256), ("photo group(s)", lambda r: r.group)):
        where: dict[str, set[str]] = defaultdict(set)
        for r in records:
            if key(r):
                where[key(r)].add(r.split)
        leaks = [h for h, s in where.items() if len(s) > 1]
        if leaks:
            example = sorted({r.path for r in records if key(r) == leaks[0]})
            raise DataError(f"{len(leaks)} {what} appear in more than one split, e.g. {example[:3]}")


def build_split(cfg: DataConfig, out_dir: Path) -> list[Record]:
    """Scan every source, drop unusable files and label conflicts (listed in ``bad_images.csv``),
    split by groups, refuse data that cannot make an honest model, write ``split.csv``."""
    from crack_lightning.files import atomic_write, csv_path, csv_text, path_text

    records, bad = scan_sources(cfg, workers=max(1, cfg.num_workers))
    conflicts = label_conflicts(records)
    skipped = bad + [(r.path, "identical copy exists under the other class") for r in conflicts]
    if skipped:
        with atomic_write(out_dir / "bad_images.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows((csv_path(p), csv_text(reason)) for p, reason in skipped)
        print(f"skipped {len(skipped)} unusable file(s) (listed in {path_text(out_dir / 'bad_images.csv')}), e.g.:")
        for p, reason in skipped[:3]:
            print(f"  {path_text(p)}: {reason}")
    if all(r.split for r in records):
        conflicted = {r.path for r in conflicts}
        records = [r for r in records if r.path not in conflicted]
        check_no_leak(records)
    else:
        records = split_records(records, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    records = subsample(records, cfg.max_per_class, cfg.seed)
    check_trainable(records, cfg.class_names, need_test=cfg.test_fraction > 0 or all(r.split for r in records),
                    skipped=len(skipped))
    write_split_csv(records, out_dir / "split.csv", cfg.class_names)
    print(split_summary(records, cfg.class_names) + f" -> {path_text(out_dir / 'split.csv')}")
    return records


def check_trainable(records: list[Record], class_names: list[str], need_test: bool, skipped: int = 0) -> None:
    """Refuse, before any training, data that cannot make an honest model: every split needs
    both classes (what is left after bad files and label conflicts are removed)."""
    counts = class_counts(records)
    needed = SPLITS if need_test else SPLITS[:2]
    short = [s for s in needed if any(counts.get(s, {}).get(k, 0) == 0 for k in range(len(class_names)))]
    if short:
        have = "; ".join(f"{s}: " + ", ".join(f"{counts.get(s, {}).get(k, 0)} {n}" for k, n in enumerate(class_names))
                         for s in needed)
        raise DataError(f"too few usable images: split(s) {', '.join(short)} lack a class ({have}"
                        f"{f'; {skipped} file(s) skipped as unusable or conflicting' if skipped else ''}). "
                        "Training needs both classes in train, validation and test: add images or change the fractions")
