"""enginekit.runtimes.control_maps.canny is OpenCV's Canny pixel for pixel (numpy and Pillow only);
the spellings the CLI and the server take are checked and refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from enginekit.errors import InputError
from enginekit.runtimes.control_maps import CANNY_DEFAULTS, apply_control_maps, canny, parse_control_map


def _images() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    disc = (((x - 64) ** 2 + (y - 48) ** 2) < 900).astype(np.uint8) * 200 + 20
    return [photos[0], photos[1][100:400, 50:500], rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),
            rng.integers(0, 256, (50, 61), dtype=np.uint8), np.repeat(disc[..., None], 3, 2),
            rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)]


@pytest.mark.parametrize("low,high", [CANNY_DEFAULTS, (50, 120), (200, 100), (10.5, 300.7), (0, 0)])
def test_canny_is_opencv_s_pixel_for_pixel(low: float, high: float) -> None:
    cv2 = pytest.importorskip("cv2")
    for array in _images():
        ours = np.asarray(canny(array, low, high))
        assert ours.shape == (*array.shape[:2], 3) and (ours[..., 0] == ours[..., 2]).all()
        ref = cv2.Canny(np.ascontiguousarray(array), low, high)
        assert np.array_equal(ours[..., 0], ref), (array.shape, low, high, int((ours[..., 0] != ref).sum()))


def test_canny_takes_pil_images_of_every_mode() -> None:
    cv2 = pytest.importorskip("cv2")
    rgb = _images()[1]
    want = cv2.Canny(np.ascontiguousarray(rgb), 100, 200)
    image = Image.fromarray(rgb)
    for mode in ("RGB", "RGBA", "P"):
        got = np.asarray(canny(image.convert(mode)))[..., 0]
        if mode == "P":  # a palette quantizes the colours: edges of the quantized image
            want_p = cv2.Canny(np.asarray(image.convert("P").convert("RGB")), 100, 200)
            assert np.array_equal(got, want_p)
        else:
            assert np.array_equal(got, want)
    grey = image.convert("L")
    assert np.array_equal(np.asarray(canny(grey))[..., 0], cv2.Canny(np.asarray(grey), 100, 200))


def test_bad_input_and_spellings_are_one_line_errors() -> None:
    with pytest.raises(InputError, match="uint8"):
        canny(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        canny(np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(InputError, match="not negative"):
        canny(np.zeros((8, 8), np.uint8), -1, 10)
    assert parse_control_map("none") is None and parse_control_map(None) is None
    assert parse_control_map("canny") is not None and parse_control_map("Canny:20,40") is not None
    for bad, needle in (("openpose", "not a map enginekit makes"), ("canny:1", "two thresholds"),
                        ("canny:a,b", "two thresholds"), ("canny:nan,1", "finite"), ("canny:-1,5", "not negative")):
        with pytest.raises(InputError, match=needle):
            parse_control_map(bad, "--control-map")
    photo = Image.fromarray(_images()[2])
    made = apply_control_maps([photo, photo], ["none", "canny:10,20"])
    assert made[0] is photo and np.array_equal(np.asarray(made[1]), np.asarray(canny(photo, 10, 20)))
    assert len(apply_control_maps([photo, photo], "canny")) == 2  # one spelling for every image
    with pytest.raises(InputError, match="3 maps for 2 control image"):
        apply_control_maps([photo, photo], ["none", "canny", "canny"])
