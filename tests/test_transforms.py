import numpy as np
import timm
import torch

from crack_lightning.transforms import Preprocessing, eval_transform, preprocess_batch, train_transform


def test_preprocessing_from_timm_data_config():
    pre = Preprocessing.from_model(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert pre == Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mnv3 = Preprocessing.from_model(timm.create_model("mobilenetv3_large_100", pretrained=False), size=160)
    assert mnv3.size == 160 and mnv3.mean == (0.485, 0.456, 0.406)
    assert Preprocessing.from_dict(mnv3.to_dict()) == mnv3


def test_eval_transform_resizes_and_normalises():
    pre = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    img = np.full((227, 227, 3), 255, np.uint8)
    x = eval_transform(pre)(image=img)["image"]
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    batch = preprocess_batch([img, np.zeros((100, 50, 3), np.uint8)], pre)
    assert batch.shape == (2, 3, 32, 32) and torch.allclose(batch[1], torch.full_like(batch[1], -2.0))


def test_train_transform_varies_and_keeps_shape():
    pre = Preprocessing(64, (0.5,) * 3, (0.5,) * 3)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (227, 227, 3), dtype=np.uint8)
    for level in ("light", "strong"):
        tf = train_transform(pre, level)
        a, b = tf(image=img)["image"], tf(image=img)["image"]
        assert a.shape == b.shape == (3, 64, 64)
        assert not torch.equal(a, b)
    tf = train_transform(pre, "none")
    assert torch.equal(tf(image=img)["image"], eval_transform(pre)(image=img)["image"])


def test_uint8_pipeline_normalised_on_device_equals_cpu_normalisation():
    """The GPU path (uint8 loader + Preprocessing.normalize) computes the same input as the CPU path."""
    pre = Preprocessing(48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    img = np.random.default_rng(1).integers(0, 256, (227, 227, 3), dtype=np.uint8)
    raw = eval_transform(pre, normalize=False)(image=img)["image"]
    assert raw.dtype == torch.uint8 and raw.shape == (3, 48, 48)
    expected = eval_transform(pre)(image=img)["image"]
    assert torch.allclose(pre.normalize(raw[None])[0], expected, atol=1e-5)
    aug = train_transform(pre, "strong", normalize=False)(image=img)["image"]
    assert aug.dtype == torch.uint8 and aug.shape == (3, 48, 48)
