"""On-device augmentation against the reference's torchvision/PIL semantics
(dataset/cifar100.py, dataset/imagenet.py, dataset/stl10.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import PIL
import pytest
from PIL import Image

from cktf_jax.data import augment

RNG = np.random.default_rng(0)


def _keys(n, seed=0):
  return augment.example_keys(jax.random.key(seed), jnp.arange(n))


def test_normalisation_constants():
  assert augment.CIFAR100_MEAN == (0.5071, 0.4867, 0.4408)
  assert augment.CIFAR100_STD == (0.2675, 0.2565, 0.2761)
  assert augment.IMAGENET_MEAN == (0.485, 0.456, 0.406)
  assert augment.IMAGENET_STD == (0.229, 0.224, 0.225)
  images = jnp.full((2, 32, 32, 3), 200, jnp.uint8)
  out = augment.CifarTransform(train=False)(images)
  expected = (200 / 255 - np.array(augment.CIFAR100_MEAN)) / np.array(augment.CIFAR100_STD)
  assert out.dtype == jnp.float32 and out.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(out[0, 5, 7], expected, rtol=1e-6)


def test_random_crop_offsets_cover_0_to_8_and_pad_with_zeros():
  offsets = np.asarray(augment.random_crop_offsets(jnp.asarray(RNG.random((2000, 2))), 4))
  assert offsets.min() == 0 and offsets.max() == 8
  assert set(np.unique(offsets)) == set(range(9))
  image = jnp.asarray(RNG.integers(1, 256, (32, 32, 3), dtype=np.uint8))
  crop = np.asarray(augment.pad_and_crop(image, jnp.array([0, 8]), 4))
  assert (crop[:4] == 0).all() and (crop[:, -4:] == 0).all()  # Zero fill.
  np.testing.assert_array_equal(crop[4:, :-4], np.asarray(image)[:-4, 4:])


def test_horizontal_flip_probability_is_one_half():
  # padding=0 leaves only the flip; 4000 draws: 0.5 +- 0.03 (about 4 sigma).
  n = 4000
  image = RNG.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
  images = jnp.asarray(np.repeat(image, n, axis=0))
  out = np.asarray(jax.jit(augment.CifarTransform(train=True, padding=0))(images, _keys(n)))
  plain = np.asarray(augment.normalize(image, augment.CIFAR100_MEAN, augment.CIFAR100_STD))[0]
  flipped = np.all(np.isclose(out, plain[:, ::-1]), axis=(1, 2, 3))
  assert np.all(flipped | np.all(np.isclose(out, plain), axis=(1, 2, 3)))
  assert abs(flipped.mean() - 0.5) < 0.03


def test_cifar_train_is_per_example_and_deterministic():
  images = jnp.asarray(RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
  fn = jax.jit(augment.CifarTransform(train=True))
  keys = _keys(6)
  a, b = fn(images, keys), fn(images, keys)
  np.testing.assert_array_equal(a, b)
  order = jnp.array([3, 1, 5, 0, 2, 4])
  np.testing.assert_array_equal(fn(images[order], keys[order]), a[order])
  assert not np.array_equal(a, fn(images, _keys(6, seed=1)))
  with pytest.raises(ValueError, match="PRNG key per example"):
    augment.CifarTransform(train=True)(images)
  with pytest.raises(ValueError, match="uint8 images"):
    augment.CifarTransform(train=False)(images.astype(jnp.float32))


def _boxes(n, height, width, scale=(0.08, 1.0)):
  u = jnp.asarray(RNG.random((n, 4, 10)), jnp.float32)
  fn = jax.jit(jax.vmap(lambda u: augment.random_resized_crop_box(u, height, width, scale)))
  return np.asarray(fn(u))


@pytest.mark.parametrize("height,width", [(96, 96), (64, 64), (40, 100)])
def test_random_resized_crop_box_bounds(height, width):
  boxes = _boxes(3000, height, width)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  # Area in [0.08, 1] and aspect in [3/4, 4/3] of the image, up to rounding w, h by 0.5.
  area = height * width
  assert ((w + 0.5) * (h + 0.5) >= 0.08 * area).all() and ((w - 0.5) * (h - 0.5) <= area).all()
  assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
  if height == width:  # Square images reach both ends of the area range.
    fraction = h * w / area
    assert fraction.min() < 0.1 and fraction.max() > 0.9


def test_random_resized_crop_fallback_is_torchvision_central_crop():
  # No area in (2, 3) x image fits: every attempt fails.
  wide = _boxes(5, 40, 100, scale=(2.0, 3.0))
  assert (wide == [0, 23, 40, 53]).all()  # h = 40, w = round(40 * 4/3), centred.
  tall = _boxes(5, 100, 40, scale=(2.0, 3.0))
  assert (tall == [23, 0, 53, 40]).all()  # w = 40, h = round(40 / (3/4)).
  assert (_boxes(5, 50, 50, scale=(2.0, 3.0)) == [0, 0, 50, 50]).all()


def _pil_two_pass(image, box, size):
  """Pillow's crop + BILINEAR resize, horizontal pass then vertical, as separate calls."""
  top, left, h, w = (int(v) for v in box)
  crop = Image.fromarray(image).crop((left, top, left + w, top + h))
  return np.asarray(crop.resize((size, h), Image.BILINEAR).resize((size, size), Image.BILINEAR))


def test_resized_crop_matches_pillow():
  """Bit-exact against Pillow's two passes; against a one-call Pillow resize
  (13.x may run the vertical pass first) at most 1 of 255, on < 10% of pixels
  (measured: 3.2% on random 96x96 images with RandomResizedCrop boxes)."""
  crop = jax.jit(lambda image, box: augment.resized_crop(image, box, (64, 64)))
  boxes = np.concatenate([_boxes(24, 96, 96), [[0, 0, 96, 96], [10, 20, 64, 64], [5, 7, 9, 30]]])
  differing = total = 0
  for box in boxes:
    image = RNG.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    ours = np.asarray(crop(jnp.asarray(image), jnp.asarray(box))).astype(np.int64)
    np.testing.assert_array_equal(ours, _pil_two_pass(image, box, 64))
    top, left, h, w = (int(v) for v in box)
    one_call = np.asarray(Image.fromarray(image).crop((left, top, left + w, top + h)).resize(
        (64, 64), Image.BILINEAR)).astype(np.int64)
    assert np.abs(ours - one_call).max() <= 1
    differing += int((ours != one_call).sum())
    total += ours.size
  assert differing / total < 0.10
  if int(PIL.__version__.split(".")[0]) < 13:
    assert differing == 0
  with pytest.raises(ValueError, match="exact integer range"):
    augment.resized_crop(jnp.zeros((1, 1000, 3), jnp.uint8), (0, 0, 1, 1000), (1, 10))


def test_imagenet_eval_is_resize_and_center_crop():
  images = RNG.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
  fn = jax.jit(augment.ImagenetTransform(train=False))
  out = np.asarray(fn(jnp.asarray(images)))
  np.testing.assert_array_equal(out, np.asarray(fn(jnp.asarray(images))))  # Deterministic.
  resized = np.stack([_pil_two_pass(im, (0, 0, 96, 96), 64) for im in images])
  expected = augment.normalize(resized, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  # Tiny-ImageNet: 64x64 in, Resize(64) + CenterCrop(64) is the identity.
  small = jnp.asarray(images[:, :64, :64])
  np.testing.assert_allclose(
      fn(small), augment.normalize(small, augment.IMAGENET_MEAN, augment.IMAGENET_STD),
      rtol=1e-6, atol=1e-6)
  # A non-square image: the shorter side goes to 64, then the centre 64x64.
  wide = jax.ShapeDtypeStruct((1, 48, 96, 3), jnp.uint8)
  assert jax.eval_shape(augment.ImagenetTransform(train=False), wide).shape == (1, 64, 64, 3)


def test_imagenet_train_full_crop_is_identity_or_flip():
  images = jnp.asarray(RNG.integers(0, 256, (32, 64, 64, 3), dtype=np.uint8))
  fn = jax.jit(augment.ImagenetTransform(train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0)))
  out = np.asarray(fn(images, _keys(32)))
  plain = np.asarray(augment.normalize(images, augment.IMAGENET_MEAN, augment.IMAGENET_STD))
  same = np.all(np.isclose(out, plain, atol=1e-5), axis=(1, 2, 3))
  flipped = np.all(np.isclose(out, plain[:, :, ::-1], atol=1e-5), axis=(1, 2, 3))
  assert np.all(same | flipped) and same.any() and flipped.any()
  stl = jax.ShapeDtypeStruct((4, 96, 96, 3), jnp.uint8)
  out = jax.eval_shape(augment.ImagenetTransform(train=True), stl, _keys(4))
  assert out.shape == (4, 64, 64, 3)


def test_transform_for_each_dataset():
  assert augment.transform_for("cifar100", True) == augment.CifarTransform(True)
  assert augment.transform_for("digits", False) == augment.CifarTransform(False)
  assert augment.transform_for("stl10", True) == augment.ImagenetTransform(True, 64, 64)
  with pytest.raises(ValueError, match="valid names are"):
    augment.transform_for("mnist", True)
