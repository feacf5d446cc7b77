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
                  "--tile", "227", "--stride", "227", "--output", str(tmp_path / "loc"))
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
                  "--tile", "227", "--output", str(tmp_path / "loc"))
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


def test_a_photo_has_one_answer_everywhere(trained_run, mosaic, tmp_path):
    """predict.py answers a photo from the same tiles --localize shows: same label, same probability (the
    highest tile), and the heatmap tints only flagged tiles; a patch is still answered whole."""
    path, pattern = mosaic
    patch = sorted((SAMPLE / "Negative").glob("*.jpg"))[0]
    model = str(trained_run / "model.pt")
    assert run_main("predict.py", "--model", model, str(path), str(patch), "--output",
                    str(tmp_path / "p.csv")).returncode == 0
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert run_main("predict.py", "--model", model, "--localize", str(path), "--output",
                    str(tmp_path / "loc")).returncode == 0
    summary = next(csv.DictReader(open(tmp_path / "loc" / "summary.csv")))
    tiles = list(csv.DictReader(open(tmp_path / "loc" / "wall_tiles.csv")))
    assert {int(t["width"]) for t in tiles} == {224, 112}  # a photo's own tiles, both sides
    best = max(tiles, key=lambda t: float(t["probability"]))
    assert summary["probability"] == rows[str(path)]["probability"] == best["probability"]
    assert summary["label"] == rows[str(path)]["label"] == "Positive"  # five crack patches in it
    whole = Predictor(model, num_workers=0)
    p = float(whole.probabilities(preprocess_batch([decode_image(patch)], whole.pre))[0])
    assert float(rows[str(patch)]["probability"]) == pytest.approx(p, abs=1e-5)  # a patch: whole, not tiled
    assert 0.0 < float(summary["crack_fraction"]) < 1.0


def test_heat_veil_tints_only_flagged_tiles():
    from crack_lightning.data.tiles import Tile
    from crack_lightning.inference.localize import Localization, veil

    loc = Localization("p", 200, 100, [Tile(0, 0, 100, 100, 0.9), Tile(50, 0, 100, 100, 0.2),
                                       Tile(100, 0, 100, 100, 0.1)], threshold=0.5)
    heat = loc.heat(1)[:100, :200]
    assert heat[50, 75] == pytest.approx(0.9)  # the highest tile over a pixel, not the mean
    alpha = veil(heat, loc.threshold)[..., 3]
    assert (alpha[:, :100] > 0).all() and (alpha[:, 100:] == 0).all()  # only the flagged tile is tinted
    assert alpha.max() <= 0.45 and loc.crack_fraction() == pytest.approx(0.5, abs=0.01)


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
