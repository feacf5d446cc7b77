"""``predict.py --calibrate-site``: a threshold of the site's own from photos that show no crack."""
import csv
import shutil

import cv2
import numpy as np
import torch

from conftest import SAMPLE, run_main


def probabilities(model, folder, out):
    res = run_main("predict.py", "--checkpoint", str(model), str(folder), "--output", str(out))
    assert res.returncode == 0, res.stderr
    with open(out) as f:
        return {r["path"].rsplit("/", 1)[-1]: float(r["probability"]) for r in csv.DictReader(f)}


def test_calibration_silences_the_shown_photos_and_costs_exactly_the_cracks_below_them(trained_run, tmp_path):
    model = trained_run / "model.pt"
    stored = float(torch.load(model, weights_only=True)["threshold"])
    old = probabilities(model, SAMPLE / "Positive", tmp_path / "old.csv")
    # the "crack-free" site photos: Negative patches plus the median crack patch (a joint that looks like a crack)
    site = tmp_path / "site"
    site.mkdir()
    for f in sorted((SAMPLE / "Negative").glob("*.jpg"))[:10]:
        shutil.copy(f, site / f.name)
    median = sorted(old, key=old.get)[len(old) // 2]
    shutil.copy(SAMPLE / "Positive" / median, site / median)
    out = tmp_path / "site_model.pt"
    res = run_main("predict.py", "--checkpoint", str(model), str(site), "--calibrate-site", str(out))
    assert res.returncode == 0, res.stderr
    assert "-> " in res.stdout and "none does now" in res.stdout and "fewer cracks" in res.stderr
    saved = torch.load(out, weights_only=True)
    threshold = float(saved["threshold"])
    assert threshold > stored and threshold > old[median]
    info = saved["metrics"]["site_calibration"]
    assert info["photos"] == 11 and info["highest"][0]["photo"].endswith(median)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in torch.load(model, weights_only=True)["state_dict"].items()
               if k != "threshold")  # the same weights: only the threshold moved
    # with the site model, no shown photo raises an alarm, and exactly the cracks scoring above it are found
    res = run_main("predict.py", "--checkpoint", str(out), str(site), "--output", str(tmp_path / "site.csv"))
    assert res.returncode == 0 and "0 Positive" in res.stdout
    res = run_main("predict.py", "--checkpoint", str(out), str(SAMPLE / "Positive"), "--output", str(tmp_path / "p.csv"))
    found = sum(p >= threshold for p in old.values())
    assert f"{found} Positive" in res.stdout and found < sum(p >= stored for p in old.values())


def test_calibration_never_lowers_the_threshold_and_refuses_what_it_must(trained_run, tmp_path):
    model = trained_run / "model.pt"
    stored = float(torch.load(model, weights_only=True)["threshold"])
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    scores = probabilities(model, SAMPLE / "Negative", tmp_path / "neg.csv")
    for name in sorted(scores, key=scores.get)[:5]:  # the five quietest: all below the stored threshold
        shutil.copy(SAMPLE / "Negative" / name, quiet / name)
    out = tmp_path / "same.pt"
    res = run_main("predict.py", "--checkpoint", str(model), str(quiet), "--calibrate-site", str(out))
    assert res.returncode == 0 and "unchanged" in res.stdout
    assert float(torch.load(out, weights_only=True)["threshold"]) == stored
    # never over the model itself, nor over a file that is not ours
    res = run_main("predict.py", "--checkpoint", str(model), str(quiet), "--calibrate-site", str(model))
    assert res.returncode == 2 and "one of the inputs" in res.stderr
    stranger = tmp_path / "notes.pt"
    stranger.write_text("mine")
    res = run_main("predict.py", "--checkpoint", str(model), str(quiet), "--calibrate-site", str(stranger))
    assert res.returncode == 2 and "not written by crack_lightning" in res.stderr and stranger.read_text() == "mine"
    # a release of ours may be replaced (calibrating again)
    res = run_main("predict.py", "--checkpoint", str(model), str(quiet), "--calibrate-site", str(out))
    assert res.returncode == 0


def test_calibration_over_tiles_silences_every_tile_of_a_site_photo(trained_run, tmp_path):
    """With --localize the scores are the photo's tiles, as predict.py --localize thresholds them."""
    patches = [cv2.imread(str(f)) for f in sorted((SAMPLE / "Negative").glob("*.jpg"))[:3]]
    patches.append(cv2.imread(str(sorted((SAMPLE / "Positive").glob("*.jpg"))[0])))  # a "joint" in one corner
    photo = np.vstack([np.hstack(patches[:2]), np.hstack(patches[2:])])
    site = tmp_path / "site"
    site.mkdir()
    cv2.imwrite(str(site / "wall.png"), photo)
    model, out = trained_run / "model.pt", tmp_path / "site.pt"
    res = run_main("predict.py", "--checkpoint", str(model), str(site), "--localize", "--calibrate-site", str(out))
    assert res.returncode == 0, res.stderr
    assert torch.load(out, weights_only=True)["metrics"]["site_calibration"]["tiles"] is True
    before = run_main("predict.py", "--checkpoint", str(model), str(site), "--localize", "--output", str(tmp_path / "a"))
    after = run_main("predict.py", "--checkpoint", str(out), str(site), "--localize", "--output", str(tmp_path / "b"))
    assert before.returncode == after.returncode == 0
    assert "wall.png: 0/" not in before.stdout and "wall.png: 0/" in after.stdout  # alarms before, none after
