"""ichtrain.data.augment: --image-size is the network's input size in training and evaluation alike."""

from __future__ import annotations

import pytest
import torch

from ichtrain.data.augment import eval_batch, random_resized_crop, resize, train_batch


def _batch(b=4, size=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("image_size", [96, 160, 224, 256])
def test_train_and_eval_give_the_same_input_size(image_size):
    batch = _batch()
    g = torch.Generator().manual_seed(1)
    assert train_batch(batch, image_size, g).shape == (4, 3, image_size, image_size)
    assert eval_batch(batch, image_size).shape == (4, 3, image_size, image_size)


def test_a_crop_of_the_whole_field_without_rotation_or_flip_is_the_eval_image():
    batch = _batch(size=128)
    g = torch.Generator().manual_seed(0)
    crop = random_resized_crop(resize(batch, 96), g, scale=(1.0, 1.0), max_rotate_deg=0.0, flip=False)
    torch.testing.assert_close(crop, resize(batch, 96), atol=1e-3, rtol=0)


def test_training_crops_keep_most_of_the_field():
    """A bright square at the image centre (like a lesion) is inside every training crop, at eval's scale."""
    size, image_size = 256, 96
    batch = torch.zeros(64, 3, size, size, dtype=torch.uint8)
    batch[:, :, 112:144, 112:144] = 255  # 32 px of 256 = 1/8 of the field
    g = torch.Generator().manual_seed(3)
    seen = (random_resized_crop(resize(batch, image_size), g) > 128).float().mean(dim=(1, 2, 3))
    expected = (resize(batch, image_size) > 128).float().mean()
    # Crops keep 80-100 % of the area, so the square's share grows by at most 1/0.8 and never vanishes.
    assert (seen > 0.9 * expected).all()
    assert (seen < expected / 0.8 * 1.1).all()


def test_each_sample_gets_its_own_transform_and_the_generator_decides():
    batch = _batch(b=8, size=64)
    a = random_resized_crop(resize(batch, 64), torch.Generator().manual_seed(5))
    b = random_resized_crop(resize(batch, 64), torch.Generator().manual_seed(5))
    c = random_resized_crop(resize(batch, 64), torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    identical = resize(batch[:1].repeat(8, 1, 1, 1), 64)
    out = random_resized_crop(identical, torch.Generator().manual_seed(7))
    assert len({round(float(x), 3) for x in out.mean(dim=(1, 2, 3))}) == 8


def test_shrinking_is_antialiased():
    """A one-pixel checkerboard shrunk 4x is grey (its mean), not an aliased pattern."""
    board = ((torch.arange(256)[:, None] + torch.arange(256)[None, :]) % 2 * 255).to(torch.uint8)
    small = resize(board.expand(1, 3, 256, 256), 64)
    assert small.std() < 2
    assert abs(float(small.mean()) - 127.5) < 1
