"""CKTF's layer pairing: which student/teacher features each CRD head compares.

Paper: Zhao, Chen, Kong, Fang, "A Contrastive Knowledge Transfer Framework for
Model Compression and Transfer Learning" (CKTF), ICASSP 2023.
Reference: ``distiller_zoo/SimilarityTransfer`` in ``distiller_zoo/ST.py``
(the stage pairs), used by ``helper/loops.py: train_distill`` with
``--distill crdst``; the per-head sizes come from ``train_student.py``.

CKTF puts one contrastive (CRD) head on every "pair" of representations. With
``L`` stages the reference's order is::

    pair 0        (f0_s, f0_t)            stems, each pooled by its model's own pooling
    pair 1..L     SimilarityTransfer      one per stage, see below
    pair L+1      (pooled_s, pooled_t)    the classifier inputs

Per stage ``i`` (student blocks ``S_1..S_m``, teacher blocks ``T_0..T_{B-1}``,
NHWC ``[N, H, W, C]``), ``distiller_zoo/ST.py`` does::

    s    = normalize_batch(S_m)                   # only the LAST student block
    t_b  = normalize_batch(T_b)                   # every teacher block
    s    = pad_channels(s, (C_t - C_s) // 2)      # zeros both sides (crop if < 0)
    cos_b = <s, t_b> / max(||s|| ||t_b||, 1e-8)   # one cosine over the whole tensor
    k    = select(method, cos)                    # Last / First / Smallest / Largest / Random
    pair = (flat(pool(s)), flat(pool(t_k)))       # [N, D], D = C_t * h * w

with ``normalize_batch(x)[n, h, w, c] = x[n, h, w, c] / max(||x[:, h, w, c]||_2, 1e-12)``:
the L2 norm runs over the BATCH axis (``F.normalize(x, p=2, dim=0)``), so every
feature position becomes a unit vector across the batch and the result
depends on the whole batch. ``pool`` is the student model's pooling (see
``pool_kind_for_model``) and ``flat`` flattens in PyTorch's (C, h, w) order so
that CRD embed weights imported from the reference line up.

Everything here is shape-static Python around pure ``jax.numpy``: ``method``
and the pool kinds are static, the selected block index is a traced int32 (so
Smallest/Largest/Random run under ``jax.jit``), and gradients reach the
student's last block of every stage (never the other blocks, as in the
reference).
"""

import enum
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from cktf_jax.losses.at import l2_normalize
from cktf_jax.models.features import Features
from cktf_jax.models.layers import adaptive_avg_pool, avg_pool

Array = jax.Array
Pair = Tuple[Array, Array]
Shape = Tuple[int, ...]

ST_METHODS = ("Last", "Smallest", "Largest", "First", "Random")
_NORM_EPS = 1e-12    # F.normalize's default eps
_COSINE_EPS = 1e-8   # ST.py's max(|a||b|, 1e-8)


class PoolKind(str, enum.Enum):
  """How a feature map is reduced before it is flattened for a CRD head.

  ``GLOBAL``: ``nn.AdaptiveAvgPool2d((1, 1))`` -> ``[N, C]``.
  ``AVG8``: ``nn.AvgPool2d(8)`` / ``F.avg_pool2d(x, 8)`` (window 8, stride 8,
  floor mode) -> ``[N, C * (H // 8) * (W // 8)]``; it presumes 32x32 inputs.
  """

  GLOBAL = "global"
  AVG8 = "avg8"


PoolLike = Union[PoolKind, str]


def pool_kind_for_model(model_name: str) -> PoolKind:
  """The reference's name-substring rule for the pooling of a model, made explicit.

  ``distiller_zoo/ST.py`` chooses the stage-pair pooling from substrings of
  ``model_s``; the models' own ``flatGroupOut`` pooling of ``f0`` (the stem
  pair) follows the same families, so this one rule serves both:

  * ``"wrn"`` in the name -> ``AVG8`` (ST.py tests "wrn" first; ``models/wrn.py``
    uses ``F.avg_pool2d(x, 8)``);
  * else ``"ResNet"`` or ``"vgg"`` -> ``GLOBAL`` (``models/resnetv2.py``'s
    ``avgpool``, ``models/vgg.py``'s ``pool4``);
  * else ``"resnet"`` -> ``AVG8`` (``models/resnet.py``'s ``AvgPool2d(8)``).

  Only these names are matched (case-sensitive, as in the reference). Call it
  once when building a method, never inside the math.

  Raises:
    ValueError: for any other name (MobileNetV2, ShuffleV1, ShuffleV2: the
      reference raises NotImplementedError, and their ``forward`` has no
      ``flatGroupOut`` argument, so ``crdst`` cannot run with them).
  """
  if "wrn" in model_name:
    return PoolKind.AVG8
  if "ResNet" in model_name or "vgg" in model_name:
    return PoolKind.GLOBAL
  if "resnet" in model_name:
    return PoolKind.AVG8
  raise ValueError(
      f"CKTF layer pairing has no pooling rule for model {model_name!r}: the reference "
      "(distiller_zoo/ST.py) supports only names containing 'wrn', 'ResNet', 'vgg' or "
      "'resnet' (MobileNetV2/ShuffleV1/ShuffleV2 cannot be used with crdst); choose a "
      "resnet*, wrn_*, ResNet* or vgg* model.")


def _as_pool_kind(pool: PoolLike) -> PoolKind:
  try:
    return PoolKind(pool)
  except ValueError:
    raise ValueError(f"unknown pool kind {pool!r}; use one of "
                     f"{[k.value for k in PoolKind]} (see pool_kind_for_model)") from None


def pooled_width(shape: Sequence[int], pool: PoolLike) -> int:
  """``D`` of ``pool_and_flatten`` for an NHWC map of ``shape`` (shapes only)."""
  pool = _as_pool_kind(pool)
  if len(shape) != 4:
    raise ValueError(f"pooling needs an NHWC map [N, H, W, C]; got shape {tuple(shape)}")
  _, h, w, c = shape
  if pool is PoolKind.GLOBAL:
    return int(c)
  if h < 8 or w < 8:
    raise ValueError(
        f"8x8 average pooling (pool kind 'avg8', the reference's AvgPool2d(8) for "
        f"resnet*/wrn* models) needs maps of at least 8x8; got shape {tuple(shape)}. "
        "These models presume 32x32 inputs.")
  return int(c) * (h // 8) * (w // 8)


def pool_and_flatten(x: Array, pool: PoolLike) -> Array:
  """``pool(x).view(N, -1)`` of the reference: NHWC ``[N, H, W, C]`` -> ``[N, D]``.

  The pooled map is flattened in PyTorch's NCHW (C, h, w) order, so a Linear
  layer imported from the reference sees its inputs in the same order.
  """
  pooled_width(x.shape, pool)  # validates
  if _as_pool_kind(pool) is PoolKind.GLOBAL:
    y = adaptive_avg_pool(x, 1)
  else:
    y = avg_pool(x, 8)
  return jnp.transpose(y, (0, 3, 1, 2)).reshape(y.shape[0], -1)


def normalize_over_batch(x: Array, mask: Optional[Array] = None) -> Array:
  """``F.normalize(x, p=2, dim=0)``: each (h, w, c) position across the batch.

  Normalising over the BATCH axis (not over the features of each example) is
  what ``distiller_zoo/ST.py`` does, reproduced on purpose. ``mask`` (``[N]``
  bool, optional) zeroes padded examples of a partial batch first, so the
  norms are those of the real examples only (the reference's smaller last
  batch); padded rows come out as zeros.
  """
  if mask is not None:
    x = x * jnp.asarray(mask, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return l2_normalize(x, axis=0, eps=_NORM_EPS)


def global_cosine(a: Array, b: Array) -> Array:
  """``sum(a * b) / max(||a|| ||b||, 1e-8)`` over the whole tensors (ST.py's cosine)."""
  na = jnp.sqrt(jnp.sum(jnp.square(a)))
  nb = jnp.sqrt(jnp.sum(jnp.square(b)))
  return jnp.sum(a * b) / jnp.maximum(na * nb, _COSINE_EPS)


def channel_padding(s_shape: Sequence[int], t_shape: Sequence[int]) -> int:
  """``p`` of ``pad_student_channels`` for these NHWC shapes (shapes only).

  Raises:
    ValueError: if batch or spatial sizes differ, or ``C_t - C_s`` is odd.
  """
  s_shape, t_shape = tuple(int(d) for d in s_shape), tuple(int(d) for d in t_shape)
  if s_shape == t_shape:
    return 0
  if len(s_shape) != 4 or len(t_shape) != 4 or s_shape[:3] != t_shape[:3]:
    raise ValueError(
        f"CKTF layer pairing: the student block {s_shape} and the teacher block "
        f"{t_shape} (NHWC) must have the same batch and spatial size; only channels are "
        "padded (distiller_zoo/ST.py). Pair models whose stages downsample alike.")
  c_s, c_t = s_shape[-1], t_shape[-1]
  p = (c_t - c_s) // 2
  if c_s + 2 * p != c_t:
    raise ValueError(
        f"CKTF layer pairing: student block {s_shape} cannot be padded to the "
        f"teacher's {t_shape} (NHWC): the reference pads (C_t - C_s) // 2 = {p} channels "
        f"on each side, which needs an even channel difference (got {c_t - c_s}). Use "
        "models whose stage widths differ by an even number.")
  return p


def pad_student_channels(s: Array, t_shape: Sequence[int]) -> Array:
  """Zero-pad (or crop) ``s``'s channels to the teacher's, as ``distiller_zoo/ST.py``.

  The reference pads ``p = (C_t - C_s) // 2`` zero channels on EACH side (only
  when the shapes differ). Reproduced on purpose, including its corners: a
  student wider than the teacher gets negative padding, i.e. ``-p`` channels
  cropped from each side; an odd ``C_t - C_s`` cannot give ``C_t`` channels
  (the reference's shape assert fails), and nothing else is adapted.

  Raises:
    ValueError: see ``channel_padding``.
  """
  p = channel_padding(s.shape, t_shape)
  if tuple(s.shape) == tuple(t_shape):
    return s
  # lax.pad with a negative edge crops, like F.pad with negative padding.
  return jax.lax.pad(s, jnp.zeros((), s.dtype), ((0, 0, 0),) * 3 + ((p, p, 0),))


def _select(method: str, similarities: Array, num_blocks: int,
            key: Optional[jax.Array]) -> Array:
  """Index of the mapped teacher block (int32 scalar)."""
  if method == "Last":
    return jnp.asarray(num_blocks - 1, jnp.int32)
  if method == "First":
    return jnp.asarray(0, jnp.int32)
  if method == "Random":
    return jax.random.randint(key, (), 0, num_blocks, dtype=jnp.int32)
  # The reference sorts (stably) and pops the last element, so among equal
  # similarities the LATER block wins for both Smallest and Largest.
  flipped = similarities[::-1]
  pos = jnp.argmin(flipped) if method == "Smallest" else jnp.argmax(flipped)
  return (num_blocks - 1 - pos).astype(jnp.int32)


class StagePairs(NamedTuple):
  """``similarity_transfer``'s result, one entry per stage.

  Attributes:
    pairs: ``(s, t)`` per stage, each ``[N, D_i]`` with ``D_i`` the teacher
      stage's pooled width (the student side is padded to the teacher's channels).
    keys: the selected teacher block of each stage, int32 scalars.
    similarities: ``[B_i]`` cosines of the padded student block with every
      teacher block of the stage (computed for every method, as the reference).
  """

  pairs: Tuple[Pair, ...]
  keys: Tuple[Array, ...]
  similarities: Tuple[Array, ...]


def _check_method(method: str, key: Optional[jax.Array]) -> None:
  if method not in ST_METHODS:
    raise ValueError(f"unknown st_method {method!r}; use one of {list(ST_METHODS)}")
  if method == "Random" and key is None:
    raise ValueError("st_method 'Random' needs a PRNG key (key=...)")


def _check_stage_counts(blocks_s, blocks_t) -> None:
  if len(blocks_s) != len(blocks_t):
    shapes_s = [tuple(b[-1].shape) if b else () for b in blocks_s]
    shapes_t = [tuple(b[-1].shape) if b else () for b in blocks_t]
    raise ValueError(
        f"CKTF layer pairing needs as many student stages as teacher stages; got "
        f"{len(blocks_s)} student stages (last blocks {shapes_s}) and {len(blocks_t)} "
        f"teacher stages ({shapes_t}). The reference zips them and silently drops the "
        "extra stages; pair models of the same family layout (resnet*/wrn*: 3 stages, "
        "ResNet*/vgg*: 4 stages).")


def similarity_transfer(blocks_s: Sequence[Sequence[Array]],
                        blocks_t: Sequence[Sequence[Array]],
                        method: str, pool: PoolLike,
                        key: Optional[jax.Array] = None,
                        mask: Optional[Array] = None) -> StagePairs:
  """``SimilarityTransfer(method, model_s)(block_out_s, block_out_t)`` of ``distiller_zoo/ST.py``.

  See the module docstring for the equations. Per stage ``i``:
  ``blocks_s[i]`` are the student's block outputs ``[N, H_i, W_i, C_s]`` (only
  the last is used), ``blocks_t[i]`` the teacher's ``[N, H_i, W_i, C_t]`` (all
  of the same shape). Both sides are pooled with ``pool``
  (``pool_kind_for_model(model_s)``: the STUDENT's rule, for both).

  Args:
    blocks_s, blocks_t: per stage, the block outputs (``Features.blocks``).
    method: ``Last`` (last teacher block), ``First`` (block 0), ``Smallest`` /
      ``Largest`` (least / most cosine-similar block; ties -> later block) or
      ``Random`` (uniform per stage, from ``key``). Static.
    pool: a ``PoolKind`` (static).
    key: PRNG key, required for ``Random`` (split once per stage).
    mask: optional ``[N]`` bool excluding padded examples from the batch norms.

  Returns:
    ``StagePairs`` (pairs, selected block indices, similarities).

  Raises:
    ValueError: unknown method, ``Random`` without a key, different stage
      counts, an empty stage, teacher blocks of different shapes in a stage,
      or a student block that cannot be padded to the teacher's (odd channel
      difference, different batch/spatial size), or maps smaller than 8x8
      with ``AVG8`` pooling.
  """
  _check_method(method, key)
  pool = _as_pool_kind(pool)
  _check_stage_counts(blocks_s, blocks_t)
  stage_keys = (jax.random.split(key, len(blocks_t)) if method == "Random"
                else [None] * len(blocks_t))

  pairs, keys, sims = [], [], []
  for i, (s_blocks, t_blocks) in enumerate(zip(blocks_s, blocks_t)):
    if not s_blocks or not t_blocks:
      raise ValueError(f"CKTF layer pairing: stage {i} has no blocks "
                       f"({len(s_blocks)} student, {len(t_blocks)} teacher)")
    t_shapes = {tuple(t.shape) for t in t_blocks}
    if len(t_shapes) != 1:
      raise ValueError(
          f"CKTF layer pairing: the teacher blocks of stage {i} have different shapes "
          f"{sorted(t_shapes)}; every block of a stage must share one shape.")
    t_shape = t_shapes.pop()
    s_norm = normalize_over_batch(s_blocks[-1], mask)
    s_norm = pad_student_channels(s_norm, t_shape)
    t_norms = [normalize_over_batch(t, mask) for t in t_blocks]
    simi = jnp.stack([global_cosine(s_norm, t) for t in t_norms])
    k = _select(method, simi, len(t_blocks), stage_keys[i])
    # Pooling is per-example linear, so pooling every teacher block and then
    # picking one gives exactly pool(picked block).
    t_flat = jnp.stack([pool_and_flatten(t, pool) for t in t_norms])
    pairs.append((pool_and_flatten(s_norm, pool),
                  jax.lax.dynamic_index_in_dim(t_flat, k, axis=0, keepdims=False)))
    keys.append(k)
    sims.append(simi)
  return StagePairs(tuple(pairs), tuple(keys), tuple(sims))


def cktf_pairs(feats_s: Features, feats_t: Features, method: str,
               student_pool: PoolLike, teacher_pool: Optional[PoolLike] = None,
               key: Optional[jax.Array] = None,
               mask: Optional[Array] = None) -> Tuple[Pair, ...]:
  """Every (student, teacher) pair CKTF's CRD heads consume, in the reference's order.

  ``helper/loops.py: train_distill`` for ``distill='crdst'`` feeds::

      head 1        (pool_s(stem_s), pool_t(stem_t))   flatGroupOut f0, each model's own pooling
      heads 2..L+1  similarity_transfer(blocks_s, blocks_t, method, pool_s).pairs
      head L+2      (pooled_s, pooled_t)               the classifier inputs (f_{L+1})

  (the middle ``flatGroupOut`` features f1..fL are never used). Heads 1..L+1
  form ``loss_kd_crdSt`` (weight ``theta``), head L+2 ``loss_kd_crd``
  (weight ``beta``).

  Args:
    feats_s, feats_t: student and teacher ``Features``.
    method: the ``st_method`` (static).
    student_pool: ``pool_kind_for_model(model_s)``; pools the student stem and
      both sides of every stage pair.
    teacher_pool: ``pool_kind_for_model(model_t)``; pools the teacher stem only.
      Defaults to ``student_pool``.
    key: PRNG key for ``Random``.
    mask: optional ``[N]`` bool; only the batch-axis normalisation of the stage
      pairs uses it (the stem and final pairs are per-example).

  Returns:
    A tuple of ``L + 2`` pairs of ``[N, D]`` arrays; ``crdst_embed_dims`` gives
    the head input sizes the reference builds for them.
  """
  teacher_pool = student_pool if teacher_pool is None else teacher_pool
  stages = similarity_transfer(feats_s.blocks, feats_t.blocks, method, student_pool,
                               key=key, mask=mask)
  stem = (pool_and_flatten(feats_s.stem, student_pool),
          pool_and_flatten(feats_t.stem, teacher_pool))
  return (stem, *stages.pairs, (feats_s.pooled, feats_t.pooled))


def crdst_embed_dims(feats_s: Features, feats_t: Features, student_pool: PoolLike,
                     teacher_pool: Optional[PoolLike] = None) -> Tuple[Tuple[int, int], ...]:
  """``(s_dim, t_dim)`` of every CRD head, as ``train_student.py`` builds them.

  Shapes only (works on ``jax.eval_shape`` output). The reference sizes head
  ``j`` from its ``flatGroupOut`` feature lists: ``t_dim = width(feat_t[j-1])``
  and ``s_dim = width(feat_t[j-1])`` too, except for the last head where
  ``s_dim = width(feat_s[-1])``, i.e. ::

      head 1:        (W(pool_t(stem_t)),     W(pool_t(stem_t)))
      head 2..L+1:   (W(pool_t(stage_t_i)),  W(pool_t(stage_t_i)))   teacher's own pooling
      head L+2:      (W(pooled_s),           W(pooled_t))

  It then feeds them ``cktf_pairs``; where the two disagree the reference
  crashes at its first step, so this raises instead. (The reference infers
  the widths from a 32x32 dummy batch whatever the dataset; here they follow
  the features given, which for ``AVG8`` models only agree at 32x32.)

  Raises:
    ValueError: if the student stem does not flatten to the teacher's stem
      width, a stage's student block cannot be padded to the teacher's, or a stage pair (pooled with the student's rule) does not have
      the teacher's own pooled stage width, or the stage counts differ.
  """
  teacher_pool = student_pool if teacher_pool is None else teacher_pool
  _check_stage_counts(feats_s.blocks, feats_t.blocks)
  if len(feats_s.stages) != len(feats_t.stages):
    raise ValueError(f"CKTF: {len(feats_s.stages)} student stages vs "
                     f"{len(feats_t.stages)} teacher stages")
  w_stem_t = pooled_width(feats_t.stem.shape, teacher_pool)
  w_stem_s = pooled_width(feats_s.stem.shape, student_pool)
  if w_stem_s != w_stem_t:
    raise ValueError(
        f"CKTF: the student stem {tuple(feats_s.stem.shape)} flattens to {w_stem_s} but "
        f"the reference builds the stem head with the teacher's width {w_stem_t} (teacher "
        f"stem {tuple(feats_t.stem.shape)}); train_student.py uses s_dim = feat_t[0] "
        "width. Pair models whose stems have the same channels and pooled size.")
  dims = [(w_stem_t, w_stem_t)]
  for i, (stage_t, s_blocks, t_blocks) in enumerate(
      zip(feats_t.stages, feats_s.blocks, feats_t.blocks)):
    channel_padding(s_blocks[-1].shape, t_blocks[-1].shape)  # raises on a bad pair
    width = pooled_width(stage_t.shape, teacher_pool)
    fed = pooled_width(t_blocks[-1].shape, student_pool)
    if fed != width:
      raise ValueError(
          f"CKTF: stage {i}'s pair has width {fed} (teacher block "
          f"{tuple(t_blocks[-1].shape)} pooled with the student's rule "
          f"'{_as_pool_kind(student_pool).value}') but the reference builds its head "
          f"for {width} (the teacher's own '{_as_pool_kind(teacher_pool).value}' "
          "pooling of that stage). Pair models with the same pooling rule.")
    dims.append((width, width))
  dims.append((int(feats_s.pooled.shape[-1]), int(feats_t.pooled.shape[-1])))
  return tuple(dims)
