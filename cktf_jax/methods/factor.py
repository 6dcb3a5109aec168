"""FT (``--distill factor``): factor transfer through a pre-trained paraphraser.

Reference ``train_student.py`` / ``helper/pretrain.py`` / ``helper/loops.py``:

* init stage (``init_epochs``, default 30): only the ``Paraphraser`` of the
  teacher's ``feat[-2]`` (last stage) is trained, on ``MSE(reconstruction, f_t)``.
* main stage: ``FactorTransfer(Translator(feat_s[-2]), Paraphraser(feat_t[-2],
  is_factor=True))``; the translator is trained with the student (train() mode:
  batch-stat BN), the paraphraser is frozen (eval(), not in the optimizer).

The reference's init stage uses lr 0.01 for CIFAR-style students (resnet*/wrn*)
and ``--learning_rate`` otherwise (``helper/pretrain.py``).
"""

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from cktf_jax.losses.ft import ft_loss, ft_reconstruction_loss
from cktf_jax.losses.at import pooled_spatial_shapes
from cktf_jax.losses.modules import Paraphraser, Translator, ft_factor_channels
from cktf_jax.methods.base import Method, MethodShapeError, PretrainStage, register_method
from cktf_jax.models.features import Features

# scripts/run_tiny-imagenet_distill.sh and run_2kds.sh: `--distill factor -r 1.0 -a 0 -b 200`.
DEFAULT_WEIGHTS = (1.0, 0.0, 200.0)


def init_learning_rate(model_s: str) -> Optional[float]:
  """The init stage's lr: 0.01 for the CIFAR-style students (``resnet*``,
  ``wrn*``: the reference lists resnet8..110, resnet8x4, resnet32x4 and
  wrn_16/40_1/2), None (the run's ``learning_rate``) otherwise."""
  return 0.01 if model_s.startswith(("resnet", "wrn")) else None


@register_method("factor")
def factor_method(hparams: Mapping[str, Any]) -> Method:
  """``hparams``: ``ft_k`` (factor rate, 0.5), ``ft_p1`` (2), ``ft_p2`` (1), ``init_epochs`` (30)."""
  k = float(hparams.get("ft_k", 0.5))
  p1 = int(hparams.get("ft_p1", 2))
  p2 = int(hparams.get("ft_p2", 1))
  init_epochs = int(hparams.get("init_epochs", 30))

  def pick(feats: Features):
    return feats.as_reference_list()[-2]  # reference feat[-2]: the last stage

  def shapes(feats_s: Features, feats_t: Features):
    s, t = tuple(pick(feats_s).shape), tuple(pick(feats_t).shape)
    if len(s) != 4 or len(t) != 4 or s[0] != t[0]:
      raise MethodShapeError(f"factor: feat[-2] must be [N, H, W, C] maps of one batch; "
                             f"got student {s}, teacher {t}")
    if ft_factor_channels(t[-1], k) < 1:
      raise MethodShapeError(f"factor: k={k} leaves int({t[-1]} * k) = 0 factor channels "
                             f"for the teacher's {t}; use a larger k")
    s_hw, t_hw = pooled_spatial_shapes(s, t)
    if s_hw != t_hw:
      raise MethodShapeError(
          f"factor: the factors of student {s} and teacher {t} (NHWC) cannot be compared: "
          f"the larger map is pooled to the smaller's height as a square (as in the "
          f"reference), so the maps must be square")
    return s, t

  def init(rng, feats_s: Features, feats_t: Features):
    s, t = shapes(feats_s, feats_t)
    r_p, r_t = jax.random.split(rng)
    para = Paraphraser(t[-1], k).init(r_p, jnp.zeros((1,) + t[1:], jnp.float32))
    trans = Translator(s[-1], t[-1], k).init(r_t, jnp.zeros((1,) + s[1:], jnp.float32), False)
    return {"params": {"translator": trans["params"], "paraphraser": para["params"]},
            "batch_stats": {"translator": trans["batch_stats"]}}

  def loss(aux_params, aux_state, feats_s: Features, feats_t: Features, batch, train: bool):
    s, t = shapes(feats_s, feats_t)
    mask = batch.get("mask") if batch else None
    translator = Translator(s[-1], t[-1], k)
    variables = {"params": aux_params["translator"],
                 "batch_stats": aux_state["batch_stats"]["translator"]}
    if train:
      factor_s, updated = translator.apply(variables, pick(feats_s), True, mask,
                                           mutable=["batch_stats"])
      new_state = {"batch_stats": {"translator": updated["batch_stats"]}}
    else:
      factor_s, new_state = translator.apply(variables, pick(feats_s), False), aux_state
    # The paraphraser is frozen after the init stage: no gradient reaches it.
    para_params = jax.lax.stop_gradient(aux_params["paraphraser"])
    factor_t = Paraphraser(t[-1], k).apply({"params": para_params},
                                           jax.lax.stop_gradient(pick(feats_t)),
                                           is_factor=True)
    value = ft_loss(factor_s, factor_t, p1, p2, mask)
    return value, {"factor": value}, new_state

  def init_loss(aux_params, aux_state, feats_s: Features, feats_t: Features, batch,
                train: bool):
    del train  # the paraphraser has no BatchNorm (use_bn=False in the reference)
    _, t = shapes(feats_s, feats_t)
    mask = batch.get("mask") if batch else None
    f_t = jax.lax.stop_gradient(pick(feats_t))
    _, rec = Paraphraser(t[-1], k).apply({"params": aux_params["paraphraser"]}, f_t)
    value = ft_reconstruction_loss(rec, f_t, mask)
    return value, {"factor_rec": value}, aux_state

  pretrain = PretrainStage(epochs=init_epochs, train_student=False, loss=init_loss,
                           trainable=("paraphraser",), learning_rate_for=init_learning_rate)
  return Method(name="factor", init=init, loss=loss, pretrain=pretrain,
                default_weights=DEFAULT_WEIGHTS, frozen_aux=("paraphraser",))
