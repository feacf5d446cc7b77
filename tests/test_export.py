"""ONNX / TorchScript export agrees with PyTorch on real images."""
import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import SAMPLE, run_main

from crack_lightning.data.images import decode_image
from crack_lightning.data.transforms import preprocess_batch
from crack_lightning.models.checkpoint import load_model


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    res = run_main("predict.py", "--checkpoint", str(trained_run / "checkpoints/frozen/best.ckpt"), "--export", str(out))
    assert res.returncode == 0, res.stderr
    return out


def real_batch(pre, n=8):
    files = sorted((SAMPLE / "Positive").glob("*.jpg"))[:n // 2] + sorted((SAMPLE / "Negative").glob("*.jpg"))[:n // 2]
    return preprocess_batch([decode_image(f) for f in files], pre)


def test_exported_models_match_pytorch(trained_run, exported):
    model = load_model(trained_run / "checkpoints/frozen/best.ckpt")
    x = real_batch(model.pre)
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).numpy()
    assert expected.min() < 0.5 < expected.max()  # real crack and no-crack images, both answered
    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    ts = torch.jit.load(str(exported / "model.torchscript.pt"))
    np.testing.assert_allclose(ts(x).detach().numpy(), expected, atol=1e-4)
    meta = json.loads((exported / "model.json").read_text())
    assert meta["preprocessing"] == model.pre.to_dict()
    assert meta["threshold"] == pytest.approx(float(model.threshold))
    assert meta["class_names"] == ["Negative", "Positive"]


def test_predict_with_onnx_matches_pytorch(trained_run, exported, tmp_path):
    args = [str(SAMPLE / "Positive"), "--workers", "0"]
    assert run_main("predict.py", "--checkpoint", str(exported / "model.onnx"), *args,
                   "--output", str(tmp_path / "onnx.csv")).returncode == 0
    assert run_main("predict.py", "--checkpoint", str(trained_run / "checkpoints/frozen/best.ckpt"), *args,
                   "--output", str(tmp_path / "torch.csv"), "--engine", "torch").returncode == 0

    def probs(name):
        with open(tmp_path / name) as f:
            return {r["path"]: (float(r["probability"]), r["label"]) for r in csv.DictReader(f)}

    a, b = probs("onnx.csv"), probs("torch.csv")
    assert a.keys() == b.keys() and len(a) == 100
    for k in a:
        assert a[k][0] == pytest.approx(b[k][0], abs=1e-4)
        assert a[k][1] == b[k][1]


def test_cached_feature_engines_agree(trained_run):
    """The ONNX Runtime backbone used for the feature cache gives PyTorch's features."""
    from crack_lightning.training.features import feature_extractor

    model = load_model(trained_run / "checkpoints/frozen/best.ckpt")
    x = real_batch(model.pre)
    onnx_feats = feature_extractor(model, "onnx")(x)
    torch_feats = feature_extractor(model, "torch", "cpu")(x)
    assert onnx_feats.shape == torch_feats.shape == (8, 1280)
    torch.testing.assert_close(onnx_feats, torch_feats, atol=1e-4, rtol=1e-4)
