"""``predict.py`` on real sample images with the model trained by the shared fixture."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SAMPLE, run_cli, run_main
from PIL import Image


@pytest.fixture
def labelled(tmp_path):
    for cls in ("Positive", "Negative"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / cls).glob("*.jpg"))[:6]:
            shutil.copy(f, tmp_path / "in" / cls / f.name)
    return tmp_path / "in"


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_folder_with_labels_and_a_broken_file(trained_run, labelled, tmp_path):
    (labelled / "Positive" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    out = tmp_path / "preds.csv"
    res = run_main("predict.py", "--checkpoint", str(trained_run / "model.pt"), str(labelled), "--output", str(out))
    assert res.returncode == 1, res.stderr  # some input failed
    rows = read(out)
    assert len(rows) == 13
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    broken = [r for r in rows if r["path"].endswith("broken.jpg")][0]
    assert broken["probability"] == "" and "not an image" in broken["error"]
    good = [r for r in rows if not r["error"]]
    assert all(0.0 <= float(r["probability"]) <= 1.0 and r["label"] in ("Positive", "Negative") for r in good)
    assert all(r["true_label"] == ("Positive" if "/Positive/" in r["path"] else "Negative") for r in rows)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["tp"] + metrics["tn"] + metrics["fp"] + metrics["fn"] == 12
    assert "vs folder labels (12 images)" in res.stdout
    assert "unreadable: " in res.stderr


def test_spread_prediction_decodes_a_photo_only_where_its_tiles_answer_it():
    """Under DDP the loader serves patches; a photo's item is its index (its tiles decode it once, in
    predict_step), not a whole-image decode whose answer would be thrown away."""
    from crack_lightning.inference.distributed import PatchesOnly

    decoded = []

    class Files:
        def __getitem__(self, i):
            decoded.append(i)
            return f"image {i}"

    ds = PatchesOnly(Files(), [False, True, False, True])
    items = [ds[i] for i in range(len(ds))]
    assert decoded == [0, 2]
    assert PatchesOnly.collate(list)(items) == (["image 0", "image 2"], [1, 3])


@pytest.mark.ddp
def test_predict_spread_over_two_processes_writes_the_single_process_csv(trained_run, labelled, tmp_path):
    """--accelerator cpu --devices 2: Lightning DDP, each process a share; one CSV, byte-identical to a
    single-process run (input order, the unreadable file's row, the sampler's padding not repeated, a photo
    answered from its tiles)."""
    (labelled / "Negative" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    patch = np.asarray(Image.open(next((labelled / "Positive").glob("*.jpg"))).convert("RGB"))
    Image.fromarray(np.tile(patch, (2, 2, 1))).save(labelled / "Positive" / "photo.png")  # 454 px: a photo
    ckpt = str(trained_run / "model.pt")
    single = run_main("predict.py", "--checkpoint", ckpt, str(labelled), "--output", str(tmp_path / "one.csv"))
    spread = run_cli("predict.py", "--checkpoint", ckpt, str(labelled), "--output", str(tmp_path / "two.csv"),
                     "--accelerator", "cpu", "--devices", "2", "--batch-size", "4", timeout=240)
    assert single.returncode == spread.returncode == 1, spread.stderr[-2000:]  # 1: one file unreadable
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert len(read(tmp_path / "two.csv")) == 14
    assert "14 image(s)" in spread.stdout and spread.stdout.count("image(s):") == 1  # rank 0 reports, once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "one.csv", "one.metrics.json", "two.csv",
                                                          "two.metrics.json"]  # no shard left behind
    bad = run_main("predict.py", "--checkpoint", ckpt, str(labelled), "--output", str(tmp_path / "x.csv"),
                   "--devices", "0")
    assert bad.returncode == 2 and "--devices must be a positive number" in bad.stderr
    bad = run_main("predict.py", "--checkpoint", ckpt, str(labelled), "--localize", "--devices", "2")
    assert bad.returncode == 2 and "--localize and --explain run in one process" in bad.stderr


def test_predict_matches_training_evaluation(trained_run, tmp_path):
    """Same decode + eval transform in training's test pass and predict.py: identical probabilities."""
    expected = {r["path"]: float(r["probability"]) for r in read(trained_run / "test_predictions.csv")}
    files = sorted(expected)[:10]
    out = tmp_path / "p.csv"
    for engine, tol in (("torch", 1e-5), ("onnx", 1e-4)):
        res = run_main("predict.py", "--checkpoint", str(trained_run / "checkpoints/frozen/best.ckpt"), *files,
                      "--output", str(out), "--workers", "0", "--engine", engine)
        assert res.returncode == 0, res.stderr
        got = {r["path"]: float(r["probability"]) for r in read(out)}
        assert len(got) == 10
        for path in files:
            assert got[path] == pytest.approx(expected[path], abs=tol), engine


def test_threshold_override_and_globs(trained_run, labelled, tmp_path):
    out = tmp_path / "p.csv"
    res = run_main("predict.py", "--checkpoint", str(trained_run / "model.pt"), str(labelled / "*" / "*.jpg"),
                  "--output", str(out), "--threshold", "0")
    assert res.returncode == 0, res.stderr
    rows = read(out)
    assert len(rows) == 12 and all(r["label"] == "Positive" for r in rows)


def test_predict_user_errors(trained_run, tmp_path):
    res = run_main("predict.py", "--checkpoint", str(trained_run / "model.pt"), str(tmp_path / "missing"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: no such file, folder or matching glob: {tmp_path / 'missing'}"
    res = run_main("predict.py", "--checkpoint", str(tmp_path / "nope.pt"), str(SAMPLE))
    assert res.returncode == 2 and "checkpoint not found" in res.stderr and "Traceback" not in res.stderr


def test_predictor_defaults_follow_the_device_and_engine(trained_run):
    from crack_lightning.inference.predictor import Predictor

    cpu = Predictor(trained_run / "model.pt")
    assert (cpu.batch_size, cpu.num_workers) == (32, 1)
    assert cpu._run is not None and not cpu.device_normalize  # ONNX Runtime gets normalised floats
    eager = Predictor(trained_run / "model.pt", engine="torch", batch_size=8, num_workers=0)
    assert (eager.batch_size, eager.num_workers) == (8, 0)
    assert eager.device_normalize  # PyTorch gets uint8 and normalises on its device


def test_negative_batch_size_is_a_user_error(trained_run, tmp_path):
    res = run_main("predict.py", "--checkpoint", str(trained_run / "model.pt"), str(SAMPLE), "--batch-size", "-3",
                  "--output", str(tmp_path / "p.csv"))
    assert res.returncode == 2 and "--batch-size: must be a finite number >= 0" in res.stderr
    assert "Traceback" not in res.stderr


def test_resize_on_the_device_gives_the_same_probabilities(tmp_path):
    """What a GPU run does (227 px uint8 batches, area-resized and normalised by the model) gives
    the released model exactly the probabilities of the worker-resized path, end to end on real
    photos; ONNX Runtime on normalised floats agrees to float precision."""
    from crack_lightning.inference.predictor import Predictor

    files = sorted(SAMPLE.rglob("*.jpg"))[::10]
    device = Predictor(engine="torch", batch_size=8, num_workers=0, resize_on_device=True)
    worker = Predictor(engine="torch", batch_size=8, num_workers=0)
    assert device.defer_resize and not worker.defer_resize  # a CPU resizes in the worker by default
    b = next(iter(device.loader(files)))
    x, idx, errors = b.x, b.index.tolist(), b.errors
    assert x.dtype == torch.uint8 and x.shape == (8, 227, 227, 3) and idx == list(range(8)) and not errors
    assert next(iter(worker.loader(files)))[0].shape == (8, 224, 224, 3)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really")
    with_bad = files[:9] + [broken] + files[9:]  # 21 paths: batches of 8, 8, 5, one kept in flight
    rows = list(device.iter_rows(with_bad, progress=False))
    assert [r.path for r in rows] == [str(f) for f in with_bad] and rows[9].error and rows[9].probability is None
    p_device = [r.probability for r in rows[:9] + rows[10:]]
    p_worker = [r.probability for r in worker.iter_rows(files, progress=False)]
    assert len(p_device) == len(files) and p_device == p_worker
    p_onnx = [r.probability for r in Predictor(batch_size=8, num_workers=0).iter_rows(files, progress=False)]
    assert max(abs(a - b) for a, b in zip(p_onnx, p_device)) < 1e-4


def test_a_regular_install_carries_and_finds_the_released_model(tmp_path):
    """A non-editable install has no checkout: the wheel ships the model as data under
    share/crack_lightning/models, and default_checkpoint looks there after the checkout."""
    import subprocess
    import sys
    import zipfile

    from conftest import ROOT

    from crack_lightning.inference.outputs import default_checkpoint

    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                          "-w", str(tmp_path / "whl")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".data/data/share/crack_lightning/models/crack_lite0.pt") for n in names)
    assert any(n.endswith(".data/data/share/crack_lightning/models/crack_lite0_field.pt") for n in names)
    assert "crack_lightning/serve/static/app.js" in names
    assert default_checkpoint() == ROOT / "models" / "crack_lite0.pt"  # a checkout first
    prefix = tmp_path / "venv"
    (prefix / "share/crack_lightning/models").mkdir(parents=True)
    (prefix / "share/crack_lightning/models/crack_lite0.pt").write_bytes(b"x")
    assert default_checkpoint(checkout=tmp_path / "none", prefix=prefix) == \
        prefix / "share/crack_lightning/models/crack_lite0.pt"
