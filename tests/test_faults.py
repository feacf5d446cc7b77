"""Bad set-ups, bad files and interruptions: one clear line, nothing already written lost."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, make_folder, one_error, run_main
from PIL import Image


def train(tmp_path, data, *extra, **kw):
    return run_main("train.py", *TINY, "--data.root", str(data), "--output_dir", str(tmp_path / "runs"), *extra, **kw)


def one_error_line(res) -> str:
    return one_error(res.returncode, res.stderr)


def add_bad_files(folder):
    """Every kind of broken file a real data folder holds."""
    good = sorted(folder.glob("*.jpg"))[0]
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    raw = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    return {"empty.jpg": "empty file", "text.jpg": "not an image", "truncated.jpg": "corrupt or truncated",
            "tiny.png": "too small"}


def test_bad_images_are_skipped_and_listed(tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=8)
    expected = add_bad_files(data / "Positive")
    res = train(tmp_path, data, "--run_name", "r", "--train.frozen.epochs", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    with open(tmp_path / "runs/r/bad_images.csv") as f:
        listed = {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}
    assert listed.keys() == expected.keys()
    for name, reason in expected.items():
        assert reason in listed[name]
    split = (tmp_path / "runs/r/split.csv").read_text()
    assert not any(name in split for name in expected)


def test_bad_images_can_stop_the_run(tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=4)
    (data / "Negative" / "text.jpg").write_text("oops")
    line = one_error_line(train(tmp_path, data, "--data.bad_images", "error"))
    assert "bad image" in line and "text.jpg: not an image" in line


def test_only_one_usable_class(tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=4, classes=("Negative",))
    (data / "Positive").mkdir()
    (data / "Positive" / "a.jpg").write_text("broken")
    line = one_error_line(train(tmp_path, data))
    assert "no usable images of class 'Positive'" in line


@pytest.mark.parametrize("setup,expected", [
    (lambda d: None, "data root does not exist"),
    (lambda d: make_folder(d, classes=("Negative",)), "class folder(s) ['Positive'] not found"),
    (lambda d: (make_folder(d), (d / "cracks").mkdir()), "unknown folder(s) ['cracks']"),
    (lambda d: (make_folder(d, classes=("Negative",)), (d / "Positive").mkdir()), "holds no images"),
])
def test_bad_data_layouts_stop_before_work(tmp_path, setup, expected):
    setup(tmp_path / "d")
    line = one_error_line(train(tmp_path, tmp_path / "d", "--run_name", "x"))
    assert expected in line
    assert not (tmp_path / "runs/x").exists()  # nothing half-made left behind


def test_wrong_type_in_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  batch_size: [1, 2]\n")
    line = one_error_line(run_main("train.py", "--config", str(cfg)))
    assert line == "error: data.batch_size: expected int, got '[1, 2]'"


def test_broken_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: [unclosed\n")
    assert "is not valid YAML" in one_error_line(run_main("train.py", "--config", str(cfg)))


def test_output_folder_not_writable(tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=4)
    blocker = tmp_path / "file"
    blocker.write_text("i am a file")
    res = run_main("train.py", *TINY, "--data.root", str(data), "--output_dir", str(blocker / "runs"))
    assert "cannot write to the output folder" in one_error_line(res)
    assert blocker.read_text() == "i am a file"


@pytest.mark.parametrize("name", ["../escape", "/abs", ".."])
def test_run_name_cannot_escape_output_dir(tmp_path, name):
    data = make_folder(tmp_path / "d", n_per_class=4)
    line = one_error_line(train(tmp_path, data, "--run_name", name))
    assert "run_name must be a plain folder name" in line
    assert not (tmp_path / "escape").exists()


def test_existing_run_is_not_overwritten(tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=4)
    assert train(tmp_path, data, "--run_name", "r", "--train.frozen.epochs", "1").returncode == 0
    before = (tmp_path / "runs/r/metrics.json").read_bytes()
    line = one_error_line(train(tmp_path, data, "--run_name", "r"))
    assert "already holds a run: add --resume" in line
    assert (tmp_path / "runs/r/metrics.json").read_bytes() == before
    assert "no run to continue" in one_error_line(train(tmp_path, data, "--run_name", "new", "--resume"))


def wait_for_epoch(ckpt, epoch, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "training ended before it could be interrupted"
        if ckpt.is_file():
            try:
                got = torch.load(ckpt, weights_only=True, map_location="cpu")["epoch"]
            except Exception:  # noqa: BLE001 - being replaced right now; look again
                got = -1
            if got >= epoch:
                return got
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
# SIGINT (Ctrl+C) raises the KeyboardInterrupt that train.py turns SIGTERM into: SIGTERM covers that path
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_from_saved_epoch(tmp_path, sig):
    data = make_folder(tmp_path / "d", n_per_class=16)
    args = [sys.executable, "train.py", *TINY, "--data.root", str(data), "--output_dir", str(tmp_path / "runs"),
            "--run_name", "r", "--train.frozen.epochs", "20", "--train.frozen.patience", "1000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "runs/r/checkpoints/frozen/last.ckpt"
    wait_for_epoch(last, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    if sig != signal.SIGKILL:
        assert "--resume --run_name r" in err
    saved = torch.load(last, weights_only=True, map_location="cpu")  # never half-written
    assert saved["epoch"] >= 2 and saved["global_step"] > 0
    assert not (tmp_path / "runs/r/metrics.json").exists()
    if sig != signal.SIGKILL:
        return  # resuming is the same after any of the three; the full cycle runs once, after kill -9

    # a kill between the epoch's best.ckpt and last.ckpt leaves best the newer: resume takes the newest
    newest = max(torch.load(p, weights_only=True, map_location="cpu")["epoch"]
                 for p in (last, last.with_name("best.ckpt")) if p.is_file())
    res = run_main("train.py", *args[2:], "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "runs/r/checkpoints/frozen/done.json").read_text())
    assert info["resumed_from_epoch"] == newest + 1 > 0  # continued, not from zero
    with open(tmp_path / "runs/r/logs/frozen/metrics.csv") as f:  # the history before the kill is kept
        assert sorted({int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("val_loss")}) == list(range(20))
    assert info["epochs_run"] == 20
    final = torch.load(last, weights_only=True, map_location="cpu")
    assert final["global_step"] == 20 * 4  # 16 train images / batch 4, every step done exactly once
    assert json.loads((tmp_path / "runs/r/metrics.json").read_text())["after"]["test"]["n"] == 8
