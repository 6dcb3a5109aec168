"""On-device augmentation: uint8 ``[N, H, W, 3]`` -> float32 normalised NHWC.

Each example is augmented from its own PRNG key (``example_keys``: the key
folded with the example's index), so the result does not depend on batch
composition or sharding. Both transforms are jittable callables
``transform(images, keys=None)``; eval transforms ignore ``keys``.

* ``CifarTransform`` (dataset/cifar100.py): train = RandomCrop(size,
  padding=4, zero fill) + RandomHorizontalFlip(0.5); then ``(x / 255 - mean)
  / std``. Also used for digits and synthetic data, at their own size.
* ``ImagenetTransform`` (dataset/imagenet.py, dataset/stl10.py): train =
  RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear) with
  torchvision's 10-attempt sampling and central-crop fallback, + flip; test =
  Resize(resize) of the shorter side + CenterCrop(size); then normalise.

Resampling reproduces Pillow's BILINEAR ``resize`` (which torchvision calls
on PIL images) bit for bit: a triangle filter widened by the shrink factor
(antialiasing), pixel centres at ``+0.5``, Pillow's 22-bit fixed-point
coefficients computed exactly in integers, a horizontal pass then a vertical
one, each rounded to uint8. That order is Pillow's up to 12.x (the
reference's environment). Pillow 13 runs the vertical pass first when the
height shrinks much more than the width (python-pillow/Pillow#9549); there
the two orders round differently and single pixels differ by 1 (of 255).
tests/test_data_augment.py checks equality with Pillow's two passes run one
at a time, and measures the difference to a one-call Pillow 13 resize.
"""

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params' tries before its fallback.
_HIGHEST = jax.lax.Precision.HIGHEST  # No TF32/bf16 passes: integer sums must stay exact.


def example_keys(key: Array, indices: Array) -> Array:
  """One key per example: ``fold_in(key, index)``."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)


def normalize(images: Array, mean, std) -> Array:
  """``ToTensor`` + ``Normalize``: ``(x / 255 - mean) / std`` per RGB channel, float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _check_images(images: Array) -> None:
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 images [N, H, W, 3]; got {images.dtype} {images.shape}")


def _flip(u: Array, image: Array) -> Array:
  """RandomHorizontalFlip(p=0.5) of one HWC image, given ``u ~ U[0, 1)``."""
  return jnp.where(u < 0.5, image[:, ::-1], image)


def _uniform_int(u: Array, n) -> Array:
  """``floor(u * n)`` for ``u ~ U[0, 1)``: uniform on ``{0, ..., n - 1}`` (torch.randint(0, n))."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), jnp.asarray(n, jnp.int32) - 1)


# ---------------------------------------------------------------- RandomCrop


def random_crop_offsets(u: Array, padding: int) -> Array:
  """``(top, left)`` of RandomCrop(size, padding) from ``u ~ U[0, 1)^2``: each
  uniform on ``{0, ..., 2 * padding}``."""
  return _uniform_int(u, 2 * padding + 1)


def pad_and_crop(image: Array, offsets: Array, padding: int) -> Array:
  """Zero-pad one HWC image by ``padding`` and crop its original size at ``offsets``."""
  h, w, c = image.shape
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  return jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), (h, w, c))


@dataclasses.dataclass(frozen=True)
class CifarTransform:
  """dataset/cifar100.py's transforms; see the module docstring."""

  train: bool
  padding: int = 4
  mean: Tuple[float, ...] = CIFAR100_MEAN
  std: Tuple[float, ...] = CIFAR100_STD

  def __call__(self, images: Array, keys: Optional[Array] = None) -> Array:
    _check_images(images)
    if self.train:
      if keys is None:
        raise ValueError("a train transform needs one PRNG key per example")

      def one(image, key):
        u = jax.random.uniform(key, (3,))  # One draw per example: cheap to compile.
        image = pad_and_crop(image, random_crop_offsets(u[:2], self.padding), self.padding)
        return _flip(u[2], image)

      images = jax.vmap(one)(images, keys)
    return normalize(images, self.mean, self.std)


# ---------------------------------------------------------------- resampling


def resize_coefficients(out_size: int, in_size: int, start, length) -> Array:
  """int32 ``[out_size, in_size]``: Pillow's fixed-point BILINEAR coefficients
  resizing pixels ``[start, start + length)`` of an axis to ``out_size``.

  Pillow (Resample.c ``precompute_coeffs``) weighs crop pixel ``x`` for output
  ``o`` by ``tri((x + 0.5 - (o + 0.5) * L / S) / max(L / S, 1))``,
  ``tri(t) = max(0, 1 - |t|)``, normalises the weights to sum 1 and stores
  ``k = floor(w * 2**22 + 0.5)``. In integers: ``u = max(0, D - |(2x + 1) S -
  (2o + 1) L|)`` with ``D = 2 max(L, S)``, ``w = u / sum(u)``, so ``k`` is
  computed exactly (float32 would round some ``k`` the other way, and with
  them exact ties of the result). ``start``/``length`` may be traced; int32
  holds every step while ``sum(u) < 2**19`` (checked by ``resized_crop``).
  """
  length = jnp.asarray(length, jnp.int32)
  local = jnp.arange(in_size, dtype=jnp.int32)[None, :] - jnp.asarray(start, jnp.int32)
  out = jnp.arange(out_size, dtype=jnp.int32)[:, None]
  distance = jnp.abs((2 * local + 1) * out_size - (2 * out + 1) * length)
  u = jnp.maximum(2 * jnp.maximum(length, out_size) - distance, 0)
  u = jnp.where((local >= 0) & (local < length), u, 0)
  total = jnp.sum(u, axis=1, keepdims=True)
  # floor(u * 2**22 / total + 1/2) by long division in two 11-bit steps (int32-safe).
  q, r = jnp.divmod(u << 11, total)
  return (q << 11) + ((r << 12) + total) // (2 * total)


def _resample_pass(x: Array, k: Array, spec: str) -> Array:
  """One Pillow 8-bit pass: ``clip((sum(pixel * k) + 2**21) >> 22, 0, 255)``.

  The integer sum is formed exactly from two float32 matmuls over the 11-bit
  halves of ``k`` (each partial sum stays below 2**24 while a pass has at most
  32 taps, i.e. shrinks by at most 15x).
  """
  high = jnp.einsum(spec, x, (k >> 11).astype(jnp.float32), precision=_HIGHEST)
  low = jnp.einsum(spec, x, (k & 2047).astype(jnp.float32), precision=_HIGHEST)
  total = (high.astype(jnp.int32) << 11) + low.astype(jnp.int32) + (1 << 21)
  return jnp.clip(total >> 22, 0, 255).astype(jnp.float32)


def resized_crop(image: Array, box, out_size: Tuple[int, int]) -> Array:
  """``PIL crop(box) + resize(out_size, BILINEAR)`` of one uint8 HWC image:
  horizontal pass, then vertical, each rounded to uint8 as Pillow does.

  ``box`` = ``(top, left, height, width)`` (may be traced); returns float32
  holding integers in ``[0, 255]``.
  """
  top, left, height, width = box
  h, w, _ = image.shape
  for size, out in ((h, out_size[0]), (w, out_size[1])):
    # Taps per output <= 2 size / out + 2, each u <= 2 max(size, out): sum(u) < 2**19.
    if size > 15 * out or (2 * size / out + 2) * 2 * max(size, out) >= 2**19:
      raise ValueError(f"resampling a {size}-pixel side to {out} pixels is outside the exact "
                       f"integer range: needs size <= 15 * out and (2 * size / out + 2) * 2 * "
                       f"max(size, out) < 2**19")
  x = _resample_pass(image.astype(jnp.float32), resize_coefficients(out_size[1], w, left, width),
                     "hwc,xw->hxc")
  return _resample_pass(x, resize_coefficients(out_size[0], h, top, height), "hxc,yh->yxc")


# ---------------------------------------------------------------- RandomResizedCrop


def random_resized_crop_box(u: Array, height: int, width: int,
                            scale: Tuple[float, float] = (0.08, 1.0),
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Array:
  """torchvision ``RandomResizedCrop.get_params``: int32 ``(top, left, h, w)``
  from ``u ~ U[0, 1)^(4, attempts)`` (torchvision makes 10 attempts).

  Attempt ``a`` draws ``area = H * W * U(scale)`` and ``log(aspect) ~
  U(log ratio)``, ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area /
  aspect))``; the first with ``0 < w <= W`` and ``0 < h <= H`` wins and its
  corner is uniform. If none fits: the largest central crop whose aspect is
  clamped to ``ratio``. (All attempts are drawn at once; the first valid one is used.)
  """
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[1])
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  top = _uniform_int(u[2], jnp.maximum(height - h + 1, 1))
  left = _uniform_int(u[3], jnp.maximum(width - w + 1, 1))
  first = jnp.argmax(fits)

  in_ratio = width / height
  if in_ratio < min(ratio):
    fw, fh = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fw, fh = int(round(height * max(ratio))), height
  else:
    fw, fh = width, height
  fallback = jnp.array([(height - fh) // 2, (width - fw) // 2, fh, fw], jnp.int32)
  found = jnp.stack([top[first], left[first], h[first], w[first]]).astype(jnp.int32)
  return jnp.where(jnp.any(fits), found, fallback)


@dataclasses.dataclass(frozen=True)
class ImagenetTransform:
  """dataset/imagenet.py / stl10.py's transforms; see the module docstring.

  ``size`` is the crop size (64 for Tiny-ImageNet and STL-10, 224 for
  ImageNet); ``resize`` the test-time shorter side (64, or 256 for ImageNet).
  """

  train: bool
  size: int = 64
  resize: int = 64
  scale: Tuple[float, float] = (0.08, 1.0)
  ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  mean: Tuple[float, ...] = IMAGENET_MEAN
  std: Tuple[float, ...] = IMAGENET_STD

  def __call__(self, images: Array, keys: Optional[Array] = None) -> Array:
    _check_images(images)
    _, h, w, _ = images.shape
    if self.train:
      if keys is None:
        raise ValueError("a train transform needs one PRNG key per example")

      def one(image, key):
        u = jax.random.uniform(key, (4 * _ATTEMPTS + 1,))  # One draw per example.
        box = random_resized_crop_box(u[:-1].reshape(4, _ATTEMPTS), h, w, self.scale, self.ratio)
        return _flip(u[-1], resized_crop(image, box, (self.size, self.size)))

      out = jax.vmap(one)(images, keys)
    else:
      # torchvision Resize(int): shorter side -> resize, longer side int(resize * long / short).
      if h <= w:
        rh, rw = self.resize, int(self.resize * w / h)
      else:
        rh, rw = int(self.resize * h / w), self.resize
      if self.size > min(rh, rw):
        raise ValueError(f"CenterCrop({self.size}) is larger than the resized {rh}x{rw} image")
      if (rh, rw) == (h, w):  # PIL's Resize to the same size is a copy (Tiny-ImageNet test)
        resized = images
      else:
        resized = jax.vmap(lambda image: resized_crop(image, (0, 0, h, w), (rh, rw)))(images)
      top = int(round((rh - self.size) / 2.0))
      left = int(round((rw - self.size) / 2.0))
      out = resized[:, top:top + self.size, left:left + self.size]
    return normalize(out, self.mean, self.std)


def transform_for(name: str, train: bool):
  """The reference's transform for dataset ``name`` (CIFAR-style for
  cifar100/digits/synthetic, ImageNet-style at 64 for tiny_imagenet/stl10)."""
  if name in ("cifar100", "digits", "synthetic"):
    return CifarTransform(train)
  if name in ("tiny_imagenet", "stl10"):
    return ImagenetTransform(train, size=64, resize=64)
  raise ValueError(f"no transform for dataset {name!r}; valid names are: cifar100, digits, "
                   f"synthetic, tiny_imagenet, stl10")
