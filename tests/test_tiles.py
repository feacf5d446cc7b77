"""Training from annotated photos: synthetic photo + mask pairs (never the field images themselves)."""
from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, make_folder, run_main
from PIL import Image

from crack_lightning.config.schema import DataConfig
from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.records import read_split_csv
from crack_lightning.data.scan import scan_sources
from crack_lightning.data.split import check_no_leak, split_records
from crack_lightning.data.tiles import TileRule, group_of, scan_mask_root


def photo_with_mask(rng, size=448, crack_rows=()):
    """A grey concrete-like photo; each entry of ``crack_rows`` draws a dark 3-px horizontal crack at that
    row (from x=0 to the middle), and the mask marks exactly those pixels."""
    img = rng.normal(165, 10, (size, size, 1)).clip(0, 255).repeat(3, 2).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for y in crack_rows:
        img[y:y + 3, : size // 2] = 45
        mask[y:y + 3, : size // 2] = 255
    return img, mask


def write_root(root, photos):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, (img, mask) in photos.items():
        Image.fromarray(img).save(root / "images" / f"{name}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


@pytest.fixture
def mask_root(tmp_path):
    rng = np.random.default_rng(0)
    photos = {f"wall_{k}_{c}_0": photo_with_mask(rng, crack_rows=(50,) if k % 2 else ()) for k in range(6)
              for c in (0, 1)}  # six original photos, two crops each
    return write_root(tmp_path / "site", photos)


def test_tile_rule():
    rule = TileRule(sizes=(100,), crack_fraction=0.005, clear_margin=8)
    mask = np.zeros((300, 300), bool)
    mask[50, 0:60] = True  # 60 px of 10,000: 0.6 %
    assert rule.label(mask, 0, 0, 100) == 1
    assert rule.label(mask, 0, 100, 100) == 0
    mask2 = np.zeros((300, 300), bool)
    mask2[104, 10:20] = True  # 4 px below the tile at y=0..99: inside the 8 px margin
    assert rule.label(mask2, 0, 0, 100) is None
    mask2[104, 10:20] = False
    mask2[150, 10:12] = True  # 2 px inside the tile: a crack too small to call (0.02 %)
    assert rule.label(mask2, 0, 100, 100) is None


def test_groups_name_the_original_photo():
    assert group_of("Rissbilder_for_Florian_9S6A2783_485_963_3019_3865") == "Rissbilder_for_Florian_9S6A2783"
    assert group_of("GAPS384_test_0016_541_1") == "GAPS384_test"  # coarse by default: never a leak
    assert group_of("GAPS384_test_0016_541_1", r"GAPS384_\w+?_(\d{4})") == "0016"
    assert group_of("noncrack_noncrack_concrete_wall_12_3", r"concrete_wall_(\d+)") == "12"
    assert group_of("Sylvie_Chambon_006") == "Sylvie_Chambon"


def test_photos_become_labelled_tiles_at_several_sizes(mask_root):
    records, bad = scan_mask_root(mask_root, TileRule(sizes=(224, 112)))
    assert bad == []
    by_photo = {}
    for r in records:
        by_photo.setdefault(r.path, []).append(r)
    assert len(by_photo) == 12
    cracked = [p for p in by_photo if int(p.split("wall_")[1][0]) % 2]
    for path, recs in by_photo.items():
        labels = {r.box: r.label for r in recs}
        if path in cracked:  # the crack lies in the top-left 224 tile, rows 50-52, x 0-223
            assert labels["0,0,224,224"] == 1 and labels["224,224,224,224"] == 0
            assert "0,224,224,224" in labels and labels["0,224,224,224"] == 0
            assert labels["0,0,112,112"] == 1 and labels["112,0,112,112"] == 1 and labels["336,0,112,112"] == 0
            assert "224,0,112,112" not in labels  # the crack ends 1 px left of it: within the margin, unused
            assert "0,112,112,112" not in labels or labels["0,112,112,112"] == 0
        else:
            assert set(labels.values()) == {0} and len(labels) == 4 + 16
    assert {r.source for r in records} == {"site"} and {r.group for r in records} == {"site/wall"}  # coarse default
    records, _ = scan_mask_root(mask_root, TileRule(sizes=(224,), group_pattern=r"wall_(\d+)"))
    assert {r.group for r in records} == {f"site/{k}" for k in range(6)}  # one group per original photo


def test_tiles_of_one_photo_share_a_split_and_sources_are_split_each(tmp_path, mask_root):
    make_folder(tmp_path / "patches", n_per_class=10)
    cfg = DataConfig(root=str(tmp_path / "patches"), extra_roots=[str(mask_root)], tile_sizes=[224],
                     group_pattern=r"wall_(\d+)")
    records, _ = scan_sources(cfg)
    records = split_records(records, 0.25, 0.25, 0)
    check_no_leak(records)
    groups = {}
    for r in records:
        groups.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for g, s in groups.items() if g)
    for source in ("patches", "site"):  # validation and test span every source
        assert {r.split for r in records if r.source == source} == {"train", "val", "test"}


def test_balanced_sources_are_drawn_equally(tmp_path, mask_root):
    make_folder(tmp_path / "patches", n_per_class=30)
    cfg = DataConfig(root=str(tmp_path / "patches"), extra_roots=[str(mask_root)], tile_sizes=[224],
                     balance_sources=True, batch_size=8, num_workers=0, group_pattern=r"wall_(\d+)")
    records = split_records(scan_sources(cfg)[0], 0.2, 0.2, 0)
    from crack_lightning.contract import Preprocessing

    dm = CrackDataModule(cfg, records, Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    train = dm.split("train")
    w = dm.source_weights(len(train))
    per_source = {s: float(sum(wi for wi, r in zip(w, train) if r.source == s)) for s in ("patches", "site")}
    assert per_source["patches"] == pytest.approx(per_source["site"])
    assert sum(r.source == "patches" for r in train) > 2 * sum(r.source == "site" for r in train)
    x = next(iter(dm.train_dataloader())).x
    assert x.shape == (8, 3, 32, 32)


def test_train_from_patches_and_annotated_photos(tmp_path, mask_root):
    patches = make_folder(tmp_path / "patches", n_per_class=8)
    res = run_main("train.py", "--config", ROOT / "configs/quickstart.yaml", "--data.root", patches,
                   "--data.extra_roots", mask_root, "--data.tile_sizes", "224,112", "--data.balance_sources", "true",
                   "--data.group_pattern", r"wall_(\d+)",
                   "--model.pretrained", "none", "--model.image_size", "32", "--data.num_workers", "0",
                   "--train.frozen.epochs", "1", "--output_dir", tmp_path / "runs", "--run_name", "r",
                   "--trainer.enable_progress_bar", "false")
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "runs" / "r"
    records = read_split_csv(run / "split.csv")
    tiles = [r for r in records if r.box]
    assert tiles and all(r.source == "site" and r.group for r in tiles)
    check_no_leak(records)
    with open(run / "test_predictions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {row["source"] for row in rows} == {"patches", "site"} and any(row["box"] for row in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"]["test"]["n"] == len(rows)


def test_leave_one_source_out_command(tmp_path, monkeypatch):
    """experiments/loso.py end to end on synthetic sources named like the field ones: one fold, every figure."""
    from conftest import ROOT, run_cli

    rng = np.random.default_rng(1)
    field = tmp_path / "field"
    for k, source in enumerate(("rissbilder", "concrete_nocrack", "gaps", "aigle", "cracktree")):
        photos = {f"{source}_{i}": photo_with_mask(rng, crack_rows=(60, 300) if i % 2 and source != "concrete_nocrack"
                                                   else ()) for i in range(4)}
        write_root(field / source, photos)
    mendeley = make_folder(tmp_path / "mendeley", n_per_class=6)
    masonry = tmp_path / "masonry"
    make_folder(masonry, n_per_class=3, classes=("Positive",))
    out = tmp_path / "loso.json"
    common = ["--mendeley", str(mendeley), "--field", str(field), "--masonry", str(masonry), "--out", str(out),
              "--heatmap", str(tmp_path / "heat.png"), "--heatmap-fold", "pavement"]
    # train apart (as on a lent GPU), then score the run it left (as here)
    res = run_cli("experiments/loso.py", *common, "--train-only", "--folds", "pavement", "--mendeley-per-class", "6",
                  "--output-dir", str(tmp_path / "runs"), "--set", "train.frozen.epochs=2", "model.image_size=64",
                  "data.num_workers=0", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "runs").glob("pavement_*")
    assert (run / "model.pt").is_file() and float((run / "train_wall_s.txt").read_text()) > 0
    split = tmp_path / "mendeley_split.csv"  # a "full Mendeley split": its test rows score every model
    rows = [f"{f},{int(f.parent.name == 'Positive')},test" for f in sorted(mendeley.rglob("*.jpg"))]
    split.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    import runpy

    monkeypatch.setattr(sys, "argv", ["loso.py", *common, "--runs", f"pavement={run}", "--mendeley-test", str(split)])
    with pytest.raises(SystemExit) as done:  # scoring needs no fresh process: run the script in this one
        runpy.run_path(str(ROOT / "experiments" / "loso.py"), run_name="__main__")
    assert done.value.code == 0
    r = json.loads(out.read_text())["folds"]["pavement"]
    assert r["held_out"] == ["aigle", "cracktree"] and "aigle" not in r["trained_on"]
    assert r["trained_on"] == ["mendeley", "rissbilder", "concrete_nocrack", "gaps"]
    assert r["train_wall_s"] == float((run / "train_wall_s.txt").read_text())
    assert r["mendeley_full_test"]["n"] == 12 and 0 <= r["mendeley_full_test"]["acc"] <= 1
    t = r["held_out_tiles"]
    # 8 photos x 4 tiles: each cracked photo (2 per source) has 2 crack tiles and 2 too near its crack
    assert t["n"] == t["tp"] + t["fp"] + t["fn"] + t["tn"] == 24 and t["tp"] + t["fn"] == 8
    assert 0 <= t["f1"] <= 1 and r["mendeley_test_n"] > 0 and 0 <= r["masonry_recall"] <= 1
    assert r["localize"]["n"] > 0 and (tmp_path / "heat.png").stat().st_size > 0
    assert "| pavement |" in out.with_suffix(".md").read_text()


def test_site_calibration_sets_the_threshold_above_the_shown_crack_free_photos(monkeypatch):
    """experiments/loso.py's site calibration: the threshold just above every tile of the k crack-free photos
    shown; false alarms counted on the photos not shown, scores on the crack tiles."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("loso", ROOT / "experiments" / "loso.py")
    loso = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loso)
    walls = torch.tensor([0.5, 0.1, 0.5, 0.2, 0.5, 0.3])  # three photos, each with a tile at 0.5
    photos = ["a", "a", "b", "b", "c", "c"]
    probs, labels = torch.tensor([0.9, 0.4, 0.6]), torch.tensor([1.0, 1.0, 0.0])
    (c,) = loso.site_calibration(walls, photos, probs, labels, counts=(2,), draws=4)
    # whichever two are shown, the threshold is just above 0.5: no alarm on the third; 0.9 and 0.6 flagged
    assert c["false_alarms"] == c["false_alarms_worst"] == 0.0
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 0.5, 0.5)
    walls[0] = 0.95  # photo a now has a tile that looks cracked
    (c,) = loso.site_calibration(walls, photos, probs, labels, counts=(1,), draws=20)
    # shown b or c: one alarm (a's 0.95 tile) among the 4 tiles of the two photos not shown; shown a: none
    assert 0.0 < c["false_alarms"] < c["false_alarms_worst"] == 0.25
    # with refit (--calibrate-mode head): the head is first fitted again on the anchors plus the shown
    # photos' features; the site's own kind of crack-free texture then stays below the threshold
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(4, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        head.bias.zero_()
    crack, clear, site = torch.tensor([3.0, 0, 0, 0]), torch.tensor([-3.0, 0, 0, 0]), torch.tensor([2.0, 3.0, 0, 0])
    anchors = {"features": torch.cat([crack + 0.3 * torch.randn(50, 4, generator=g),
                                      clear + 0.3 * torch.randn(50, 4, generator=g)]).half(),
               "labels": torch.cat([torch.ones(50), torch.zeros(50)]).to(torch.uint8)}
    walls_x, crack_x = site + 0.3 * torch.randn(6, 4, generator=g), crack + 0.3 * torch.randn(3, 4, generator=g)
    with torch.no_grad():
        w0, p0 = torch.sigmoid(head(walls_x)).squeeze(1), torch.sigmoid(head(crack_x)).squeeze(1)
    args = (w0, photos, p0, torch.ones(3), 0.5)
    (plain,) = loso.site_calibration(*args, counts=(1,), draws=10)
    (refit,) = loso.site_calibration(*args, counts=(1,), draws=10, refit=(head, anchors, walls_x, crack_x))
    assert plain["false_alarms"] > 0 and plain["recall"] == 1.0
    assert refit["false_alarms"] == refit["false_alarms_worst"] == 0.0 and refit["recall"] == 1.0
