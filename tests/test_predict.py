"""``predict.py`` on real sample images with the model trained by the shared fixture."""
import csv
import json
import shutil

import pytest
import torch

from conftest import SAMPLE, run_cli
from crack_lightning.transforms import eval_transform


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
    res = run_cli("predict.py", "--checkpoint", str(trained_run / "model.pt"), str(labelled), "--output", str(out))
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


def test_predict_matches_training_evaluation(trained_run, tmp_path):
    """Same decode + eval transform in training's test pass and predict.py: identical probabilities."""
    expected = {r["path"]: float(r["probability"]) for r in read(trained_run / "test_predictions.csv")}
    files = sorted(expected)[:10]
    out = tmp_path / "p.csv"
    for engine, tol in (("torch", 1e-5), ("onnx", 1e-4)):
        res = run_cli("predict.py", "--checkpoint", str(trained_run / "checkpoints/frozen/best.ckpt"), *files,
                      "--output", str(out), "--workers", "0", "--engine", engine)
        assert res.returncode == 0, res.stderr
        got = {r["path"]: float(r["probability"]) for r in read(out)}
        assert len(got) == 10
        for path in files:
            assert got[path] == pytest.approx(expected[path], abs=tol), engine


def test_threshold_override_and_globs(trained_run, labelled, tmp_path):
    out = tmp_path / "p.csv"
    res = run_cli("predict.py", "--checkpoint", str(trained_run / "model.pt"), str(labelled / "*" / "*.jpg"),
                  "--output", str(out), "--threshold", "0")
    assert res.returncode == 0, res.stderr
    rows = read(out)
    assert len(rows) == 12 and all(r["label"] == "Positive" for r in rows)


def test_predict_user_errors(trained_run, tmp_path):
    res = run_cli("predict.py", "--checkpoint", str(trained_run / "model.pt"), str(tmp_path / "missing"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: no such file, folder or matching glob: {tmp_path / 'missing'}"
    res = run_cli("predict.py", "--checkpoint", str(tmp_path / "nope.pt"), str(SAMPLE))
    assert res.returncode == 2 and "checkpoint not found" in res.stderr and "Traceback" not in res.stderr


def test_predictor_defaults_follow_the_device_and_engine(trained_run):
    from crack_lightning.predict import Predictor

    cpu = Predictor(trained_run / "model.pt")
    assert (cpu.batch_size, cpu.num_workers) == (32, 1)
    assert cpu._run is not None and not cpu.device_normalize  # ONNX Runtime gets normalised floats
    eager = Predictor(trained_run / "model.pt", engine="torch", batch_size=8, num_workers=0)
    assert (eager.batch_size, eager.num_workers) == (8, 0)
    assert eager.device_normalize  # PyTorch gets uint8 and normalises on its device


def test_negative_batch_size_is_a_user_error(trained_run, tmp_path):
    res = run_cli("predict.py", "--checkpoint", str(trained_run / "model.pt"), str(SAMPLE), "--batch-size", "-3",
                  "--output", str(tmp_path / "p.csv"))
    assert res.returncode == 2 and "--batch-size must be >= 1" in res.stderr and "Traceback" not in res.stderr


def test_gpu_style_batches_resized_on_the_device_give_the_same_probabilities():
    """What a GPU run does (227 px uint8 batches, area-resized and normalised by the model) gives
    the released model exactly the probabilities of the worker-resized path, on real photos."""
    from crack_lightning.predict import Predictor, _Batches, _Files

    predictor = Predictor(engine="torch", batch_size=8, num_workers=0)
    files = sorted(SAMPLE.rglob("*.jpg"))[::20]
    raw = _Files(files, None)
    resized = _Files(files, eval_transform(predictor.pre, normalize=False))
    x_dev, idx, errors = _Batches(predictor.pre, uint8=True, defer_resize=True)([raw[i] for i in range(len(files))])
    x_cpu, _, _ = _Batches(predictor.pre, uint8=True, defer_resize=False)([resized[i] for i in range(len(files))])
    assert x_dev.shape[1:] == (227, 227, 3) and x_cpu.shape[1:] == (224, 224, 3) and not errors
    assert torch.equal(predictor.probabilities(x_dev), predictor.probabilities(x_cpu))
    onnx = Predictor(batch_size=8, num_workers=0)  # the CPU default (ONNX Runtime on normalised floats)
    floats, _, _ = _Batches(onnx.pre, uint8=False, defer_resize=False)(
        [_Files(files, eval_transform(onnx.pre))[i] for i in range(len(files))])
    assert torch.allclose(onnx.probabilities(floats), predictor.probabilities(x_dev), atol=1e-4)
