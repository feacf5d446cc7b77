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


def test_a_refitted_head_is_exported_by_swapping_it_byte_equal_to_exporting_afresh(trained_run, tmp_path):
    """A site's refit changes only the head: its ONNX is the server's with the head's initializers swapped,
    byte for byte what a fresh export gives; a change the graph folds away (a conv before its batch norm) is
    refused, left to a fresh export."""
    from crack_lightning.inference.export import ProbabilityModel
    from crack_lightning.models.anchors import linear_head
    from crack_lightning.models.checkpoint import (
        float_weights,
        model_from,
        read_checkpoint,
        save_release,
    )
    from crack_lightning.models.runtime import derived_export
    from crack_lightning.models.runtime import exported as export_bytes

    base = trained_run / "model.pt"

    def onnx_of(path):
        ck = read_checkpoint(path)
        model = model_from(ck, path, "cpu")
        return export_bytes(ProbabilityModel(model).float().cpu(), model.pre.size), float_weights(ck["state_dict"])

    base_onnx, base_weights = onnx_of(base)
    site = model_from(read_checkpoint(base), base, "cpu")
    head = linear_head(site)
    with torch.no_grad():
        head.weight.mul_(-0.7)
        head.bias.add_(0.25)
        site.threshold.fill_(0.9)
    save_release(site, tmp_path / "site.pt")
    fresh, site_weights = onnx_of(tmp_path / "site.pt")
    derived = derived_export(base_onnx, base_weights, site_weights)
    assert derived is not None and derived == fresh and derived != base_onnx
    conv = next(k for k in site_weights if k.startswith("backbone.") and k.endswith("conv_stem.weight"))
    folded = {**site_weights, conv: site_weights[conv] * 1.5}
    assert derived_export(base_onnx, base_weights, folded) is None
