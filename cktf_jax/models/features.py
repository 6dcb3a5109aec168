"""The Features pytree every model returns.

A model's ``__call__(x, train)`` returns all intermediate representations any
distillation method needs; methods pick fields by name and XLA drops what no
one uses. This replaces the reference's ``forward(x, is_feat, preact,
flatGroupOut, kd2)`` flags and its index-based feature lists
(``feat[0]`` = stem, ``feat[1:-1]`` = stages, ``feat[-1]`` = pooled).
"""

from typing import Tuple

import flax.struct
import jax

Array = jax.Array


@flax.struct.dataclass
class Features:
  """Intermediate representations of one forward pass, all NHWC.

  Attributes:
    stem: the stem output, reference ``feat[0]``: ``[N, H, W, C0]``.
    stages: post-activation stage outputs, reference ``feat[1:-1]``
      (``is_feat=True, preact=False``); one ``[N, H_i, W_i, C_i]`` per stage.
    stages_preact: the same stage outputs before their last ReLU, reference
      ``feat[1:-1]`` with ``preact=True`` (used by AB); equal to ``stages``
      for models whose reference ignores ``preact``.
    blocks: per stage, the output of every block of that stage (CKTF's layer
      selection, ``distiller_zoo/ST.py``); ``blocks[i][-1]`` equals
      ``stages[i]`` for models whose stages end in a block.
    pooled: the penultimate vector fed to the classifier, reference
      ``feat[-1]``: ``[N, D]``.
    logits: ``[N, num_classes]``.
  """

  stem: Array
  stages: Tuple[Array, ...]
  stages_preact: Tuple[Array, ...]
  blocks: Tuple[Tuple[Array, ...], ...]
  pooled: Array
  logits: Array

  def as_reference_list(self) -> Tuple[Array, ...]:
    """The reference's ``feat`` list: ``[f0, f1, ..., fk, pooled]``.

    For options that index it the way the reference does (e.g. FitNet's
    ``--hint_layer``, FSP's ``feat[:-1]``, FT's ``feat[-2]``).
    """
    return (self.stem, *self.stages, self.pooled)
