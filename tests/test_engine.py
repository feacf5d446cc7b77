"""The engine choice and the on-disk ONNX export cache."""
from __future__ import annotations

import pytest
import torch

from crack_lightning.inference.export import ProbabilityModel
from crack_lightning.models import runtime as engine
from crack_lightning.models.classifier import CrackClassifier


def test_engine_policy():
    assert engine.use_onnx("auto", "cpu") and not engine.use_onnx("auto", "cuda")
    assert engine.use_onnx("onnx", "cuda") and not engine.use_onnx("torch", "cpu")
    with pytest.raises(ValueError, match="engine must be one of"):
        engine.use_onnx("tensorrt", "cpu")


def test_exports_are_cached_by_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("CRACK_LIGHTNING_CACHE", str(tmp_path))
    calls = []
    real = engine.to_onnx
    monkeypatch.setattr(engine, "to_onnx", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = CrackClassifier(pretrained="none", image_size=32).eval()
    net = ProbabilityModel(model)
    x = torch.randn(3, 3, 32, 32)
    first = engine.onnx_runner(net, 32)(x)
    second = engine.onnx_runner(ProbabilityModel(model), 32)(x)  # a new start, the same network
    assert len(calls) == 1 and torch.equal(first, second)
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1
    with torch.no_grad():
        assert torch.allclose(first, net(x), atol=1e-5)
        model.head[1].bias.add_(1.0)  # other weights: another export, never the stale one
    third = engine.onnx_runner(ProbabilityModel(model), 32)(x)
    assert len(calls) == 2 and not torch.allclose(third, first)
    with torch.no_grad():
        assert torch.allclose(third, net(x), atol=1e-5)


def test_an_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("CRACK_LIGHTNING_CACHE", str(blocker))  # a file where the folder would go
    torch.manual_seed(0)
    net = ProbabilityModel(CrackClassifier(pretrained="none", image_size=32).eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(engine.onnx_runner(net, 32)(x), net(x), atol=1e-5)
