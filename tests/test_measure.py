"""Crack measurement on drawn cracks of known length and width: straight at many angles, curved, branching."""
from __future__ import annotations

import math

import numpy as np
import pytest

from crack_lightning.measure import clean, measure, severity


def drawn(polylines, width: float, shape=(320, 320)) -> np.ndarray:
    """Pixels whose centre lies within width/2 of a polyline: a crack of known centre length and width."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    mask = np.zeros(shape, bool)
    for pts in polylines:
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            dx, dy = x1 - x0, y1 - y0
            t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
            mask |= np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy)) <= width / 2
    return mask


def length(polylines) -> float:
    return sum(math.dist(a, b) for pts in polylines for a, b in zip(pts, pts[1:]))


SHAPES = {f"straight {a} deg": [[(40, 40), (40 + 240 * math.cos(math.radians(a)), 40 + 240 * math.sin(math.radians(a)))]]
          for a in (0, 10, 22.5, 30, 45, 60, 90)}
SHAPES["curved"] = [[(20 + 4 * i, 150 + 60 * math.sin(i / 10)) for i in range(66)]]
SHAPES["branching"] = [[(150, 150), (150, 30)], [(150, 150), (40, 260)], [(150, 150), (270, 250)]]


@pytest.mark.parametrize("width", [1, 3, 5, 7, 9, 11, 13, 15])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_length_within_5_percent_and_width_within_a_pixel(shape, width):
    (crack,) = measure(drawn(SHAPES[shape], width))
    assert crack.length_px == pytest.approx(length(SHAPES[shape]), rel=0.05)
    assert abs(crack.mean_width_px - width) <= 1 and abs(crack.max_width_px - width) <= 1


def test_a_crack_that_widens_reports_its_widest_point():
    mask = drawn([[(20, 60), (150, 60)]], 3) | drawn([[(150, 60), (290, 60)]], 11)
    (crack,) = measure(mask)
    assert abs(crack.max_width_px - 11) <= 1 and 3 <= crack.mean_width_px <= 12


def test_components_are_separate_cracks_longest_first_and_specks_are_cleaned():
    mask = drawn([[(20, 40), (300, 40)]], 5) | drawn([[(20, 200), (120, 200)]], 3)
    mask[300:303, 300:303] = True  # a 9-pixel speck
    assert len(measure(mask)) == 3
    cracks = measure(clean(mask, min_area=20))
    assert [c.id for c in cracks] == [1, 2] and cracks[0].length_px > cracks[1].length_px
    assert (cracks[0].x, cracks[0].y) == (18, 38) and cracks[0].width == 285
    assert measure(clean(mask, 20), min_length_px=150)[0].id == 1 and len(measure(mask, min_length_px=150)) == 1


def test_rows_in_millimetres_carry_a_severity_class():
    (crack,) = measure(drawn([[(20, 40), (300, 40)]], 5))
    row = crack.row(mm_per_pixel=0.05)  # 5 px = 0.25 mm: "fine" (0.1-0.3 mm)
    assert row["length_mm"] == pytest.approx(280 * 0.05, rel=0.05) and row["severity"] == "fine"
    assert crack.row(0.01)["severity"] == "hairline" and crack.row(0.2)["severity"] == "wide"
    assert "severity" not in crack.row()
    assert severity(0.1) == "hairline" and severity(0.3) == "fine" and severity(0.31) == "wide"
    assert severity(0.5, edges=(0.2, 0.4, 0.6)) == "class_3"


def test_a_box_is_judged_by_the_whole_crack_that_runs_through_it():
    from crack_lightning.measure import longest_crack_in

    mask = np.zeros((100, 200), bool)
    mask[50, 10:110] = True  # 100 px, across two boxes
    mask[10:30, 150] = True  # 20 px
    got = longest_crack_in(mask, [(0, 0, 50, 100), (100, 0, 100, 100), (160, 0, 40, 100), (140, 0, 20, 20)])
    assert got[0] == got[1] == pytest.approx(99, abs=2)  # the long crack's whole length, in both boxes it crosses
    assert got[2] == 0.0 and got[3] == pytest.approx(19, abs=2)
