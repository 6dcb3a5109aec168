"""The Method interface: how one distillation objective consumes Features.

The train step knows nothing about any particular method. It computes

    loss = gamma * CE(student) + alpha * KD(student, teacher) + beta * method_loss

(reference ``helper/loops.py: train_distill``), where ``method_loss`` comes
from the Method selected by the config's name. A Method:

* ``init(rng, feats_s, feats_t)`` creates its auxiliary variables from the
  feature shapes (embeds, regressors, connectors): ``{'params': ..., <state
  collections>...}``; an empty dict when it has none. It validates the shapes
  here and raises ``MethodShapeError`` naming the method, the shapes and what
  would work, so bad combinations fail before anything compiles (call it under
  ``jax.eval_shape`` to get that check for free).
* ``loss(aux_params, aux_state, feats_s, feats_t, batch, train)`` returns
  ``(loss, metrics, new_aux_state)``: a scalar, a dict of named scalars (the
  per-term values, unweighted), and the updated non-parameter collections
  (``batch_stats`` of a ConvReg, CRD memory banks). ``feats_t`` is the frozen
  teacher's output; gradients flow into ``feats_s`` and ``aux_params``.
* ``pretrain``: an optional ``PretrainStage`` (AB, FT, FSP's "init" stage of
  ``helper/pretrain.py``).

Adding a method is one file with a ``@register_method('name')`` factory and one
import line in ``methods/__init__.py``.
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax

from cktf_jax.models.features import Features
from cktf_jax.registry import Registry

Array = jax.Array
Variables = Dict[str, Any]
Metrics = Dict[str, Array]
# batch: 'image' [N,H,W,3] float, 'label' [N] int, 'index' [N] int (dataset row),
# 'mask' [N] bool (False on padding of a partial batch), optional 'contrast_idx' [N, K+1].
Batch = Mapping[str, Array]
LossFn = Callable[[Any, Variables, Features, Features, Batch, bool],
                  Tuple[Array, Metrics, Variables]]


class MethodShapeError(ValueError):
  """Raised by ``Method.init`` when the features cannot be used by the method."""


@dataclasses.dataclass(frozen=True)
class PretrainStage:
  """A method's "init" stage (reference ``helper/pretrain.py: init``).

  Attributes:
    epochs: how many epochs it runs (reference ``--init_epochs``, 30).
    train_student: whether the student's feature layers are trained too (AB,
      FSP train the connector/student feature modules; FT only the paraphraser).
    loss: same signature as ``Method.loss``; its ``aux_params`` are the
      method's full auxiliary params.
    trainable: names of the top-level entries of ``aux_params['...']`` that
      this stage trains (e.g. ``('paraphraser',)``); every other aux entry is frozen.
    learning_rate_for: optional ``fn(student_model_name) -> lr or None``: the
      stage's constant learning rate for that student, None (or no function)
      for the run's learning rate (FT: 0.01 for CIFAR resnet*/wrn* students).

  The train loop runs it (``train.loop``) with a fresh torch-style SGD
  (the run's momentum and weight decay, constant lr) over the aux entries in
  ``trainable`` and, with ``train_student``, the student's feature layers: all
  its params but the classifier (``optim.classifier_names``), the reference's
  ``get_feat_modules()``. The teacher is frozen in eval mode.
  """

  epochs: int
  train_student: bool
  loss: LossFn
  trainable: Tuple[str, ...]
  learning_rate_for: Optional[Callable[[str], Optional[float]]] = None


@dataclasses.dataclass(frozen=True)
class Method:
  """One distillation objective; see the module docstring."""

  name: str
  init: Callable[[jax.Array, Features, Features], Variables]
  loss: LossFn
  pretrain: Optional[PretrainStage] = None
  # The reference scripts' (gamma, alpha, beta) for this method: weights of
  # CE, KD and this method's loss (scripts/run_cifar100_distill.sh).
  default_weights: Tuple[float, float, float] = (1.0, 0.0, 0.0)
  # Top-level entries of the aux params that the main stage does not train
  # (outside the optimiser, so no weight decay either): the reference leaves
  # AB's connector and FT's paraphraser out of train_student.py's trainable_list.
  frozen_aux: Tuple[str, ...] = ()
  # Whether this method needs a batch's 'contrast_idx' (CRD-style negatives).
  needs_contrast_idx: bool = False


MethodFactory = Callable[[Mapping[str, Any]], Method]
_METHODS: Registry[MethodFactory] = Registry("method")
# Decorator for ``factory(hparams) -> Method``; ``hparams`` is the config's
# ``method`` section (a dict) plus the run's context (see the module docstring).
register_method = _METHODS.register
# Every registered method name (the reference's ``--distill`` values).
method_names = _METHODS.names
# Raise ``ValueError`` listing the valid names when a name is unknown.
check_method_name = _METHODS.check


def create_method(name: str, hparams: Optional[Mapping[str, Any]] = None) -> Method:
  """The Method for the reference's ``--distill name``."""
  return _METHODS.get(name)(dict(hparams or {}))
