"""``predict.py --calibrate-site``: a threshold of the site's own from photos that show no crack."""
import csv
import shutil

import cv2
import numpy as np
import pytest
import torch
from conftest import SAMPLE, run_main


def probabilities(model, folder, out):
    res = run_main("predict.py", "--checkpoint", str(model), str(folder), "--output", str(out))
    assert res.returncode == 0, res.stderr
    with open(out) as f:
        return {r["path"].rsplit("/", 1)[-1]: float(r["probability"]) for r in csv.DictReader(f)}


def site_folder(tmp_path, old):
    """The "crack-free" site photos: Negative patches plus the median crack patch (a joint that looks like a crack)."""
    site = tmp_path / "site"
    site.mkdir()
    for f in sorted((SAMPLE / "Negative").glob("*.jpg"))[:10]:
        shutil.copy(f, site / f.name)
    median = sorted(old, key=old.get)[len(old) // 2]
    shutil.copy(SAMPLE / "Positive" / median, site / median)
    return site, median


def test_threshold_calibration_silences_the_shown_photos_and_costs_exactly_the_cracks_below_them(trained_run, tmp_path):
    model = trained_run / "model.pt"
    stored = float(torch.load(model, weights_only=True)["threshold"])
    old = probabilities(model, SAMPLE / "Positive", tmp_path / "old.csv")
    site, median = site_folder(tmp_path, old)
    out = tmp_path / "site_model.pt"
    refused = run_main("predict.py", "--checkpoint", str(model), str(site), "--calibrate-site", str(out),
                       "--calibrate-mode", "threshold")  # the site folder holds a crack photo (the median one)
    assert refused.returncode == 2 and "look cracked" in refused.stderr and not out.exists()
    res = run_main("predict.py", "--checkpoint", str(model), str(site), "--calibrate-site", str(out),
                   "--calibrate-mode", "threshold", "--calibrate-anyway")
    assert res.returncode == 0, res.stderr
    assert "look cracked" in res.stderr
    assert "-> " in res.stdout and "none does now" in res.stdout and "fewer cracks" in res.stderr
    saved = torch.load(out, weights_only=True)
    threshold = float(saved["threshold"])
    assert threshold > stored and threshold > old[median]
    info = saved["metrics"]["site_calibration"]
    assert info["photos"] == 11 and info["highest"][0]["photo"].endswith(median) and info["mode"] == "threshold"
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
    res = run_main("predict.py", "--checkpoint", str(model), str(site), "--localize", "--tile", "227", "--calibrate-site", str(out),
                   "--calibrate-anyway")  # the "joint" is a real crack patch
    assert res.returncode == 0, res.stderr
    assert torch.load(out, weights_only=True)["metrics"]["site_calibration"]["tiles"] is True
    before = run_main("predict.py", "--checkpoint", str(model), str(site), "--localize", "--tile", "227", "--output", str(tmp_path / "a"))
    after = run_main("predict.py", "--checkpoint", str(out), str(site), "--localize", "--tile", "227", "--output", str(tmp_path / "b"))
    assert before.returncode == after.returncode == 0
    assert "), 0/" not in before.stdout and "), 0/" in after.stdout  # tile alarms before, none after


def test_head_refit_separates_a_new_kind_of_negative_and_keeps_the_anchors():
    """refit_linear on features where the trained head calls a site's crack-free texture a crack:
    afterwards that texture scores below 0.5 and the training anchors are still classified right."""
    from crack_lightning.models.anchors import refit_linear

    g = torch.Generator().manual_seed(0)
    d = 16
    crack, clear, site = torch.zeros(d), torch.zeros(d), torch.zeros(d)
    crack[0], clear[0] = 3.0, -3.0
    site[0], site[1] = 2.5, 4.0  # crack-like along the trained direction, but its own kind (dimension 1)
    ax = torch.cat([crack + torch.randn(200, d, generator=g), clear + torch.randn(200, d, generator=g)])
    ay = torch.cat([torch.ones(200), torch.zeros(200)])
    weight, bias = torch.zeros(1, d), torch.zeros(1)
    weight[0, 0] = 1.0  # the trained head: dimension 0 alone
    site_x = site + torch.randn(20, d, generator=g)
    unseen = site + torch.randn(200, d, generator=g)  # more of the site: not shown to the refit
    assert (torch.sigmoid(unseen @ weight.T + bias) > 0.5).float().mean() > 0.9  # alarms before
    w, b = refit_linear(weight, bias, ax, ay, site_x)
    assert (torch.sigmoid(unseen @ w.T + b) > 0.5).float().mean() < 0.05
    def accuracy(w, b):
        return float((((ax @ w.T + b).squeeze(1) > 0).float() == ay).float().mean())

    assert accuracy(w, b) > 0.95 and accuracy(w, b) > accuracy(weight, bias) - 0.04
    # deterministic: the same fit twice
    w2, b2 = refit_linear(weight, bias, ax, ay, site_x)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_head_calibration_refits_only_the_head_and_silences_the_site(trained_run, tmp_path):
    """The default mode: a run stores training anchors; --calibrate-site refits the head against them
    and the site's photos, leaves the backbone, and no shown photo raises an alarm afterwards."""
    model = trained_run / "model.pt"
    ckpt = torch.load(model, weights_only=True)
    anchors = ckpt["site_anchors"]
    width = ckpt["state_dict"]["head.1.weight"].shape[1]
    assert anchors["features"].shape[1] == width and len(anchors["labels"]) == len(anchors["features"])
    assert 0 < int(anchors["labels"].sum()) < len(anchors["labels"])  # both classes
    old = probabilities(model, SAMPLE / "Positive", tmp_path / "old.csv")
    site, median = site_folder(tmp_path, old)
    before = probabilities(model, site, tmp_path / "site_before.csv")
    out = tmp_path / "site_model.pt"
    res = run_main("predict.py", "--checkpoint", str(model), str(site), "--calibrate-site", str(out),
                   "--calibrate-anyway")  # the site folder holds a crack photo (the median one)
    assert res.returncode == 0, res.stderr
    assert "head refitted on the 11 crack-free photos and" in res.stdout and "anchors right:" in res.stdout
    saved = torch.load(out, weights_only=True)
    info = saved["metrics"]["site_calibration"]
    assert info["mode"] == "head" and info["head_refit"]["anchors"] == len(anchors["labels"])
    # the anchors' accuracy before is the stored head's at the stored threshold (recomputed here)
    head_w, head_b = ckpt["state_dict"]["head.1.weight"].float(), ckpt["state_dict"]["head.1.bias"].float()
    p = torch.sigmoid(anchors["features"].float() @ head_w.T + head_b).squeeze(1)
    right = float(((p >= float(ckpt["threshold"])).float() == anchors["labels"].float()).float().mean())
    assert info["head_refit"]["anchor_accuracy_before"] == pytest.approx(right, abs=1e-3)
    assert 0.5 < info["head_refit"]["anchor_accuracy"] <= 1
    changed = {k for k, v in ckpt["state_dict"].items() if not torch.equal(saved["state_dict"][k], v)}
    assert changed and changed <= {"head.1.weight", "head.1.bias", "threshold"}
    assert torch.equal(saved["site_anchors"]["features"], anchors["features"])  # carried: calibrate again later
    after = probabilities(out, site, tmp_path / "site_after.csv")
    assert after[median] < before[median]  # the refit itself moved the crack-like photo down
    assert all(p < float(saved["threshold"]) for p in after.values())
    # the threshold was chosen on the scores of the model as saved (fp16 head), not on the fp32 refit: the
    # highest score it recorded is what the loaded file gives (in ONNX Runtime, predict.py's CPU engine)
    assert max(after.values()) == pytest.approx(info["highest"][0]["probability"], abs=2e-6)


def test_anchors_tool_recomputes_what_training_stored(trained_run, tmp_path, capsys):
    """tools/anchors.py on a model without anchors: the same tiles, the same features as the run stored."""
    import importlib.util

    from conftest import ROOT

    from crack_lightning.models.checkpoint import load_model, save_release

    bare = load_model(trained_run / "model.pt")
    bare.meta.pop("site_anchors")
    save_release(bare, tmp_path / "bare.pt")
    assert "site_anchors" not in torch.load(tmp_path / "bare.pt", weights_only=True)
    res = run_main("predict.py", "--checkpoint", str(tmp_path / "bare.pt"), str(SAMPLE / "Negative"),
                   "--calibrate-site", str(tmp_path / "t.pt"))
    assert res.returncode == 0 and "no training anchors" in res.stderr  # falls back to the threshold, says so
    assert torch.load(tmp_path / "t.pt", weights_only=True)["metrics"]["site_calibration"]["mode"] == "threshold"
    edited = torch.load(trained_run / "model.pt", weights_only=True)
    edited["site_anchors"]["features"] = edited["site_anchors"]["features"][:, :7]  # damaged or edited
    torch.save(edited, tmp_path / "edited.pt")
    res = run_main("predict.py", "--checkpoint", str(tmp_path / "edited.pt"), str(SAMPLE / "Negative"),
                   "--calibrate-site", str(tmp_path / "e.pt"))
    assert res.returncode == 2 and "do not fit its head" in res.stderr and not (tmp_path / "e.pt").exists()
    spec = importlib.util.spec_from_file_location("anchors_tool", ROOT / "tools" / "anchors.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "anchored.pt"
    assert tool.main(["--run", str(trained_run), "--model", str(tmp_path / "bare.pt"), "--output", str(out),
                      "--num-workers", "0"]) == 0
    stored = torch.load(trained_run / "model.pt", weights_only=True)["site_anchors"]
    made = torch.load(out, weights_only=True)["site_anchors"]
    assert torch.equal(made["labels"], stored["labels"])
    # training stored them under its fp32 weights, the release file holds fp16 ones: equal to ~1 %
    diff = made["features"].float() - stored["features"].float()
    assert diff.norm() / stored["features"].float().norm() < 0.02
    capsys.readouterr()
    assert tool.main(["--run", str(trained_run), "--output", str(out)]) == 2 and "exists" in capsys.readouterr().err
