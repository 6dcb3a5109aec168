"""Learnable auxiliary modules of the distillation objectives, plus the small
array helpers their losses share.

Modules (reference ``models/util.py`` and ``distiller_zoo/VID.py``):

* ``ConvReg``: FitNet's regressor (and AB's connector entries), conv + BN (+ ReLU).
* ``Connector``: AB's per-stage list of identities / ``ConvReg(use_relu=False)``.
* ``Paraphraser`` / ``Translator``: FT's teacher auto-encoder and student encoder.
* ``VIDRegressor``: VID's per-layer 1x1-conv regressor and its variance parameter.

Every module names its submodules like the reference's PyTorch attributes
(``conv``, ``bn``, ``connectors`` > ``1``, ``encoder`` > ``0``, ``regressor`` > ``4``)
so ``models.torch_import.state_dict_to_variables`` maps a reference
``state_dict`` onto them with no tables, and initialises them like PyTorch's
defaults. All inputs are NHWC; shapes passed as attributes are NHWC tuples
``(N, H, W, C)``.

ConvTranspose2d: we use ``nn.ConvTranspose(transpose_kernel=True)``, whose
kernel ``[kH, kW, out, in]`` is exactly PyTorch's weight ``[in, out, kH, kW]``
transposed ``(2, 3, 1, 0)``, the importer's rule for every 4-D kernel; with it,
``lax.conv_transpose`` computes the gradient of a convolution, as PyTorch does.
PyTorch's ``padding=p`` is a padding of ``k - 1 - p`` of the dilated input.
"""

import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cktf_jax.models.layers import (BatchNorm, adaptive_avg_pool, conv2d,
                                    torch_default_bias_init,
                                    torch_default_kernel_init)

Array = jax.Array
Shape = Tuple[int, ...]


# ----------------------------------------------------------------------------
# Array helpers shared by the losses
# ----------------------------------------------------------------------------


def batch_mean(x: Array, mask: Optional[Array] = None) -> Array:
  """``mean(x)`` over every element; with ``mask`` ([N] bool) over the valid
  examples only, i.e. the mean the reference takes over a smaller last batch."""
  if mask is None:
    return jnp.mean(x)
  w = mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  per_example = math.prod(x.shape[1:])
  return jnp.sum(x * w) / (jnp.maximum(jnp.sum(w), 1.0) * per_example)


def batch_sum(x: Array, mask: Optional[Array] = None) -> Array:
  """``sum(x)`` over every element, with ``mask`` ([N] bool) over the valid examples."""
  if mask is None:
    return jnp.sum(x)
  w = mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.sum(x * w)


def batch_count(x: Array, mask: Optional[Array] = None) -> Array:
  """The batch size ``N``, or the number of valid examples under ``mask``."""
  if mask is None:
    return jnp.asarray(x.shape[0], x.dtype)
  return jnp.maximum(jnp.sum(mask.astype(x.dtype)), 1.0)


def leaky_relu(x: Array) -> Array:
  """``nn.LeakyReLU(0.1)`` of the FT modules."""
  return jnp.where(x >= 0, x, 0.1 * x)


def conv_transpose2d(in_channels: int, out_channels: int, kernel_size: int,
                     stride: int = 1, padding: int = 0, bias: bool = True,
                     name: Optional[str] = None) -> nn.ConvTranspose:
  """``torch.nn.ConvTranspose2d(in, out, k, stride, padding)`` as NHWC Flax.

  Output size ``(H - 1) * stride - 2 * padding + k`` as in PyTorch. Init is
  PyTorch's default: ``U(+-1/sqrt(fan_in))`` with PyTorch's ``fan_in`` of a
  transposed-conv weight ``[in, out, k, k]``, i.e. ``out * k * k`` (which is
  also what ``variance_scaling`` reads from our ``[k, k, out, in]`` kernel).
  """
  pad = kernel_size - 1 - padding
  if pad < 0:
    raise ValueError(f"conv_transpose2d needs padding <= kernel_size - 1; got "
                     f"kernel_size={kernel_size}, padding={padding}")
  return nn.ConvTranspose(
      out_channels, (kernel_size, kernel_size), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=bias, transpose_kernel=True,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(out_channels * kernel_size * kernel_size),
      name=name)


# ----------------------------------------------------------------------------
# FitNet / AB: ConvReg and Connector
# ----------------------------------------------------------------------------


def conv_reg_branch(s_shape: Shape, t_shape: Shape) -> str:
  """Which convolution ``ConvReg`` builds for NHWC shapes ``s_shape -> t_shape``.

  Reference ``models/util.py: ConvReg``, checked in this order:
  ``s_H == 2 t_H`` -> ``'stride2'`` (Conv2d k3 s2 p1); ``2 s_H == t_H`` ->
  ``'transpose'`` (ConvTranspose2d k4 s2 p1); ``s_H >= t_H`` -> ``'valid'``
  (Conv2d with kernel ``(1 + s_H - t_H, 1 + s_W - t_W)``, no padding; ``1x1``
  when the sizes match).

  Raises:
    ValueError: when no branch applies (the reference raises too) or when the
      chosen conv would not produce the teacher's spatial size (the reference
      would then compare mismatched maps, e.g. non-square inputs).
  """
  if len(s_shape) != 4 or len(t_shape) != 4:
    raise ValueError(
        f"ConvReg maps feature maps [N, H, W, C]; got student {tuple(s_shape)}, "
        f"teacher {tuple(t_shape)}")
  _, s_h, s_w, _ = s_shape
  _, t_h, t_w, _ = t_shape
  if s_h == 2 * t_h:
    branch, out_hw = "stride2", ((s_h - 1) // 2 + 1, (s_w - 1) // 2 + 1)
  elif 2 * s_h == t_h:
    branch, out_hw = "transpose", (2 * s_h, 2 * s_w)
  elif s_h >= t_h and s_w >= t_w:
    branch, out_hw = "valid", (t_h, t_w)
  elif s_h >= t_h:
    raise ValueError(
        f"ConvReg's valid conv (kernel 1 + s - t) cannot widen the student's width {s_w} "
        f"to the teacher's {t_w} (student {tuple(s_shape)}, teacher {tuple(t_shape)}); it "
        f"needs square maps (or widths related like the heights)")
  else:
    raise ValueError(
        f"ConvReg cannot map a student map of height {s_h} onto a teacher map of "
        f"height {t_h} (student {tuple(s_shape)}, teacher {tuple(t_shape)}): it "
        f"supports s_H == 2*t_H (stride-2 conv), 2*s_H == t_H (transposed conv) "
        f"or s_H >= t_H (valid conv); pick features with such sizes")
  if out_hw != (t_h, t_w):
    raise ValueError(
        f"ConvReg's {branch} conv maps the student's {s_h}x{s_w} to {out_hw[0]}x"
        f"{out_hw[1]}, not the teacher's {t_h}x{t_w} (student {tuple(s_shape)}, "
        f"teacher {tuple(t_shape)}); it needs square maps (or widths related like "
        f"the heights)")
  return branch


class ConvReg(nn.Module):
  """FitNet's convolutional regressor: ``relu(bn(conv(x)))`` (``use_relu``) or
  ``bn(conv(x))``; the conv is chosen by ``conv_reg_branch``.

  Reference ``models/util.py: ConvReg``: every conv has a bias and PyTorch's
  default init; BN is ``BatchNorm2d(t_C)`` (weight 1, bias 0).

  Attributes:
    s_shape, t_shape: NHWC shapes of the student and teacher features.
    use_relu: True for FitNet, False inside AB's ``Connector``.
  """

  s_shape: Shape
  t_shape: Shape
  use_relu: bool = True

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array] = None) -> Array:
    branch = conv_reg_branch(self.s_shape, self.t_shape)
    _, s_h, s_w, s_c = self.s_shape
    _, t_h, t_w, t_c = self.t_shape
    if branch == "stride2":
      conv = conv2d(s_c, t_c, 3, stride=2, padding=1, bias=True, name="conv")
    elif branch == "transpose":
      conv = conv_transpose2d(s_c, t_c, 4, stride=2, padding=1, name="conv")
    else:
      conv = conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w), bias=True, name="conv")
    y = BatchNorm(name="bn")(conv(x), train, mask)
    return nn.relu(y) if self.use_relu else y


def connector_is_identity(s_shape: Shape, t_shape: Shape) -> bool:
  """AB's Connector passes a stage through unchanged when channels and height
  match (reference ``models/util.py: Connector``: only C and H are compared)."""
  return s_shape[3] == t_shape[3] and s_shape[1] == t_shape[1]


class _ConnectorList(nn.Module):
  """The ``connectors`` ModuleList: entry ``i`` is ``ConvReg`` named ``str(i)``
  or, when ``connector_is_identity``, no module at all (``nn.Sequential()``)."""

  s_shapes: Tuple[Shape, ...]
  t_shapes: Tuple[Shape, ...]

  @nn.compact
  def __call__(self, g_s: Sequence[Array], train: bool,
               mask: Optional[Array] = None) -> Tuple[Array, ...]:
    out = []
    for i, (x, s, t) in enumerate(zip(g_s, self.s_shapes, self.t_shapes)):
      if connector_is_identity(s, t):
        out.append(x)
      else:
        out.append(ConvReg(s, t, use_relu=False, name=str(i))(x, train, mask))
    return tuple(out)


class Connector(nn.Module):
  """AB's connector from the student's stages to the teacher's.

  Reference ``models/util.py: Connector``: per stage, the identity when channels
  and height match, else ``ConvReg(s, t, use_relu=False)``.
  """

  s_shapes: Tuple[Shape, ...]
  t_shapes: Tuple[Shape, ...]

  @nn.compact
  def __call__(self, g_s: Sequence[Array], train: bool,
               mask: Optional[Array] = None) -> Tuple[Array, ...]:
    if not (len(g_s) == len(self.s_shapes) == len(self.t_shapes)):
      raise ValueError(f"Connector built for {len(self.s_shapes)} student and "
                       f"{len(self.t_shapes)} teacher stages got {len(g_s)} maps")
    return _ConnectorList(self.s_shapes, self.t_shapes, name="connectors")(g_s, train, mask)


# ----------------------------------------------------------------------------
# FT: Paraphraser and Translator
# ----------------------------------------------------------------------------


def ft_factor_channels(t_channels: int, k: float) -> int:
  """The factor width ``int(C_t * k)`` (truncation, as the reference)."""
  return int(t_channels * k)


class _FTEncoder(nn.Module):
  """``encoder``: three 3x3 convs (bias, PyTorch default init), each followed by
  an optional BatchNorm and LeakyReLU(0.1). Sequential indices as in the
  reference: convs at 0, 3, 6; BN at 1, 4, 7 (absent when ``use_bn`` is off,
  the reference's empty ``nn.Sequential()``); activations at 2, 5, 8."""

  in_channels: int
  out_channels: int
  use_bn: bool

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array] = None) -> Array:
    widths = [(self.in_channels, self.in_channels), (self.in_channels, self.out_channels),
              (self.out_channels, self.out_channels)]
    for j, (cin, cout) in enumerate(widths):
      x = conv2d(cin, cout, 3, padding=1, bias=True, name=str(3 * j))(x)
      if self.use_bn:
        x = BatchNorm(name=str(3 * j + 1))(x, train, mask)
      x = leaky_relu(x)
    return x


class _FTDecoder(nn.Module):
  """``decoder``: three ConvTranspose2d(k3, s1, p1) back to ``in_channels``,
  each followed by an optional BN and LeakyReLU(0.1) -- also after the last one,
  so the reconstruction is LeakyReLU'd (reference ``models/util.py: Paraphraser``)."""

  in_channels: int
  out_channels: int
  use_bn: bool

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array] = None) -> Array:
    widths = [(self.out_channels, self.out_channels), (self.out_channels, self.in_channels),
              (self.in_channels, self.in_channels)]
    for j, (cin, cout) in enumerate(widths):
      x = conv_transpose2d(cin, cout, 3, stride=1, padding=1, name=str(3 * j))(x)
      if self.use_bn:
        x = BatchNorm(name=str(3 * j + 1))(x, train, mask)
      x = leaky_relu(x)
    return x


class Paraphraser(nn.Module):
  """FT's paraphraser: an auto-encoder of the teacher's feature.

  Reference ``models/util.py: Paraphraser(t_shape, k=0.5, use_bn=False)``.
  ``__call__`` returns ``(factor, reconstruction)``; with ``is_factor=True`` only
  the factor (the decoder is then not run; it still exists in ``init``).

  Attributes:
    t_channels: the teacher feature's channels ``C_t``.
    k: factor rate; the factor has ``int(C_t * k)`` channels.
    use_bn: BatchNorm after every conv (off in the reference's use).
  """

  t_channels: int
  k: float = 0.5
  use_bn: bool = False

  @nn.compact
  def __call__(self, f_t: Array, train: bool = False, is_factor: bool = False,
               mask: Optional[Array] = None):
    mid = ft_factor_channels(self.t_channels, self.k)
    factor = _FTEncoder(self.t_channels, mid, self.use_bn, name="encoder")(f_t, train, mask)
    decoder = _FTDecoder(self.t_channels, mid, self.use_bn, name="decoder")
    if is_factor and not self.is_initializing():
      return factor
    rec = decoder(factor, train, mask)
    return factor if is_factor else (factor, rec)


class Translator(nn.Module):
  """FT's translator: the paraphraser's encoder on the student's feature, with BN.

  Reference ``models/util.py: Translator(s_shape, t_shape, k=0.5, use_bn=True)``:
  input ``C_s`` channels, factor ``int(C_t * k)`` channels.
  """

  s_channels: int
  t_channels: int
  k: float = 0.5
  use_bn: bool = True

  @nn.compact
  def __call__(self, f_s: Array, train: bool, mask: Optional[Array] = None) -> Array:
    mid = ft_factor_channels(self.t_channels, self.k)
    return _FTEncoder(self.s_channels, mid, self.use_bn, name="encoder")(f_s, train, mask)


# ----------------------------------------------------------------------------
# VID: per-layer regressor and variance
# ----------------------------------------------------------------------------


def vid_log_scale_init(init_pred_var: float, eps: float):
  """The reference's ``log_scale`` init: ``log(exp(init_pred_var - eps) - 1)``
  in every channel, so that ``softplus(log_scale) + eps == init_pred_var``
  (computed in float64, stored float32, as ``np.log(...) * torch.ones(C)``)."""
  value = float(np.log(np.exp(init_pred_var - eps) - 1.0))

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)

  return init


class _VIDSequential(nn.Module):
  """``regressor``: conv1x1 (no bias) at 0, ReLU, conv1x1 at 2, ReLU, conv1x1 at 4."""

  in_channels: int
  mid_channels: int
  out_channels: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.relu(conv2d(self.in_channels, self.mid_channels, 1, name="0")(x))
    x = nn.relu(conv2d(self.mid_channels, self.mid_channels, 1, name="2")(x))
    return conv2d(self.mid_channels, self.out_channels, 1, name="4")(x)


class VIDRegressor(nn.Module):
  """One VID layer's learnable parts: the mean regressor and ``log_scale``.

  Reference ``distiller_zoo/VID.py: VIDLoss(C_s, C_t, C_t, init_pred_var=5.0,
  eps=1e-5)``: three bias-free 1x1 convs with PyTorch's default init, and a
  per-channel ``log_scale`` parameter. ``__call__`` returns
  ``(pred_mean, log_scale)``; the loss is ``losses.vid.vid_loss``.
  """

  in_channels: int
  mid_channels: int
  out_channels: int
  init_pred_var: float = 5.0
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Tuple[Array, Array]:
    log_scale = self.param("log_scale", vid_log_scale_init(self.init_pred_var, self.eps),
                           (self.out_channels,))
    pred_mean = _VIDSequential(self.in_channels, self.mid_channels, self.out_channels,
                               name="regressor")(x)
    return pred_mean, log_scale
