"""AB (``--distill abound``): activation-boundary transfer, trained only in the
init stage.

Reference ``train_student.py`` / ``helper/pretrain.py`` / ``helper/loops.py``:

* init stage (``init_epochs``, default 30): ``Connector(feat_s[1:-1])`` against
  the teacher's ``feat[1:-1]``, both PRE-activation (``preact=True``:
  ``Features.stages_preact``), loss ``sum(ABLoss(...))``; trains the connector
  and the student's feature modules (everything but its classifier), the
  connector in train() mode (batch-stat BN).
* main stage: ``loss_kd = 0``; the connector is neither used nor trained.

The reference builds the connector from 32x32 dummy-batch shapes; we use the
shapes of the features given to ``init``.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from cktf_jax.losses.ab import ab_losses
from cktf_jax.losses.modules import Connector, conv_reg_branch, connector_is_identity
from cktf_jax.methods.base import Method, MethodShapeError, PretrainStage, register_method
from cktf_jax.models.features import Features

# scripts/run_tiny-imagenet_distill.sh and run_2kds.sh: `--distill abound -r 1.0 -a 0 -b 1`
# (beta multiplies the main stage's loss_kd, which is 0 for AB).
DEFAULT_WEIGHTS = (1.0, 0.0, 1.0)


@register_method("abound")
def abound_method(hparams: Mapping[str, Any]) -> Method:
  """``hparams``: ``ab_margin`` (default 1.0), ``init_epochs`` (default 30)."""
  margin = float(hparams.get("ab_margin", 1.0))
  init_epochs = int(hparams.get("init_epochs", 30))

  def shapes(feats_s: Features, feats_t: Features):
    s_all = tuple(tuple(f.shape) for f in feats_s.stages_preact)
    t_all = tuple(tuple(f.shape) for f in feats_t.stages_preact)
    if len(s_all) != len(t_all):
      raise MethodShapeError(
          f"abound connects the student's and the teacher's stages one to one; got "
          f"{len(s_all)} student stages {list(s_all)} and {len(t_all)} teacher stages "
          f"{list(t_all)} (NHWC); use a teacher/student pair with the same number of stages")
    for i, (s, t) in enumerate(zip(s_all, t_all)):
      if len(s) != 4 or len(t) != 4 or s[0] != t[0]:
        raise MethodShapeError(f"abound: stage {i} needs [N, H, W, C] maps of one batch; "
                               f"got student {s}, teacher {t}")
      if connector_is_identity(s, t):
        if s != t:
          raise MethodShapeError(
              f"abound: stage {i} student {s} and teacher {t} (NHWC) agree in height and "
              f"channels, so the connector is the identity, but the widths differ; AB needs "
              f"square maps")
        continue
      try:
        conv_reg_branch(s, t)
      except ValueError as e:
        raise MethodShapeError(f"abound: stage {i} connector: {e}") from None
    return s_all, t_all

  def init(rng, feats_s: Features, feats_t: Features):
    s_all, t_all = shapes(feats_s, feats_t)
    xs = [jnp.zeros((1,) + s[1:], jnp.float32) for s in s_all]
    variables = Connector(s_all, t_all).init(rng, xs, False)
    return {"params": {"connector": variables.get("params", {})},
            "batch_stats": {"connector": variables.get("batch_stats", {})}}

  def init_loss(aux_params, aux_state, feats_s: Features, feats_t: Features, batch,
                train: bool):
    s_all, t_all = shapes(feats_s, feats_t)
    mask = batch.get("mask") if batch else None
    connector = Connector(s_all, t_all)
    variables = {"params": aux_params["connector"],
                 "batch_stats": aux_state["batch_stats"]["connector"]}
    if train:
      g_s, updated = connector.apply(variables, feats_s.stages_preact, True, mask,
                                     mutable=["batch_stats"])
      new_state = {"batch_stats": {"connector": updated.get("batch_stats", {})}}
    else:
      g_s, new_state = connector.apply(variables, feats_s.stages_preact, False), aux_state
    g_t = [jax.lax.stop_gradient(t) for t in feats_t.stages_preact]
    per_layer = ab_losses(g_s, g_t, margin, mask)
    total = sum(per_layer, jnp.zeros((), jnp.float32))
    metrics = {f"abound_{i}": v for i, v in enumerate(per_layer)}
    metrics["abound"] = total
    return total, metrics, new_state

  def loss(aux_params, aux_state, feats_s: Features, feats_t: Features, batch, train: bool):
    # helper/loops.py: loss_kd = 0 during the main stage of abound.
    del aux_params, feats_s, feats_t, batch, train
    return jnp.zeros((), jnp.float32), {}, aux_state

  pretrain = PretrainStage(epochs=init_epochs, train_student=True, loss=init_loss,
                           trainable=("connector",))
  return Method(name="abound", init=init, loss=loss, pretrain=pretrain,
                default_weights=DEFAULT_WEIGHTS, frozen_aux=("connector",))
