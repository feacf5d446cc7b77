import cv2
import numpy as np
import pytest
import timm
import torch
from conftest import SAMPLE

from crack_lightning.contract import Preprocessing
from crack_lightning.data.images import decode_image
from crack_lightning.data.transforms import (
    eval_transform,
    preprocess_batch,
    stack_uint8,
    train_transform,
)
from crack_lightning.tensor_ops import area_resize, area_resize_exact, model_input


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
    for level in ("light", "strong", "site"):
        tf = train_transform(pre, level)
        a, b = tf(image=img)["image"], tf(image=img)["image"]
        assert a.shape == b.shape == (3, 64, 64)
        assert not torch.equal(a, b)
    tf = train_transform(pre, "none")
    assert torch.equal(tf(image=img)["image"], eval_transform(pre)(image=img)["image"])


def test_site_artifacts_draw_straight_structures_and_keep_the_image_shape():
    """Each artefact changes the tile, keeps shape and dtype; a joint darkens one straight band,
    the rest of the tile untouched (it must not read as noise all over)."""
    import crack_lightning.data.transforms as T

    img = np.full((224, 224, 3), 160, np.uint8)
    rng = np.random.default_rng(3)
    for draw in (T._joint, T._edge, T._stain):
        out = draw(img, rng)
        assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    out = T._joint(img, np.random.default_rng(5))
    changed = np.abs(out.astype(int) - img).max(axis=2) > 2
    assert 0.003 < changed.mean() < 0.15  # a band a few px wide across the tile, not the whole tile
    darker = out[changed].mean() < 160
    assert darker
    site = T.SiteArtifacts(p=1.0)
    outs = [site(image=img)["image"] for _ in range(6)]
    assert all(o.shape == img.shape for o in outs) and len({o.tobytes() for o in outs}) == 6


def test_uint8_pipeline_normalised_on_device_equals_cpu_normalisation():
    """The GPU path (uint8 loader + Preprocessing.normalize) computes the same input as the CPU path."""
    pre = Preprocessing(48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    img = np.random.default_rng(1).integers(0, 256, (227, 227, 3), dtype=np.uint8)
    raw = eval_transform(pre, normalize=False)(image=img)["image"]
    assert raw.dtype == np.uint8 and raw.shape == (48, 48, 3)
    expected = eval_transform(pre)(image=img)["image"]
    x = model_input(pre, stack_uint8([raw], pre))
    assert x.shape == (1, 3, 48, 48) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[0], expected, atol=1e-5)
    aug = train_transform(pre, "strong", normalize=False)(image=img)["image"]
    assert aug.dtype == np.uint8 and aug.shape == (48, 48, 3)


def _cv2_area(images: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.stack([cv2.resize(im, (width, height), interpolation=cv2.INTER_AREA) for im in images])


def test_area_resize_is_bit_identical_to_opencv_on_real_jpegs():
    """The GPU-side resize must not move a single pixel: 227 -> 224 on the sample JPEGs."""
    images = np.stack([decode_image(f) for f in sorted(SAMPLE.rglob("*.jpg"))])
    assert images.shape[1:] == (227, 227, 3) and len(images) >= 20
    got = area_resize(torch.from_numpy(images), 224).numpy()
    assert np.array_equal(got, _cv2_area(images, 224, 224))


@pytest.mark.parametrize("height,width,size", [(480, 640, 224), (300, 227, 224), (229, 500, 150),
                                               (3000, 4000, 224), (448, 300, 224), (50, 50, 50)])
def test_area_resize_matches_opencv_for_every_size_it_accepts(height, width, size):
    images = np.random.default_rng(height + width).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    assert area_resize_exact(height, width, size)
    got = area_resize(torch.from_numpy(images), size).numpy()
    assert np.array_equal(got, _cv2_area(images, size, size))


@pytest.mark.parametrize("height,width", [(448, 448), (672, 448), (100, 300), (200, 224)])
def test_area_resize_refuses_what_opencv_computes_differently(height, width):
    """Integer factors on both axes (OpenCV's own fast path rounds differently) and upscales."""
    assert not area_resize_exact(height, width, 224)
    with pytest.raises(ValueError, match="cannot reproduce OpenCV"):
        area_resize(torch.zeros(1, height, width, 3, dtype=torch.uint8), 224)


def test_stack_uint8_defers_the_resize_only_when_the_device_can_repeat_it():
    pre = Preprocessing(224, (0.5,) * 3, (0.5,) * 3)
    rng = np.random.default_rng(3)
    same = [rng.integers(0, 256, (227, 227, 3), dtype=np.uint8) for _ in range(3)]
    deferred = stack_uint8(same, pre, defer_resize=True)
    assert deferred.shape == (3, 227, 227, 3)  # travels at its own size
    resized = stack_uint8(same, pre)
    assert resized.shape == (3, 224, 224, 3)
    expected = torch.stack([eval_transform(pre)(image=im)["image"] for im in same])
    assert torch.equal(model_input(pre, deferred), model_input(pre, resized))
    assert torch.allclose(model_input(pre, deferred), expected, atol=1e-6)
    mixed = same[:2] + [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)]
    assert stack_uint8(mixed, pre, defer_resize=True).shape == (3, 224, 224, 3)  # sizes differ: resized here
    integer = [rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)]
    assert stack_uint8(integer, pre, defer_resize=True).shape == (1, 224, 224, 3)
    photos = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)] * 2  # > 2x the model's pixels: not shipped whole
    assert stack_uint8(photos, pre, defer_resize=True).shape == (2, 224, 224, 3)
    near = [rng.integers(0, 256, (300, 330, 3), dtype=np.uint8)] * 2  # 99,000 px <= 2 x 224^2: deferred
    assert stack_uint8(near, pre, defer_resize=True).shape == (2, 300, 330, 3)
