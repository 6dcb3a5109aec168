"""Building blocks shared by every architecture: PyTorch-exact BatchNorm,
convolution and linear layers with the reference's initialisers.

Every module here stores its parameters under the names the generic PyTorch
importer (``torch_import.state_dict_to_variables``) maps to a ``state_dict``:
Conv/Dense ``kernel`` <-> ``weight`` (transposed), ``bias`` <-> ``bias``,
BatchNorm ``scale``/``bias`` <-> ``weight``/``bias`` and batch_stats
``mean``/``var`` <-> ``running_mean``/``running_var``. Architectures name their
submodules exactly like the reference's PyTorch attributes (``layer1`` >
``0`` > ``conv1``), so the import needs no per-model tables.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
IntOrPair = Union[int, Tuple[int, int]]

# PyTorch's default Conv2d/Linear weight init: kaiming_uniform_(a=sqrt(5)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")
# nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu'): N(0, 2/fan_out),
# not truncated. Also WRN's and VGG's `normal_(0, sqrt(2/n))` with n = k*k*out.
kaiming_normal_fan_out = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias init for Conv2d/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pair(v: IntOrPair) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def conv2d(in_channels: int, out_channels: int, kernel_size: IntOrPair,
           stride: IntOrPair = 1, padding: IntOrPair = 0, groups: int = 1,
           bias: bool = False, kernel_init=None, bias_init=None,
           name: Optional[str] = None) -> nn.Conv:
  """``torch.nn.Conv2d(in, out, k, stride, padding, groups=, bias=)`` as an NHWC ``nn.Conv``.

  Arguments mirror PyTorch's; ``kernel_init``/``bias_init`` default to
  PyTorch's own defaults (architectures pass the reference's explicit init).
  """
  kh, kw = _pair(kernel_size)
  ph, pw = _pair(padding)
  fan_in = (in_channels // groups) * kh * kw
  return nn.Conv(
      out_channels, (kh, kw), strides=_pair(stride),
      padding=((ph, ph), (pw, pw)), feature_group_count=groups, use_bias=bias,
      kernel_init=kernel_init or torch_default_kernel_init,
      bias_init=bias_init or torch_default_bias_init(fan_in), name=name)


def linear(in_features: int, out_features: int, bias: bool = True,
           kernel_init=None, bias_init=None, name: Optional[str] = None) -> nn.Dense:
  """``torch.nn.Linear(in, out)`` as ``nn.Dense`` with PyTorch's default init."""
  return nn.Dense(
      out_features, use_bias=bias,
      kernel_init=kernel_init or torch_default_kernel_init,
      bias_init=bias_init or torch_default_bias_init(in_features), name=name)


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d``/``BatchNorm1d`` semantics, exactly.

  Train mode normalises with the biased batch variance and updates the running
  statistics as PyTorch does::

      running_mean <- (1 - momentum) * running_mean + momentum * mean_B
      running_var  <- (1 - momentum) * running_var  + momentum * var_B * n / (n - 1)

  (PyTorch's ``momentum`` = 0.1 is flax's 0.9; the unbiased ``n / (n - 1)``
  correction is what flax's own BatchNorm leaves out.) Eval mode uses the
  running statistics. Statistics reduce over every axis but the last.

  ``mask`` (``[N]`` bool, optional) excludes padded examples of a partial
  batch from the statistics; their outputs are still computed.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  scale_init: nn.initializers.Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array] = None) -> Array:
    channels = x.shape[-1]
    scale = self.param("scale", self.scale_init, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    if train:
      reduce_axes = tuple(range(x.ndim - 1))
      if mask is None:
        count = math.prod(x.shape[:-1])
        mean = jnp.mean(x, axis=reduce_axes)
        var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)
      else:
        weight = mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        count = jnp.sum(weight) * math.prod(x.shape[1:-1])
        mean = jnp.sum(x * weight, axis=reduce_axes) / count
        var = jnp.sum(jnp.square(x - mean) * weight, axis=reduce_axes) / count
      if not self.is_initializing():
        unbiased_var = var * count / jnp.maximum(count - 1, 1)
        running_mean.value = ((1 - self.momentum) * running_mean.value
                              + self.momentum * mean)
        running_var.value = ((1 - self.momentum) * running_var.value
                             + self.momentum * unbiased_var)
    else:
      mean, var = running_mean.value, running_var.value
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    return (x - mean) * inv + bias


def avg_pool(x: Array, window: IntOrPair, stride: Optional[IntOrPair] = None,
             ceil_mode: bool = False) -> Array:
  """``nn.AvgPool2d(window, stride)`` (no padding) on NHWC.

  With ``ceil_mode=True`` a last partial window is kept and averaged over the
  elements it covers (PyTorch's behaviour when padding is 0).
  """
  kh, kw = _pair(window)
  sh, sw = _pair(stride if stride is not None else window)
  if not ceil_mode and (kh, kw) == (sh, sw):
    # Non-overlapping windows: a reshape and a mean, whose gradient is a
    # broadcast. (``nn.avg_pool``'s gradient is a reduce-window over the
    # 8x-dilated cotangent: 64x the work for the 8x8 pools, 0.7 s of op time
    # in a CPU CKTF step's profile.) The rows and columns past the last full
    # window are dropped, as VALID pooling does.
    b, h, w, c = x.shape
    oh, ow = h // kh, w // kw
    x = x[:, :oh * kh, :ow * kw]
    return jnp.mean(x.reshape(b, oh, kh, ow, kw, c), axis=(2, 4))
  if not ceil_mode:
    return nn.avg_pool(x, (kh, kw), strides=(sh, sw), padding="VALID")
  h, w = x.shape[1:3]
  out_h = -(-(h - kh) // sh) + 1
  out_w = -(-(w - kw) // sw) + 1
  pad_h = max((out_h - 1) * sh + kh - h, 0)
  pad_w = max((out_w - 1) * sw + kw - w, 0)
  return nn.avg_pool(x, (kh, kw), strides=(sh, sw),
                     padding=((0, pad_h), (0, pad_w)), count_include_pad=False)


def adaptive_avg_pool(x: Array, output_size: IntOrPair) -> Array:
  """``nn.AdaptiveAvgPool2d(output_size)`` on NHWC, with PyTorch's bins.

  Bin ``i`` of ``out`` over length ``L`` spans ``[floor(i*L/out), ceil((i+1)*L/out))``,
  so non-divisible sizes give PyTorch's overlapping bins.
  """
  out_h, out_w = _pair(output_size)

  def pool_axis(v: Array, axis: int, out: int) -> Array:
    length = v.shape[axis]
    if length % out == 0:
      k = length // out
      shape = v.shape[:axis] + (out, k) + v.shape[axis + 1:]
      return jnp.mean(v.reshape(shape), axis=axis + 1)
    slices = []
    for i in range(out):
      start = (i * length) // out
      end = -(-((i + 1) * length) // out)
      slices.append(jnp.mean(jax.lax.slice_in_dim(v, start, end, axis=axis),
                             axis=axis, keepdims=True))
    return jnp.concatenate(slices, axis=axis)

  return pool_axis(pool_axis(x, 1, out_h), 2, out_w)


def check_input_size(model_name: str, x: Array, allowed: Sequence[int]) -> None:
  """Raise a clear error when a model's fixed-size head cannot take ``x``.

  Called at trace time, so the user sees it before anything compiles.
  """
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(
        f"{model_name} expects NHWC RGB images [N, H, W, 3]; got shape {x.shape}.")
  h, w = x.shape[1:3]
  if h != w or h not in allowed:
    raise ValueError(
        f"{model_name} supports {'x'.join(map(str, allowed))} square inputs "
        f"(sizes {list(allowed)}); got {h}x{w}. Its classifier head is built for "
        f"that size, as in the reference; choose a model whose head adapts "
        f"(vgg*, ResNet10..ResNet152) for other sizes.")
