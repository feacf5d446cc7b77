"""Localisation on mosaics of known Mendeley patches: crack tiles must land on the crack patches."""
import csv

import numpy as np
import pytest
from conftest import SAMPLE, run_main
from PIL import Image

from crack_lightning.data.images import decode_image
from crack_lightning.data.tiles import iter_tiles, tile_origins
from crack_lightning.data.transforms import preprocess_batch
from crack_lightning.inference.predictor import Predictor


def test_tile_origins_cover_the_edges():
    assert tile_origins(1000, 227, 227) == [0, 227, 454, 681, 773]
    assert tile_origins(454, 227, 113) == [0, 113, 226, 227]
    assert tile_origins(100, 227, 113) == [0]
    tiles = list(iter_tiles(500, 300, 227, 227))
    assert max(t.x + t.width for t in tiles) == 500 and max(t.y + t.height for t in tiles) == 300


@pytest.fixture(scope="module")
def mosaic(trained_run, tmp_path_factory):
    """A 4x3 mosaic of sample patches the model is sure about, crack cells chosen in a known pattern."""
    predictor = Predictor(trained_run / "model.pt", num_workers=0)
    files = {c: sorted((SAMPLE / c).glob("*.jpg"))[:30] for c in ("Positive", "Negative")}
    probs = {c: predictor.probabilities(preprocess_batch([decode_image(f) for f in fs], predictor.pre)).tolist()
             for c, fs in files.items()}
    sure_pos = [f for f, p in zip(files["Positive"], probs["Positive"]) if p > 0.9]
    sure_neg = [f for f, p in zip(files["Negative"], probs["Negative"]) if p < 0.1]
    pattern = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]])
    canvas = np.zeros((3 * 227, 4 * 227, 3), np.uint8)
    pos, neg = iter(sure_pos), iter(sure_neg)
    for (r, c), is_crack in np.ndenumerate(pattern):
        canvas[r * 227:(r + 1) * 227, c * 227:(c + 1) * 227] = decode_image(next(pos) if is_crack else next(neg))
    path = tmp_path_factory.mktemp("mosaic") / "wall.png"
    Image.fromarray(canvas).save(path)
    return path, pattern


def test_crack_tiles_land_on_crack_patches(trained_run, mosaic, tmp_path):
    path, pattern = mosaic
    res = run_main("predict.py", "--checkpoint", str(trained_run / "model.pt"), "--localize", str(path),
                  "--stride", "227", "--output", str(tmp_path / "loc"))
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "loc" / "wall_tiles.csv") as f:
        tiles = list(csv.DictReader(f))
    assert len(tiles) == 12
    thr = float(next(csv.DictReader(open(tmp_path / "loc" / "summary.csv")))["threshold"])
    found = np.zeros_like(pattern)
    for t in tiles:
        assert int(t["width"]) == int(t["height"]) == 227
        found[int(t["y"]) // 227, int(t["x"]) // 227] = float(t["probability"]) >= thr
    np.testing.assert_array_equal(found, pattern)
    summary = next(csv.DictReader(open(tmp_path / "loc" / "summary.csv")))
    assert int(summary["crack_tiles"]) == 5 and float(summary["crack_fraction"]) == pytest.approx(5 / 12, abs=0.01)
    with Image.open(tmp_path / "loc" / "wall_heatmap.png") as im:
        assert im.size[0] >= 600


def test_overlapping_default_stride_and_rotated_jpeg(trained_run, mosaic, tmp_path):
    """Default 50% overlap; a JPEG stored sideways with an EXIF rotation is localised upright."""
    path, pattern = mosaic
    upright = Image.open(path)
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera stored
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer must rotate 90 degrees clockwise to show it upright
    jpg = tmp_path / "site.jpg"
    sideways.save(jpg, quality=98, exif=exif)
    res = run_main("predict.py", "--checkpoint", str(trained_run / "model.pt"), "--localize", str(jpg),
                  "--output", str(tmp_path / "loc"))
    assert res.returncode == 0, res.stderr
    summary = next(csv.DictReader(open(tmp_path / "loc" / "summary.csv")))
    assert (int(summary["width"]), int(summary["height"])) == (4 * 227, 3 * 227)
    with open(tmp_path / "loc" / "site_tiles.csv") as f:
        tiles = list(csv.DictReader(f))
    assert len(tiles) == 8 * 6  # stride 113 over 908x681, plus a tile flush with each far edge
    # tiles sitting exactly on a patch agree with the pattern
    thr = float(summary["threshold"])
    on_grid = [t for t in tiles if int(t["x"]) % 227 == 0 and int(t["y"]) % 227 == 0]
    agree = sum((float(t["probability"]) >= thr) == bool(pattern[int(t["y"]) // 227, int(t["x"]) // 227])
                for t in on_grid)
    assert agree >= len(on_grid) - 1


def test_explain_writes_gradcam(trained_run, tmp_path):
    patch = sorted((SAMPLE / "Positive").glob("*.jpg"))[0]
    res = run_main("predict.py", "--checkpoint", str(trained_run / "model.pt"), "--explain", str(patch),
                  "--output", str(tmp_path / "ex"))
    assert res.returncode == 0, res.stderr
    with Image.open(tmp_path / "ex" / f"{patch.stem}_gradcam.png") as im:
        assert im.size[0] > 400 and im.size[0] > im.size[1]  # the patch and its map side by side
        pixels = np.asarray(im.convert("RGB")).astype(int)
    right = pixels[:, pixels.shape[1] // 2:]
    assert (right[..., 0] - right[..., 2]).std() > 5  # a map with structure, not a flat panel


def test_gradcam_is_normalised_and_not_flat(trained_run):
    from crack_lightning.inference.explain import grad_cam
    from crack_lightning.models.checkpoint import load_model

    model = load_model(trained_run / "model.pt")
    patch = sorted((SAMPLE / "Positive").glob("*.jpg"))[0]
    cam, prob = grad_cam(model, preprocess_batch([decode_image(patch)], model.pre))
    assert cam.shape == (model.pre.size, model.pre.size)
    assert float(cam.max()) == pytest.approx(1.0) and float(cam.min()) >= 0.0 and cam.std() > 0.05
    assert 0.0 <= prob <= 1.0
