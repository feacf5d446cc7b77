import numpy as np
import pytest
from conftest import SAMPLE

from crack_lightning.data.images import decode_image
from crack_lightning.inference.predictor import Predictor
from crack_lightning.inference.robustness import SHIFTS, evaluate, table


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_shift_changes_pixels_and_keeps_shape(name):
    img = decode_image(sorted((SAMPLE / "Positive").glob("*.jpg"))[0])
    out = SHIFTS[name](img, 0)
    again = SHIFTS[name](img, 0)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out, again)  # deterministic: every model sees the same pixels
    assert np.abs(out.astype(int) - img.astype(int)).mean() > 1.0


def test_zoom_out_makes_cracks_thinner():
    """Dark crack pixels shrink in width: fewer dark pixels per crack, more crack segments."""
    img = np.full((200, 200, 3), 200, np.uint8)
    img[:, 96:104] = 20  # an 8 px vertical crack
    out = SHIFTS["zoom_0.5x"](img, 0)
    row = out[100, :, 0]
    dark = row < 100
    runs = np.diff(np.concatenate([[0], dark.astype(int), [0]]))
    widths = np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1)
    assert len(widths) >= 2 and widths.max() <= 5


def test_evaluate_reports_every_shift(trained_run):
    predictor = Predictor(trained_run / "model.pt", num_workers=0)
    paths = [str(p) for p in sorted((SAMPLE / "Positive").glob("*.jpg"))[:6]] + \
            [str(p) for p in sorted((SAMPLE / "Negative").glob("*.jpg"))[:6]]
    labels = [1] * 6 + [0] * 6
    r = evaluate(predictor, paths, labels, ood_paths=paths[:6])
    assert set(r["shifts"]) == set(SHIFTS)
    assert r["clean"]["n"] == 12 and r["ood"]["n"] == 6
    assert r["ood"]["recall"] == pytest.approx(r["clean"]["recall"])  # same crack images, same answers
    assert r["shift_mean"]["acc"] == pytest.approx(np.mean([m["acc"] for m in r["shifts"].values()]))
    md = table({"a": r, "b": r})
    assert "mean over shifts" in md and md.count("\n") == 2 + 2 + len(SHIFTS) + 4
