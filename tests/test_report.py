import json

import pytest
from conftest import SAMPLE, run_main
from PIL import Image

from crack_lightning.inference.report import make_report


def test_report_files_and_numbers(tmp_path):
    paths = [str(p) for p in sorted((SAMPLE / "Positive").glob("*.jpg"))[:5]] + \
            [str(p) for p in sorted((SAMPLE / "Negative").glob("*.jpg"))[:5]]
    labels = [1] * 5 + [0] * 5
    probs = [0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.3, 0.95, 0.05, 0.2]  # 1 missed crack, 1 false alarm
    rep = make_report(paths, probs, labels, 0.5, tmp_path / "r", ["Negative", "Positive"], title="unit")
    for name in ("confusion_matrix.png", "roc.png", "precision_recall.png", "histogram.png", "mistakes.png"):
        with Image.open(tmp_path / "r" / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200, name
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["metrics"]["fn"] == 1 and saved["metrics"]["fp"] == 1 and saved["metrics"]["acc"] == 0.8
    assert [m["probability"] for m in saved["mistakes"]] == pytest.approx([0.95, 0.2])  # worst first
    assert rep["metrics"] == saved["metrics"]


def test_report_from_cli(trained_run, tmp_path):
    res = run_main("predict.py", "--checkpoint", str(trained_run / "model.pt"), "--split",
                  str(trained_run / "split.csv"), "--output", str(tmp_path / "p.csv"), "--report", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["metrics"]["n"] == 40
    assert "roc.png" in rep["files"] and "mistakes.png" in rep["files"]
