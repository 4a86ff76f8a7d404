"""ichprep.windows: the preset windows by hand, parsing, padding, resizing and the preprocessing order."""

from __future__ import annotations

import numpy as np
import pytest

from ichprep.errors import WindowSpecError
from ichprep.windows import (
    DEFAULT_WINDOWS,
    PRESETS,
    Window,
    apply_window,
    apply_windows,
    pad_to_square,
    parse_window,
    parse_windows,
    preprocess,
    resize_square,
)


def test_presets_are_the_reference_windows():
    assert [(w.name, w.center, w.width) for w in DEFAULT_WINDOWS] == [
        ("brain", 40, 80),
        ("subdural", 80, 200),
        ("soft", 40, 380),
    ]
    assert (PRESETS["bone"].center, PRESETS["bone"].width) == (600, 2800)


def test_brain_window_hand_computed():
    # brain 40/80 spans [0, 80] HU: value = floor((hu - 0) * 255/80 + 0.5)
    hu = np.array([[-1000, -1, 0, 10], [20, 40, 79.9, 2000]], dtype=np.float32)
    out = apply_window(hu, PRESETS["brain"])
    # 10 -> 31.875 -> 32; 20 -> 63.75 -> 64; 40 -> 127.5 -> 128; 79.9 -> 254.68 -> 255
    np.testing.assert_array_equal(out, [[0, 0, 0, 32], [64, 128, 255, 255]])
    assert out.dtype == np.uint8


def test_subdural_and_soft_hand_computed():
    hu = np.array([[-20, 80, 130, 180]], dtype=np.float32)
    # subdural 80/200: [-20, 180]; 80 -> 127.5 -> 128; 130 -> 191.25 -> 191
    np.testing.assert_array_equal(apply_window(hu, PRESETS["subdural"]), [[0, 128, 191, 255]])
    # soft 40/380: [-150, 230]; -20 -> 87.24 -> 87; 80 -> 154.34 -> 154; 130 -> 187.89 -> 188; 180 -> 221.45 -> 221
    np.testing.assert_array_equal(apply_window(hu, PRESETS["soft"]), [[87, 154, 188, 221]])


def test_apply_windows_stacks_channels():
    hu = np.linspace(-200, 300, 64 * 64, dtype=np.float32).reshape(64, 64)
    image = apply_windows(hu, DEFAULT_WINDOWS)
    assert image.shape == (3, 64, 64)
    assert image.dtype == np.uint8
    for channel, window in zip(image, DEFAULT_WINDOWS):
        np.testing.assert_array_equal(channel, apply_window(hu, window))


def test_parse_window_presets_and_custom():
    assert parse_window("subdural") is PRESETS["subdural"]
    assert parse_window("stroke:32:8") == Window("stroke", 32.0, 8.0)
    assert parse_windows([]) == DEFAULT_WINDOWS


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lung", "unknown window 'lung'; choose one of brain, subdural, soft, bone"),
        ("x:1", "NAME:CENTER:WIDTH"),
        ("x:a:b", "must be numbers"),
        ("x:40:0", "width > 0"),
        ("x:40:-5", "width > 0"),
    ],
)
def test_parse_window_errors(spec, message):
    with pytest.raises(WindowSpecError, match=message):
        parse_window(spec)


def test_duplicate_window_names_rejected():
    with pytest.raises(WindowSpecError, match="unique"):
        parse_windows(["brain", "brain:40:80"])


def test_pad_non_square_with_air_centered():
    hu = np.zeros((4, 8), dtype=np.float32)
    square = pad_to_square(hu)
    assert square.shape == (8, 8)
    assert (square[2:6] == 0).all()
    assert (square[:2] == -1000).all()
    assert (square[6:] == -1000).all()


def test_resize_area_averages():
    hu = np.zeros((512, 512), dtype=np.float32)
    hu[::2, ::2] = 100  # a quarter of the pixels
    small = resize_square(hu, 256)
    assert small.shape == (256, 256)
    np.testing.assert_allclose(small, 25.0)


def test_preprocess_shape_and_order():
    hu = np.full((630, 630), 40.0, dtype=np.float32)
    image = preprocess(hu, DEFAULT_WINDOWS, 256)
    assert image.shape == (3, 256, 256)
    assert image[0, 128, 128] == 128  # 40 HU in the brain window
