import shutil
from collections import defaultdict

import pytest
import torch
from conftest import make_folder

from crack_lightning.config.schema import DataConfig
from crack_lightning.contract import Preprocessing
from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.loaders import make_loader
from crack_lightning.data.records import read_split_csv, write_split_csv
from crack_lightning.data.scan import scan
from crack_lightning.data.split import check_no_leak, label_conflicts, split_records
from crack_lightning.errors import BadImageError, DataError
from crack_lightning.tensor_ops import model_input

CLASSES = ["Negative", "Positive"]


def with_duplicates(root, groups=6, copies=4):
    """Copy some images several times under new names (byte-identical duplicates)."""
    for cls in CLASSES:
        files = sorted((root / cls).glob("*.jpg"))[:groups]
        for f in files:
            for k in range(copies):
                shutil.copy(f, f.with_name(f"dup{k}_{f.name}"))
    return root


def test_duplicates_never_cross_splits(tmp_path):
    root = with_duplicates(make_folder(tmp_path / "d", n_per_class=30))
    records, bad = scan(root, CLASSES)
    assert bad == []
    assert len(records) == 2 * (30 + 6 * 4)
    for seed in range(5):
        split = split_records(records, 0.2, 0.2, seed)
        check_no_leak(split)
        sides = defaultdict(set)
        for r in split:
            sides[r.sha256].add(r.split)
        assert all(len(s) == 1 for s in sides.values())


def test_naive_split_would_leak_so_check_catches_it(tmp_path):
    root = with_duplicates(make_folder(tmp_path / "d", n_per_class=10), groups=2, copies=1)
    records, _ = scan(root, CLASSES)
    for r in records:  # a naive split: copies in test, originals in train
        r.split = "test" if "dup" in r.path else "train"
    with pytest.raises(DataError, match="appear in more than one split"):
        check_no_leak(records)


def test_split_is_stratified_seeded_and_sized(tmp_path):
    root = make_folder(tmp_path / "d", n_per_class=50)
    records, _ = scan(root, CLASSES)
    a = [(r.path, r.split) for r in split_records(records, 0.2, 0.1, 7)]
    b = [(r.path, r.split) for r in split_records(scan(root, CLASSES)[0], 0.2, 0.1, 7)]
    c = [(r.path, r.split) for r in split_records(scan(root, CLASSES)[0], 0.2, 0.1, 8)]
    assert a == b and a != c
    split = split_records(records, 0.2, 0.1, 7)
    for label in (0, 1):
        mine = [r for r in split if r.label == label]
        assert sum(r.split == "val" for r in mine) == 10
        assert sum(r.split == "test" for r in mine) == 5
        assert sum(r.split == "train" for r in mine) == 35


def test_split_csv_roundtrip(tmp_path):
    records = split_records(scan(make_folder(tmp_path / "d"), CLASSES)[0], 0.25, 0.25, 0)
    write_split_csv(records, tmp_path / "split.csv", CLASSES)
    assert read_split_csv(tmp_path / "split.csv") == records


def test_label_conflicts_are_found(tmp_path):
    root = make_folder(tmp_path / "d")
    shutil.copy(root / "Positive" / "Pos_000.jpg", root / "Negative" / "copy.jpg")
    records, _ = scan(root, CLASSES)
    assert sorted(r.path.rsplit("/", 1)[1] for r in label_conflicts(records)) == ["Pos_000.jpg", "copy.jpg"]
    kept = split_records(records, 0.2, 0.2, 0)
    assert len(kept) == len(records) - 2
    assert not any(r.path.endswith(("Pos_000.jpg", "copy.jpg")) for r in kept)


def test_presplit_folders(tmp_path):
    for i, s in enumerate(("train", "val", "test")):
        make_folder(tmp_path / "d" / s, n_per_class=4, seed=i)
    records, _ = scan(tmp_path / "d", CLASSES)
    assert {r.split for r in records} == {"train", "val", "test"}
    assert sum(r.split == "test" for r in records) == 8


@pytest.mark.parametrize("setup,message", [
    (lambda root: None, "data root does not exist"),
    (lambda root: make_folder(root, classes=("Negative",)), r"class folder\(s\) \['Positive'\] not found"),
    (lambda root: (make_folder(root), (root / "Other").mkdir()), r"unknown folder\(s\) \['Other'\]"),
    (lambda root: (make_folder(root, classes=("Negative",)), (root / "Positive").mkdir()), "holds no images"),
])
def test_bad_layouts(tmp_path, setup, message):
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(DataError, match=message):
        scan(root, CLASSES)


def test_datamodule_batches(tmp_path):
    records = split_records(scan(make_folder(tmp_path / "d"), CLASSES)[0], 0.25, 0.25, 0)
    pre = Preprocessing(size=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    dm = CrackDataModule(DataConfig(batch_size=4, num_workers=0, augment="strong"), records, pre)
    x, y, idx, errors, features = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 48, 48) and x.dtype == torch.float32 and not errors and not features
    assert set(y.tolist()) <= {0.0, 1.0} and idx.dtype == torch.long and len(set(idx.tolist())) == 4
    xv = next(iter(dm.val_dataloader())).x
    xv2 = next(iter(dm.val_dataloader())).x
    assert torch.equal(xv, xv2)  # evaluation is deterministic, training is augmented
    assert -1.0 <= float(xv.min()) and float(xv.max()) <= 1.0


def test_scan_threads_give_the_same_records(tmp_path):
    root = with_duplicates(make_folder(tmp_path / "d"))
    (root / "Positive" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    one, bad1 = scan(root, CLASSES, workers=1)
    many, bad4 = scan(root, CLASSES, workers=4)
    assert [(r.path, r.label, r.sha256) for r in one] == [(r.path, r.label, r.sha256) for r in many]
    assert bad1 == bad4 and len(bad1) == 1 and bad1[0][0].endswith("broken.jpg")
    with pytest.raises(DataError, match="broken.jpg"):
        scan(root, CLASSES, bad_images="error", workers=4)


def test_datamodule_device_normalize_ships_uint8(tmp_path):
    records = split_records(scan(make_folder(tmp_path / "d"), CLASSES)[0], 0.25, 0.25, 0)
    pre = Preprocessing(size=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = DataConfig(batch_size=4, num_workers=0)
    raw, y_raw = next(iter(CrackDataModule(cfg, records, pre, device_normalize=True).val_dataloader()))[:2]
    ref, y_ref = next(iter(CrackDataModule(cfg, records, pre).val_dataloader()))[:2]
    assert raw.dtype == torch.uint8 and raw.shape == (4, 48, 48, 3) and torch.equal(y_raw, y_ref)
    assert torch.allclose(model_input(pre, raw), ref, atol=1e-5)
    deferred = next(iter(CrackDataModule(cfg, records, pre, device_normalize=True,
                                         defer_resize=True).val_dataloader())).x
    assert deferred.shape == (4, 64, 64, 3)  # the 64 px files travel as they are; the device resizes
    assert torch.equal(model_input(pre, deferred), model_input(pre, raw))


def test_one_dataset_serves_records_paths_shifts_and_unreadable_files(tmp_path):
    """ImageDataset + Batches are the one item/batch format of training, prediction and robustness:
    records keep their labels, plain paths get -1, ``before`` alters the decoded image, and with
    ``tolerant`` an unreadable file becomes an error entry of the batch instead of an exception."""
    from crack_lightning.data.loaders import Batches, ImageDataset

    records = scan(make_folder(tmp_path / "d", n_per_class=2), CLASSES)[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really")
    pre = Preprocessing(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = ImageDataset([*records, broken], None, before=lambda im, i: im * 0 + i, tolerant=True)
    batch = Batches(pre, uint8=True)([ds[i] for i in range(len(ds))])
    assert batch.x.dtype == torch.uint8 and batch.x.shape == (4, 32, 32, 3)
    assert batch.y.tolist() == [float(r.label) for r in records] and batch.index.tolist() == [0, 1, 2, 3]
    assert [int(batch.x[i].max()) for i in range(4)] == [0, 1, 2, 3]  # ``before`` ran, with the index
    assert len(batch.errors) == 1 and batch.errors[0][0] == 4 and "not an image" in batch.errors[0][1]
    assert ImageDataset([broken], tolerant=True)[0][1] == -1.0
    with pytest.raises(BadImageError):
        ImageDataset([broken])[0]  # not tolerant: training stops on a file it cannot read
    assert Batches(pre)([ImageDataset([broken], tolerant=True)[0]]).x is None


class _ThreadsSeen(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import cv2
        import numpy as np

        cv2.resize(np.zeros((1500, 1500, 3), np.uint8), (400, 400), interpolation=cv2.INTER_AREA)
        return cv2.getNumThreads()


def test_loader_workers_run_opencv_single_threaded():
    """Each loader worker is one unit of parallelism: OpenCV must not start its own pool in it,
    also when the parent process already runs an OpenCV pool (reconfiguring it inside a forked
    worker deadlocks; the setting must come from the parent)."""
    import cv2
    import numpy as np

    cv2.setNumThreads(2)
    cv2.resize(np.zeros((1500, 1500, 3), np.uint8), (400, 400), interpolation=cv2.INTER_AREA)  # parent pool runs
    loader = make_loader(_ThreadsSeen(), batch_size=2, num_workers=1)
    assert next(iter(loader)).tolist() == [1, 1]


def test_datamodule_prepares_once_and_sets_up_from_the_split(tmp_path, monkeypatch):
    """prepare_data scans and splits once into split.csv; setup reads it; a second prepare_data (a resumed
    run, a DDP worker, Lightning's own call) keeps it."""
    from crack_lightning.config.schema import DataConfig
    from crack_lightning.data import split as data_mod
    from crack_lightning.data.datamodule import CrackDataModule
    from crack_lightning.errors import DataError

    root = make_folder(tmp_path / "d", n_per_class=8)
    cfg = DataConfig(root=str(root), val_fraction=0.25, test_fraction=0.25, num_workers=0, batch_size=4)
    scans = []
    real = data_mod.scan_sources
    monkeypatch.setattr(data_mod, "scan_sources", lambda *a, **k: scans.append(1) or real(*a, **k))
    dm = CrackDataModule(cfg, run_dir=tmp_path / "run")
    with pytest.raises(DataError, match="has not written split.csv"):
        dm.setup("fit")
    (tmp_path / "run").mkdir()
    dm.prepare_data()
    dm.prepare_data()
    assert len(scans) == 1 and (tmp_path / "run" / "split.csv").is_file()
    dm.setup("fit")
    other = CrackDataModule(cfg, run_dir=tmp_path / "run")  # another process of the same run
    other.prepare_data()
    other.setup("fit")
    assert len(scans) == 1 and [r.path for r in other.records] == [r.path for r in dm.records]
    assert {r.split for r in dm.records} == {"train", "val", "test"}


def test_copies_across_sources_share_a_split_and_conflicts_across_sources_are_dropped(tmp_path):
    """A byte-identical file in two data roots is one group (never in two splits); with two labels it is
    dropped, as within one root."""
    import shutil

    from crack_lightning.config.schema import DataConfig
    from crack_lightning.data.scan import scan_sources
    from crack_lightning.data.split import check_no_leak, split_records

    a = make_folder(tmp_path / "a", n_per_class=10, seed=1)
    b = make_folder(tmp_path / "b", n_per_class=10, seed=2)
    shutil.copy(a / "Positive" / "Pos_000.jpg", b / "Positive" / "same.jpg")  # same label, other source
    shutil.copy(a / "Negative" / "Neg_000.jpg", b / "Positive" / "clash.jpg")  # other label, other source
    records, _ = scan_sources(DataConfig(root=str(a), extra_roots=[str(b)]))
    out = split_records(records, 0.3, 0.3, 0)
    check_no_leak(out)
    paths = {r.path for r in out}
    assert str(b / "Positive" / "same.jpg") in paths and str(b / "Positive" / "clash.jpg") not in paths
    assert str(a / "Negative" / "Neg_000.jpg") not in paths
    assert len({r.split for r in out if r.path in (str(a / "Positive" / "Pos_000.jpg"),
                                                    str(b / "Positive" / "same.jpg"))}) == 1
