"""Scan a labelled folder, split it without leaks, and serve it to Lightning.

A data root is either ``root/<class>/...`` (split here: stratified, seeded,
duplicate-aware) or ``root/{train,val,test}/<class>/...`` (split given). Files
with identical bytes (same SHA-256) always land on the same side of the split:
the public Mendeley release holds ~1,500 such groups and a naive split leaks
them into the test set.
"""
from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import cv2
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import ConfigError, DataError  # noqa: F401 - DataError re-exported: callers import it from here too
from .config import DataConfig
from .images import MAX_PIXELS, BadImageError, decode_image, is_image_file
from .transforms import Preprocessing, eval_transform, stack_uint8, train_transform

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted for reproducibility."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


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
    from .tiles import TileRule, is_mask_root, scan_mask_root

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


SPLIT_CSV_HEADER = ["path", "label", "class_name", "split", "sha256", "box", "group", "source"]


def write_split_csv(records: list[Record], path: Path, class_names: Sequence[str]) -> None:
    """Every image with its label, split and hash. UTF-8; a path that is not valid UTF-8 is
    written with ``\\xNN`` escapes and a cell a spreadsheet would run gets a leading ``'``
    (:mod:`crack_lightning.io`); :func:`read_split_csv` undoes both."""
    from .io import atomic_write, csv_path, csv_text

    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(SPLIT_CSV_HEADER)
        for r in records:
            w.writerow([csv_path(r.path), r.label, csv_text(class_names[r.label]), r.split, r.sha256, r.box,
                        csv_text(r.group), csv_text(r.source)])


def remap_paths(records: list[Record], pairs: Sequence[str]) -> list[Record]:
    """Rewrite the beginning of each record's path by the first matching ``OLD=NEW`` pair, in place
    (a split made on another machine, e.g. a lent GPU host). Raises ConfigError on a malformed pair."""
    maps = [kv.split("=", 1) for kv in pairs]
    if any(len(m) != 2 or not m[0] for m in maps):
        raise ConfigError("--path-map takes OLD=NEW pairs")
    for r in records:
        for old, new in maps:
            if r.path.startswith(old):
                r.path = new + r.path[len(old):]
                break
    return records


def read_run_split(run_dir: Path, path_map: Sequence[str] = (), need: Sequence[str] = ("train", "val", "test")) -> list[Record]:
    """A finished run's ``split.csv``, paths rewritten by ``path_map`` (:func:`remap_paths`); every image of
    the ``need`` splits must be here, else ConfigError naming one and the ``--path-map`` remedy."""
    if not (Path(run_dir) / "split.csv").is_file() or not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a finished run folder (no split.csv or config.yaml)")
    records = remap_paths(read_split_csv(Path(run_dir) / "split.csv"), path_map)
    missing = sorted({r.path for r in records if r.split in need and not Path(r.path).is_file()})
    if missing:
        raise ConfigError(f"{len(missing)} image(s) of the split are not here (e.g. {missing[0]}): a run made on "
                          "another machine needs --path-map OLD=NEW")
    return records


def read_split_csv(path: Path) -> list[Record]:
    from .io import csv_value, path_from_csv

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


class Batch(NamedTuple):
    """What every loader of the project yields (training, evaluation, prediction, robustness).

    ``x``: images, normalised floats ``(B,3,S,S)`` or uint8 ``(B,H,W,3)`` that the model's device
    finishes (:meth:`CrackClassifier.on_after_batch_transfer`), or cached backbone features
    ``(B,C)`` when ``features`` is true (the head alone trains on them); ``None`` when no item of
    the batch could be read. ``y``: labels (-1 = unknown), ``index``: the items' dataset indices,
    ``errors``: ``(index, reason)`` of items that could not be read (prediction only).
    """

    x: torch.Tensor | None
    y: torch.Tensor
    index: torch.Tensor
    errors: list
    features: bool = False


class ImageDataset(Dataset):
    """THE image dataset: items ``(image or None, label, index, error)`` of records (files, or
    tiles of annotated photos) or plain paths (label -1).

    ``transform`` (albumentations; ``None`` leaves the decoded HWC uint8 array for :class:`Batches`
    to stack and the model's device to finish); ``before(image, index)`` alters the decoded image
    first (robustness shifts); ``tolerant``: a file that is not a usable image becomes an error
    item instead of an exception (prediction goes on past it; training never does).
    """

    def __init__(self, items: Sequence[Record | str | Path], transform: Callable | None = None, *,
                 before: Callable | None = None, tolerant: bool = False, max_pixels: int = MAX_PIXELS):
        self.records = [r if isinstance(r, Record) else Record(str(r), -1, "") for r in items]
        self.transform, self.before, self.tolerant, self.max_pixels = transform, before, tolerant, max_pixels
        self._photo: tuple[str, object] = ("", None)  # the last photo decoded: its tiles come in a row

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        try:
            if r.box:
                from .tiles import crop

                if self._photo[0] != r.path:
                    self._photo = (r.path, decode_image(r.path, self.max_pixels))
                image = crop(self._photo[1], r.box)
            else:
                image = decode_image(r.path, self.max_pixels)
        except BadImageError as exc:
            if not self.tolerant:
                raise
            return None, float(r.label), i, str(exc)
        if self.before is not None:
            image = self.before(image, i)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, float(r.label), i, ""


@dataclass
class Batches:
    """THE collate: items ``(image or None, label, index, error)`` -> one :class:`Batch`.

    ``uint8``: the images are HWC uint8 arrays, stacked by :func:`stack_uint8` (``defer_resize``:
    the model's device resizes them too); else float tensors (or cached features, ``features``),
    stacked as they are. Unreadable items travel as ``errors``.
    """

    pre: Preprocessing | None = None
    uint8: bool = False
    defer_resize: bool = False
    features: bool = False

    def __call__(self, items: list[tuple]) -> Batch:
        good = [it for it in items if it[0] is not None]
        errors = [(it[2], it[3]) for it in items if it[0] is None]
        if not good:
            x = None
        elif self.uint8:
            x = stack_uint8([it[0] for it in good], self.pre, self.defer_resize)
        else:
            x = torch.stack([torch.as_tensor(it[0]) for it in good])
        y = torch.tensor([float(it[1]) for it in good], dtype=torch.float32)
        index = torch.tensor([int(it[2]) for it in good], dtype=torch.long)
        return Batch(x, y, index, errors, self.features)


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def make_loader(ds: Dataset, batch_size: int, num_workers: int, *, shuffle: bool = False, collate_fn=None,
                pin_memory: bool = False, prefetch_factor: int = 2, persistent_workers: bool = False,
                sampler=None) -> DataLoader:
    """Every DataLoader of the project that decodes images.

    The worker processes are the parallelism, so OpenCV runs single-threaded:
    with its default pool (one thread per core) in each of 15 workers on a
    16-core GPU host, the loader delivered ~3,400 img/s where one worker alone
    does ~900. It is set here, in the parent, before the workers fork: a worker
    that reconfigures an OpenCV pool inherited through fork deadlocks.
    """
    num_workers = min(num_workers, available_cpus())  # more workers than cores only contend (and warn)
    if num_workers > 0:
        cv2.setNumThreads(1)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn,
                      pin_memory=pin_memory, prefetch_factor=prefetch_factor if num_workers > 0 else None,
                      persistent_workers=persistent_workers and num_workers > 0)


class TensorItems(Dataset):
    """Pre-computed backbone features served like images: ``(feature, label, index, "")``."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    @classmethod
    def concat(cls, parts: Sequence["TensorItems"]) -> "TensorItems":
        return cls(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.features[i], float(self.labels[i]), i, ""


class CrackDataModule(L.LightningDataModule):
    """The data of a run: ``prepare_data`` scans and splits once (``split.csv``), ``setup`` reads it,
    the loaders serve it (train with augmentation, val/test with the eval transform). Given
    ``records``, it serves those (tests, benchmarks).

    ``device_normalize``: batches stay uint8 ``(B,H,W,3)`` and the model normalises them on
    the GPU (a quarter of the bytes to pin and copy, which is what starves a fast GPU);
    ``defer_resize`` also leaves the eval resize to the GPU (see :func:`stack_uint8`).
    """

    def __init__(self, cfg: DataConfig, records: list[Record] | None = None, pre: Preprocessing | None = None,
                 device_normalize: bool = False, defer_resize: bool = False, run_dir: str | Path | None = None):
        super().__init__()
        self.cfg, self.records, self.pre = cfg, records, pre
        self.run_dir = Path(run_dir) if run_dir else None
        self.device_normalize = device_normalize
        self.defer_resize = device_normalize and defer_resize
        self.features: dict[str, TensorItems] = {}

    def prepare_data(self) -> None:
        """Once per run (rank 0; Lightning calls it on one process per node): scan, hash and split
        into ``run_dir/split.csv``. A split already there (a resumed run, or the one rank 0 wrote
        before DDP workers started) is kept."""
        if self.records is None and self.run_dir and not (self.run_dir / "split.csv").is_file():
            build_split(self.cfg, self.run_dir)

    def setup(self, stage: str | None = None) -> None:
        """Every process: read the split ``prepare_data`` wrote (once; later calls keep it)."""
        if self.records is None:
            if not self.run_dir or not (self.run_dir / "split.csv").is_file():
                raise DataError("no split to train on: CrackDataModule.prepare_data() has not written split.csv")
            self.records = read_split_csv(self.run_dir / "split.csv")

    # ---- the cached-feature frozen stage: what the loaders serve ----------------------------------
    def cache_features(self, make_extractor: Callable[[], Callable], views: int = 0, cache_file: Path | None = None,
                       rank_zero: bool = True) -> None:
        """Run the frozen backbone (``make_extractor()``) once over every split, plus ``views``
        augmented views of the training images; the loaders then serve the stored features
        (``Batch(features=True)``) and the head alone trains on them. Under DDP, rank 0 computes
        and writes ``cache_file``; the other processes read it instead of recomputing."""
        if not rank_zero and cache_file is not None and cache_file.is_file():
            stored = torch.load(cache_file, weights_only=True)
            self.features = {s: TensorItems(f, y) for s, (f, y) in stored.items()}
            return
        extract = make_extractor()
        feats = {s: compute_features(extract, self.eval_loader(s), f"caching features ({s})")
                 for s in SPLITS if self.split(s)}
        extra = [compute_features(extract, self.eval_loader("train", augment=True),
                                  f"caching features (train, augmented view {k + 1})")
                 for k in range(views)]
        feats["train"] = TensorItems.concat([feats["train"], *extra])
        self.features = feats
        if rank_zero and cache_file is not None:  # for DDP workers, if the strategy starts any
            from .io import atomic_write

            with atomic_write(cache_file, "wb") as f:
                torch.save({s: (t.features, t.labels) for s, t in feats.items()}, f)

    def serve_images(self) -> None:
        """Images again (the backbone is about to train: stored features would no longer describe it)."""
        self.features = {}

    @property
    def serves_features(self) -> bool:
        return bool(self.features)

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def dataset(self, name: str, augment: bool = False) -> Dataset:
        if name in self.features:
            return self.features[name]
        return ImageDataset(self.split(name), self._transform(augment))

    def _transform(self, augment: bool):
        norm = not self.device_normalize
        if augment:
            return train_transform(self.pre, self.cfg.augment, norm)
        return None if self.device_normalize else eval_transform(self.pre)  # uint8: Batches resizes

    def _loader(self, ds: Dataset, shuffle: bool, sampler=None) -> DataLoader:
        images = not isinstance(ds, TensorItems)
        collate = Batches(self.pre, uint8=images and self.device_normalize, defer_resize=self.defer_resize,
                          features=not images)
        return make_loader(ds, self.cfg.batch_size, self.cfg.num_workers if images else 0, shuffle=shuffle,
                           collate_fn=collate, pin_memory=torch.cuda.is_available(),
                           prefetch_factor=self.cfg.prefetch_factor, persistent_workers=True, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train", augment=True)
        weights = self.source_weights(len(ds))
        if weights is None:
            return self._loader(ds, shuffle=True)
        from torch.utils.data import WeightedRandomSampler

        sampler = WeightedRandomSampler(weights, num_samples=len(ds), replacement=True)
        return self._loader(ds, shuffle=False, sampler=sampler)

    def source_weights(self, n: int) -> torch.Tensor | None:
        """``data.balance_sources``: per-item weights under which every source is drawn equally often
        (``n`` items: the training records, repeated when cached features hold augmented views)."""
        train = self.split("train")
        sources = [r.source for r in train]
        if not self.cfg.balance_sources or len(set(sources)) < 2 or n % len(train):
            return None
        counts = Counter(sources)
        return torch.tensor([1.0 / counts[s] for s in sources] * (n // len(train)), dtype=torch.double)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def eval_loader(self, name: str, augment: bool = False, records: list[Record] | None = None) -> DataLoader:
        """Images of split ``name`` (or just ``records`` of it) in order, never cached features
        (``augment``: train transform)."""
        return self._loader(ImageDataset(self.split(name) if records is None else records, self._transform(augment)),
                            shuffle=False)


@torch.inference_mode()
def compute_features(extract, loader: DataLoader, desc: str) -> TensorItems:
    """Run the frozen backbone once over ``loader`` (progress bar labelled ``desc``): the features the head
    trains on, or that a release stores as training anchors."""
    feats, labels = [], []
    for b in tqdm(loader, desc=desc, unit="batch"):
        feats.append(extract(b.x))
        labels.append(b.y)
    return TensorItems(torch.cat(feats), torch.cat(labels))


def build_split(cfg: DataConfig, out_dir: Path) -> list[Record]:
    """Scan every source, drop unusable files and label conflicts (listed in ``bad_images.csv``),
    split by groups, refuse data that cannot make an honest model, write ``split.csv``."""
    from .io import atomic_write, csv_path, csv_text, path_text

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


__all__ = [
    "Batch", "Batches", "CrackDataModule", "DataError", "ImageDataset", "Record", "TensorItems", "build_split",
    "compute_features", "check_no_leak", "check_trainable", "class_counts", "label_conflicts", "list_images", "make_loader",
    "read_split_csv", "scan", "scan_sources", "split_records", "split_summary", "subsample", "write_split_csv",
]
