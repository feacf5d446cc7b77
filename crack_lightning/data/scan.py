"""Scan the data roots (class folders, or annotated photos), hash every file, refuse what cannot be used."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from crack_lightning.config.schema import DataConfig
from crack_lightning.data.images import decode_image, list_images
from crack_lightning.data.records import SPLITS, Record
from crack_lightning.data.tiles import TileRule, is_mask_root, scan_mask_root
from crack_lightning.errors import BadImageError, DataError
from crack_lightning.files import sha256_file


def _class_dirs(root: Path, class_names: Sequence[str], where: str) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"data root does not exist or is not a folder: {root}")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing = [c for c in class_names if c not in subdirs]
    unknown = [d for d in subdirs if d not in class_names]
    if missing:
        raise DataError(
            f"{where}: class folder(s) {missing} not found in {root} (found: {subdirs or 'no folders'}); "
            f"set data.class_names to your folder names [no-crack, crack]"
        )
    if unknown:
        raise DataError(f"{where}: unknown folder(s) {unknown} in {root}; expected only {list(class_names)}")
    return [root / c for c in class_names]


def scan(root: str | Path, class_names: Sequence[str], bad_images: str = "skip",
         check_pixels: bool = True, workers: int = 1,
         require_both: bool = True) -> tuple[list[Record], list[tuple[str, str]]]:
    """List, hash and (optionally) decode-check every image under ``root``.

    Returns the good records (``split`` filled when the root is pre-split) and
    the bad files as ``(path, reason)``. With ``bad_images='error'`` the first
    bad file stops the scan with a :class:`DataError`. ``workers`` threads
    decode and hash in parallel; the result does not depend on their number.
    """
    root = Path(root)
    presplit = root.is_dir() and all((root / s).is_dir() for s in SPLITS)
    parts = [(s, root / s) for s in SPLITS] if presplit else [("", root)]
    files: list[tuple[Path, int, str]] = []
    for split, folder in parts:
        for label, cdir in enumerate(_class_dirs(folder, class_names, f"data.root{'/' + split if split else ''}")):
            found = list_images(cdir)
            if not found and (split in ("", "train")) and require_both:
                raise DataError(f"class folder {cdir} holds no images (.jpg, .png, ...)")
            files += [(p, label, split) for p in found]
    def check(item: tuple[Path, int, str]) -> tuple[str | None, str]:
        """(sha256, "") for a good file, (None, reason) for a bad one."""
        path = item[0]
        try:
            if check_pixels:
                decode_image(path)
            return sha256_file(path), ""
        except BadImageError as exc:
            return None, str(exc)
        except OSError as exc:
            return None, f"unreadable: {exc.strerror or exc}"

    # decoding and hashing release the GIL: threads scale them over the cores
    records, bad = [], []
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        results = pool.map(check, files, chunksize=64)
        for (path, label, split), (digest, reason) in tqdm(zip(files, results), total=len(files),
                                                           desc="scanning images", unit="img", leave=False):
            if digest is None:
                if bad_images == "error":
                    raise DataError(f"bad image {path}: {reason} (set data.bad_images: skip to skip such files)")
                bad.append((str(path), reason))
                continue
            records.append(Record(str(path), label, digest, split))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for label, name in enumerate(class_names):
        if require_both and not any(r.label == label for r in records):
            raise DataError(f"no usable images of class '{name}' under {root}: training needs both classes")
    return records, bad


def scan_sources(cfg: DataConfig, workers: int = 1) -> tuple[list[Record], list[tuple[str, str]]]:
    """Every record of ``data.root`` and ``data.extra_roots``: class folders (``Negative/``,
    ``Positive/``, or pre-split) or annotated photos (``images/`` + ``masks/``, cut into
    labelled tiles by the ``data.tile_*`` rule). Each record's ``source`` is its root's name."""
    rule = TileRule(tuple(cfg.tile_sizes), cfg.tile_crack_fraction, cfg.tile_clear_margin, cfg.group_pattern)
    roots = [Path(cfg.root), *(Path(r) for r in cfg.extra_roots)]
    names = [r.resolve().name for r in roots]
    if len(set(names)) != len(names):
        raise DataError(f"data roots must have different folder names (they name the sources): {names}")
    records, bad = [], []
    for root, name in zip(roots, names):
        if is_mask_root(root):
            recs, b = scan_mask_root(root, rule, name)
            if not recs:
                raise DataError(f"{root}: no labelled tiles (photos in images/, masks in masks/ with the same names)")
        else:
            recs, b = scan(root, cfg.class_names, cfg.bad_images, workers=workers, require_both=not cfg.extra_roots)
            for r in recs:
                r.source = name
        if b and cfg.bad_images == "error":
            raise DataError(f"bad image {b[0][0]}: {b[0][1]} (set data.bad_images: skip to skip such files)")
        records += recs
        bad += b
    if len(roots) > 1:
        presplit = {bool(r.split) for r in records}
        if len(presplit) > 1:
            raise DataError("data roots mix pre-split (train/val/test) and unsplit folders: use one kind")
        for label, name in enumerate(cfg.class_names):
            if not any(r.label == label for r in records):
                raise DataError(f"no usable images of class '{name}' in any data root: training needs both classes")
    return records, bad
