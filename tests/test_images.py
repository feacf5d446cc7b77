import numpy as np
import pytest
from PIL import Image

from crack_lightning.data.images import decode_image
from crack_lightning.errors import BadImageError


def save(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1"])
def test_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    ext = "jpg" if mode in ("L", "CMYK", "1") else "png"
    arr = decode_image(save(tmp_path, f"x.{ext}", img))
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8


def test_16bit_png_scaled_not_clipped(tmp_path):
    arr16 = np.full((20, 20), 32768, dtype=np.uint16)
    arr = decode_image(save(tmp_path, "x.png", Image.fromarray(arr16)))
    assert arr.shape == (20, 20, 3) and 120 <= arr[0, 0, 0] <= 135  # half of full scale, not 255


def test_transparent_pixels_on_white(tmp_path):
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert decode_image(save(tmp_path, "x.png", img))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    arr = decode_image(save(tmp_path, "x.jpg", img, exif=exif))
    assert arr.shape == (40, 20, 3)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, I am text", "not an image"),
])
def test_non_images(tmp_path, content, reason):
    p = tmp_path / "x.jpg"
    p.write_bytes(content)
    with pytest.raises(BadImageError, match=reason):
        decode_image(p)


def test_truncated_jpeg(tmp_path):
    p = save(tmp_path, "x.jpg", Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)))
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        decode_image(p)


def test_tiny_and_huge_refused_before_decoding(tmp_path):
    with pytest.raises(BadImageError, match="too small: 8x8"):
        decode_image(save(tmp_path, "t.png", Image.new("RGB", (8, 8))))
    big = save(tmp_path, "b.png", Image.new("L", (3000, 3000)))
    with pytest.raises(BadImageError, match="too large"):
        decode_image(big, max_pixels=1_000_000)


def test_fast_jpeg_path_is_bit_identical_to_pillow():
    """Plain RGB JPEGs are decoded by OpenCV for speed; the pixels must be exactly Pillow's."""
    from conftest import SAMPLE

    from crack_lightning.data.images import _decode_plain_jpeg

    files = sorted(SAMPLE.rglob("*.jpg"))[:40]
    for f in files:
        with Image.open(f) as im:
            assert _decode_plain_jpeg(im, f) is not None  # the fast path is the one taken
            expected = np.asarray(im.convert("RGB"))
        got = decode_image(f)
        assert got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"]
        assert np.array_equal(got, expected), f


def test_jpeg_with_trailing_bytes_still_decodes(tmp_path):
    p = save(tmp_path, "x.jpg", Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)))
    with Image.open(p) as im:
        expected = np.asarray(im.convert("RGB"))
    p.write_bytes(p.read_bytes() + b"\x00trailer")
    assert np.array_equal(decode_image(p), expected)


def test_bytes_decode_like_the_file(tmp_path):
    """The server decodes uploads from memory: same pixels, same refusals as from a file."""
    from conftest import SAMPLE

    for path in sorted((SAMPLE / "Positive").glob("*.jpg"))[:3]:
        assert np.array_equal(decode_image(path.read_bytes()), decode_image(path))
    png = tmp_path / "a.png"
    Image.fromarray(np.full((20, 30, 4), 128, np.uint8), "RGBA").save(png)
    assert np.array_equal(decode_image(png.read_bytes()), decode_image(png))
    for bad, reason in ((b"", "empty"), (b"hello", "not an image"), (png.read_bytes()[:60], "corrupt|truncated|cannot")):
        with pytest.raises(BadImageError, match=reason):
            decode_image(bad)
