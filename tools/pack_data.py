#!/usr/bin/env python
"""Pack data folders into gzip tar parts small enough to carry to a lent GPU machine.

    python tools/pack_data.py ../shared/data/mendeley .pack --first-mib 20 --mib 45
    python tools/pack_data.py ../shared/data/mendeley ../shared/data/field .pack \
        --from-split runs/mendeley_lite0_s12/split.csv --splits train val --per-class 1500

A device call carries at most 64 MiB with the working tree (~11 MiB), so the 30,000
Mendeley JPEGs (175 MiB) travel as 5 parts: the first smaller, to leave room for the
wheels. Each part unpacks to ``<name of the root>/<sub folders>/<file>``; unpack them all
into one folder (``tar xzf part1.tgz -C DEST``) and point ``--data.root`` at
``DEST/<name>``. Files are grouped by raw size (JPEGs do not compress).

``--from-split``: of a root whose files that ``split.csv`` lists, pack only the rows of
``--splits`` (at most ``--per-class`` per label, seeded): e.g. only the train/val patches of
the released model's split, so its test patches stay unseen by a model trained there.
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
import tarfile
from pathlib import Path


def select(files: list[Path], split_csv: Path, splits: list[str], per_class: int, seed: int = 0) -> list[Path]:
    """``files`` that ``split_csv`` lists in ``splits``, at most ``per_class`` per label (0 = all);
    every file if the CSV lists none of them."""
    with open(split_csv, encoding="utf-8") as f:
        rows = {Path(r["path"]).resolve(): r for r in csv.DictReader(f)}
    if not any(p.resolve() in rows for p in files):
        return files
    by_label: dict[str, list[Path]] = {}
    for p in files:
        r = rows.get(p.resolve())
        if r is not None and r["split"] in splits:
            by_label.setdefault(r["label"], []).append(p)
    rng = random.Random(seed)
    out: list[Path] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        out += group[:per_class] if per_class > 0 else group
    return sorted(out)


def pack(roots: list[Path], out: Path, first_mib: float, mib: float, keep=lambda files: files) -> list[Path]:
    """Write ``out/part{1..N}.tgz`` holding ``keep(files)`` of every root; return their paths."""
    items = [(f, Path(root.name) / f.relative_to(root)) for root in roots
             for f in keep(sorted(p for p in root.rglob("*") if p.is_file()))]
    if not items:
        raise SystemExit(f"error: no files under {', '.join(map(str, roots))}")
    out.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[Path, Path]]] = [[]]
    size = 0
    for f, arc in items:
        limit = (first_mib if len(groups) == 1 else mib) * 2 ** 20
        if groups[-1] and size + f.stat().st_size > limit:
            groups.append([])
            size = 0
        groups[-1].append((f, arc))
        size += f.stat().st_size
    parts = []
    for i, group in enumerate(groups, 1):
        path = out / f"part{i}.tgz"
        with tarfile.open(path, "w:gz", compresslevel=1) as tar:
            for f, arc in group:
                tar.add(f, arcname=str(arc))
        parts.append(path)
        print(f"{path}: {len(group)} files, {path.stat().st_size / 2 ** 20:.1f} MiB")
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", type=Path, nargs="+", metavar="ROOT... OUT")
    ap.add_argument("--first-mib", type=float, default=20.0)
    ap.add_argument("--mib", type=float, default=45.0)
    ap.add_argument("--from-split", type=Path, default=None, metavar="SPLIT_CSV")
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--per-class", type=int, default=0)
    args = ap.parse_args()
    if len(args.paths) < 2:
        ap.error("give at least one ROOT and the OUT folder")
    *roots, out = args.paths
    keep = (lambda files: select(files, args.from_split, args.splits, args.per_class)) if args.from_split else (lambda f: f)
    pack(roots, out, args.first_mib, args.mib, keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
