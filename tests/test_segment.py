"""Crack segmentation end to end on small drawn photos: train.py --config configs/segment.yaml, then
predict.py --segment: masks, overlays, per-crack measurements, the summary, bad input."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE, drop_files, launch_chromium, one_error, run_main
from PIL import Image

from crack_lightning.models.segmentation import prf, tolerant_counts


def annotated(root, n: int, size=(160, 128), seed: int = 0):
    """A source of concrete-like photos with a dark meandering crack and its mask (some photos clean)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        w, h = size
        img = np.repeat(rng.normal(170, 10, (h, w, 1)).clip(0, 255), 3, 2).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        if i % 3:
            x = int(rng.integers(30, w - 30))
            for y in range(h):
                x = int(np.clip(x + rng.integers(-1, 2), 3, w - 4))
                mask[y, x - 1:x + 2] = 255
            img[mask > 0] = 50
        Image.fromarray(img).save(root / "images" / f"{root.name}-{i:03d}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"{root.name}-{i:03d}.png")
    return root


TINY_SEG = ["--config", str(ROOT / "configs/segment.yaml"), "--model.pretrained", "none", "--model.weights_file", "null",
            "--segment.epochs", "1", "--segment.crop_size", "64", "--data.batch_size", "4", "--data.num_workers", "0",
            "--data.group_pattern", "", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    a, b = annotated(tmp / "walls", 12), annotated(tmp / "slabs", 9, seed=1)
    clear = tmp / "clear" / "Negative"  # crack-free images of another size, one of them unreadable
    clear.mkdir(parents=True)
    for i, side in enumerate((227, 90, 300)):
        Image.new("RGB", (side, side), (150 + i, 150, 150)).save(clear / f"n{i}.jpg")
    (clear / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    res = run_main("train.py", *TINY_SEG, "--data.root", a, "--data.extra_roots", f"[{b}]", "--segment.negatives",
                   f"[{clear.parent}]", "--output_dir", tmp / "runs", "--run_name", "s")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping" in res.stderr and "broken.jpg" in res.stderr
    assert "test pixel F1" in res.stdout
    return tmp, tmp / "runs" / "s"


def test_training_writes_a_run_folder_with_a_segmentation_model(seg_run):
    _, run = seg_run
    for name in ("config.yaml", "split.csv", "metrics.json", "model.pt", "checkpoints/segment/best.ckpt",
                 "checkpoints/segment/last.ckpt", "logs/segment/metrics.csv"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["task"] == "segment" and 0 < float(ckpt["state_dict"]["threshold"]) < 1
    decision = json.loads((run / "metrics.json").read_text())["photos_decision"]
    assert decision["min_crack_px"] == ckpt["hyper_parameters"]["min_crack_px"] >= 1  # chosen on validation, stored
    rows = list(csv.DictReader((run / "split.csv").open()))
    assert decision["test_photos"] == sum(r["split"] == "test" for r in rows) and 0 <= decision["test_false_alarms"] <= 1
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["source"] for r in rows} == {"walls", "slabs", "negatives/clear"}
    negatives = [r for r in rows if r["source"] == "negatives/clear"]
    assert len(negatives) == 3 and {(r["split"], r["mask"]) for r in negatives} == {("train", "")}


def test_a_crack_free_training_image_is_learned_as_an_empty_crack_map(seg_run):
    from crack_lightning.contract import Preprocessing
    from crack_lightning.data.segmentation import (
        MaskedPhotos,
        read_photo_split,
        train_augment,
    )

    _, run = seg_run
    train = read_photo_split(run / "split.csv")["train"]
    negative = next(p for p in train if not p.mask)
    annotated_photo = next(p for p in train if p.mask and np.asarray(Image.open(p.mask)).any())
    pre = Preprocessing(size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    x, y = MaskedPhotos([negative, annotated_photo], pre, train_augment(64))[0]
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and not y.any()
    _, y_whole = MaskedPhotos([negative, annotated_photo], pre)[1]
    assert y_whole.sum() > 0  # annotated photos keep their masks


def test_predict_segment_writes_masks_overlays_measurements_and_a_summary(seg_run, tmp_path):
    tmp, run = seg_run
    photos = sorted((tmp / "walls" / "images").glob("*.jpg"))[:3]
    big = tmp_path / "big.png"  # larger than a window and not a multiple of 32: windows, padding
    Image.new("RGB", (1100, 700), (170, 170, 170)).save(big)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    res = run_main("predict.py", "--segment", "--checkpoint", run / "model.pt", *photos, big, broken,
                   "--output", out, "--mm-per-pixel", "0.05")
    assert res.returncode == 1 and "unreadable" in res.stderr  # the broken file is its own error row
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert list(rows[0])[:11] == ["photo", "width", "height", "mask", "overlay", "cracks", "length_px",
                                  "max_width_px", "longest_px", "crack", "error"]
    assert {"length_mm", "max_width_mm"} <= set(rows[0]) and len(rows) == 5 and rows[-1]["error"]
    for row in rows[:-1]:
        mask = np.asarray(Image.open(out / row["mask"]))
        assert mask.shape == (int(row["height"]), int(row["width"])) and set(np.unique(mask)) <= {0, 255}
        assert (out / row["overlay"]).is_file() and row["crack"] in ("0", "1")
        cracks = list(csv.DictReader((out / row["mask"].replace("_mask.png", "_cracks.csv")).open()))
        assert len(cracks) == int(row["cracks"])
        for c in cracks:
            assert c["severity"] in ("hairline", "fine", "wide") and float(c["length_mm"]) > 0
    # again into the same folder: our own files are replaced
    assert run_main("predict.py", "--segment", "--checkpoint", run / "model.pt", photos[0], "--output", out)[0] == 0


def test_segment_refuses_what_it_cannot_use(seg_run, tmp_path):
    _, run = seg_run
    photo = sorted((SAMPLE / "Positive").glob("*.jpg"))[0]
    assert "not a segmentation model" in one_error(*run_main(
        "predict.py", "--segment", "--checkpoint", ROOT / "models/crack_lite0.pt", photo, "--output", tmp_path / "o")[::2])
    assert "cannot be combined" in one_error(*run_main(
        "predict.py", "--segment", "--localize", photo, "--output", tmp_path / "o")[::2])
    assert "--mm-per-pixel" in run_main("predict.py", photo, "--mm-per-pixel", "0", "--output", tmp_path / "p.csv")[2]
    assert "--severity-mm" in one_error(*run_main(
        "predict.py", "--segment", "--checkpoint", run / "model.pt", photo, "--output", tmp_path / "o",
        "--severity-mm", "0.3,0.1")[::2])


def test_pixel_scores_tolerate_two_pixels_and_no_more():
    truth = torch.zeros(1, 40, 40)
    truth[0, :, 20] = 1
    for shift, expected in ((0, 1.0), (2, 1.0), (3, 0.0)):
        pred = torch.zeros(1, 40, 40)
        pred[0, :, 20 + shift] = 1
        assert prf(tolerant_counts(pred, truth, 0.5))["f1"] == expected
    assert prf(tolerant_counts(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), 0.5))["f1"] == 1.0  # nothing, rightly


def test_onnx_runtime_gives_the_same_crack_map_as_pytorch(seg_run):
    from crack_lightning.inference.segment import load_segmenter
    from crack_lightning.models.segmentation import probability_map

    _, run = seg_run
    image = np.random.default_rng(0).integers(0, 255, (300, 700, 3), dtype=np.uint8)  # two windows, odd sizes
    eager = probability_map(image, load_segmenter(run / "model.pt", engine="torch"), window=256, overlap=32)
    onnx = probability_map(image, load_segmenter(run / "model.pt", engine="onnx"), window=256, overlap=32)
    assert eager.shape == (300, 700) and np.abs(eager - onnx).max() < 1e-4


def test_a_cached_onnx_export_starts_without_building_the_network(seg_run, monkeypatch):
    """The second start of a release file in ONNX Runtime reads its stored contract and the cached export:
    no network is built (most of a one-photo start-up)."""
    import crack_lightning.models.segmentation as segmentation
    from crack_lightning.inference.segment import load_segmenter

    _, run = seg_run
    first = load_segmenter(run / "model.pt", engine="onnx")  # exports (or finds the export) once

    def refuse(*args, **kwargs):
        raise AssertionError("a network was built")

    monkeypatch.setattr(segmentation.CrackSegNet, "__init__", refuse)
    again = load_segmenter(run / "model.pt", engine="onnx")
    assert again.threshold == first.threshold and again.hparams["min_crack_px"] == first.hparams["min_crack_px"]


def test_a_segmentation_model_exports_to_onnx_with_its_contract(seg_run, tmp_path):
    import onnxruntime as ort

    from crack_lightning.inference.segment import load_segmenter

    _, run = seg_run
    res = run_main("predict.py", "--checkpoint", run / "model.pt", "--export", tmp_path / "exp")
    assert res.returncode == 0, res.stderr[-2000:]
    contract = json.loads((tmp_path / "exp" / "model.json").read_text())
    assert contract["task"] == "segment" and 0 < contract["threshold"] < 1
    x = torch.randn(1, 3, 96, 160)
    got = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx")).run(None, {"image": x.numpy()})[0]
    assert got.shape == (1, 96, 160)
    assert np.abs(got - load_segmenter(run / "model.pt").probabilities(x).numpy()).max() < 1e-4


def test_leave_one_source_out_tests_only_the_held_out_sources():
    from crack_lightning.data.records import Record
    from crack_lightning.data.segmentation import Photo, split_photos
    from crack_lightning.errors import DataError

    photos = [Photo(f"{s}{i}.jpg", f"{s}{i}.png", s, f"{s}/{i}") for s in ("walls", "slabs", "clear") for i in range(10)]
    tiles = [Record(p.image, int(k == 0 and p.source != "clear"), f"{p.image}{k}", group=p.group, source=p.source)
             for p in photos for k in range(4)]
    split = split_photos(photos, tiles, 0.2, 0.2, seed=0, holdout=["walls", "clear"])
    assert {p.source for p in split["test"]} == {"walls", "clear"} and len(split["test"]) == 20
    assert {p.source for p in split["train"] + split["val"]} == {"slabs"} and len(split["train"] + split["val"]) == 10
    mixed = split_photos(photos, tiles, 0.2, 0.2, seed=0)
    assert not {p.group for p in mixed["train"]} & {p.group for p in mixed["test"] + mixed["val"]}
    with pytest.raises(DataError, match="names no data root"):
        split_photos(photos, tiles, 0.2, 0.2, seed=0, holdout=["gaps"])


def test_a_crack_map_model_is_tested_on_the_photos_a_tile_model_of_the_same_data_is_tested_on(seg_run):
    """One split rule for both tasks: an answer joining a tile model and a crack map is never scored on a
    photo either one trained on."""
    from crack_lightning.config.schema import DataConfig
    from crack_lightning.data.split import build_split

    tmp, run = seg_run
    seg = {r["image"]: r["split"] for r in csv.DictReader((run / "split.csv").open()) if r["mask"]}  # annotated
    out = tmp / "tile_split"
    out.mkdir(exist_ok=True)
    tiles = build_split(DataConfig(root=str(tmp / "walls"), extra_roots=[str(tmp / "slabs")], num_workers=0), out)
    of_tiles = {r.path: r.split for r in tiles}
    assert set(seg) == set(of_tiles) and {seg[p] for p in seg} == {"train", "val", "test"}
    assert all(seg[p] == of_tiles[p] for p in seg)


def test_the_photo_rule_is_chosen_only_where_validation_has_both_kinds_of_photo():
    """Balanced accuracy picks the shortest crack that separates cracked from crack-free validation photos;
    with no crack-free one (a fold holding all of them out) nothing can be chosen and the recipe's stays."""
    from crack_lightning.training.segment import choose_min_length

    val = [(300.0, True), (120.0, True), (80.0, False), (0.0, False), (500.0, True)]
    assert choose_min_length(val, 40) == (80.5, True)  # every cracked photo kept, no crack-free one flagged
    assert choose_min_length([(3.0, True), (250.0, True)], 40) == (40.0, False)  # would be 1 px otherwise
    assert choose_min_length([], 40) == (40.0, False)


@pytest.mark.slow
def test_the_server_and_the_page_show_each_crack(tmp_path):
    """The shipped model through serve.py: POST /v1/segment answers the cracks with length and width (mm with
    a scale) and the mask as a PNG of the photo's size; bad scales and unreadable files answer in the error
    shape. Then in a real browser: the crack pixels are painted over the photo as that mask says, and the
    table lists every crack with its severity, sorted by width on a click."""
    import base64
    import io

    import httpx
    from conftest import start_server
    from playwright.sync_api import sync_playwright

    patches = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((SAMPLE / "Positive").glob("*.jpg"))[:4]]
    photo = tmp_path / "wall.png"  # four crack patches: several separate cracks
    Image.fromarray(np.vstack([np.hstack(patches[:2]), np.hstack(patches[2:])])).save(photo)
    proc, url = start_server()  # the shipped segmentation model, by default
    try:
        assert httpx.get(url + "/healthz").json()["segment"] is True
        r = httpx.post(url + "/v1/segment?mm_per_pixel=0.05", files={"file": (photo.name, photo.read_bytes())},
                       timeout=120)
        assert r.status_code == 200, r.text
        api = r.json()
        assert (api["width"], api["height"]) == (454, 454) and api["crack"] is True and len(api["cracks"]) >= 2
        assert all({"length_mm", "max_width_mm", "severity"} <= set(c) for c in api["cracks"])
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(api["mask_png"])))) > 127
        assert mask.shape == (454, 454) and mask.any()
        assert httpx.post(url + "/v1/segment?mm_per_pixel=-1", files={"file": ("a.jpg", b"x")}).status_code == 400
        bad = httpx.post(url + "/v1/segment", files={"file": ("a.jpg", b"not an image")})
        assert bad.status_code == 422 and set(bad.json()) == {"error"}
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
            drop_files(page, [photo])
            page.wait_for_function("document.querySelectorAll('#results tbody tr:not(.pending)').length === 1")
            page.click("#results tbody tr:first-child")
            traced = "document.getElementById('crack-status').textContent.includes('traced')"
            page.wait_for_function(traced, timeout=60_000)
            page.fill("#scale", "0.05")  # now in millimetres, with a severity per crack
            page.evaluate("document.getElementById('crack-status').textContent = ''")
            page.click("#measure")
            page.wait_for_function(traced, timeout=60_000)
            assert page.locator("#crack-table tbody tr").count() == len(api["cracks"])
            assert page.text_content("#crack-table tbody tr:first-child td:nth-child(3)").endswith(" mm")
            page.click("#crack-table th[data-key=max_width]")
            widths = page.eval_on_selector_all("#crack-table tbody tr",
                                               "trs => trs.map(tr => parseFloat(tr.cells[2].textContent))")
            assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1
            classes = page.eval_on_selector_all("#crack-table tbody td:nth-child(5)", "tds => tds.map(td => td.className)")
            assert set(classes) <= {"hairline", "fine", "wide"}
            page.wait_for_function("document.getElementById('cracks').width === 454")  # the mask decoded and painted
            painted = page.evaluate("""() => { const c = document.getElementById('cracks');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
            assert painted == int(mask.sum())
            page.screenshot(path=str(tmp_path / "crack_map.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
