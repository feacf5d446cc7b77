#!/usr/bin/env python
"""Pack a data folder into gzip tar parts small enough to carry to a lent GPU machine.

    python tools/pack_data.py ../shared/data/mendeley .pack --first-mib 20 --mib 45

A device call carries at most 64 MiB with the working tree (~9 MiB), so the 30,000
Mendeley JPEGs (175 MiB) travel as 5 parts: the first smaller, to leave room for the
wheels. Each part unpacks to ``<name of the folder>/<class>/<file>``; unpack them all
into one folder (``tar xzf part1.tgz -C DEST``) and point ``--data.root`` at
``DEST/<name>``. Files are grouped by raw size (JPEGs do not compress).
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path


def pack(root: Path, out: Path, first_mib: float, mib: float) -> list[Path]:
    """Write ``out/part{1..N}.tgz``; return their paths."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"error: no files under {root}")
    out.mkdir(parents=True, exist_ok=True)
    groups: list[list[Path]] = [[]]
    size = 0
    for f in files:
        limit = (first_mib if len(groups) == 1 else mib) * 2 ** 20
        if groups[-1] and size + f.stat().st_size > limit:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += f.stat().st_size
    parts = []
    for i, group in enumerate(groups, 1):
        path = out / f"part{i}.tgz"
        with tarfile.open(path, "w:gz", compresslevel=1) as tar:
            for f in group:
                tar.add(f, arcname=str(Path(root.name) / f.relative_to(root)))
        parts.append(path)
        print(f"{path}: {len(group)} files, {path.stat().st_size / 2 ** 20:.1f} MiB")
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--first-mib", type=float, default=20.0)
    ap.add_argument("--mib", type=float, default=45.0)
    args = ap.parse_args()
    pack(args.root, args.out, args.first_mib, args.mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
