"""FSP (``--distill fsp``): flow-of-solution-procedure matrices, trained only in
the init stage.

Reference ``train_student.py`` / ``helper/pretrain.py`` / ``helper/loops.py``:

* init stage (``init_epochs``, default 30): ``sum(FSP(feat_s[:-1], feat_t[:-1]))``
  over the stem and every stage; trains the student's feature modules
  (everything but its classifier). No auxiliary parameters.
* main stage: ``loss_kd = 0``.

Student and teacher must have the same number of maps and the same channels
map by map (the reference's ``FSP.__init__`` raises otherwise).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from cktf_jax.losses.fsp import fsp_losses
from cktf_jax.losses.at import pooled_spatial_shapes
from cktf_jax.methods.base import Method, MethodShapeError, PretrainStage, register_method
from cktf_jax.models.features import Features

# scripts/run_tiny-imagenet_distill.sh: `--distill fsp -r 1.0 -a 0 -b 50`
# (beta multiplies the main stage's loss_kd, which is 0 for FSP).
DEFAULT_WEIGHTS = (1.0, 0.0, 50.0)


def _maps(feats: Features):
  return feats.as_reference_list()[:-1]  # reference feat[:-1]: stem and stages


@register_method("fsp")
def fsp_method(hparams: Mapping[str, Any]) -> Method:
  """``hparams``: ``init_epochs`` (default 30)."""
  init_epochs = int(hparams.get("init_epochs", 30))

  def check(feats_s: Features, feats_t: Features):
    s_all = [tuple(f.shape) for f in _maps(feats_s)]
    t_all = [tuple(f.shape) for f in _maps(feats_t)]
    if len(s_all) != len(t_all):
      raise MethodShapeError(
          f"fsp compares the student's and the teacher's feat[:-1] (stem and stages) one "
          f"to one; got {len(s_all)} student maps {s_all} and {len(t_all)} teacher maps "
          f"{t_all} (NHWC); use a teacher/student pair with the same number of stages")
    if [s[-1] for s in s_all] != [t[-1] for t in t_all]:
      raise MethodShapeError(
          f"fsp needs equal channels map by map; got student channels "
          f"{[s[-1] for s in s_all]} and teacher channels {[t[-1] for t in t_all]} "
          f"(shapes NHWC {s_all} vs {t_all}); use a pair of the same family and width "
          f"(e.g. resnet110/resnet20, wrn_40_2/wrn_16_2)")
    for who, all_shapes in (("student", s_all), ("teacher", t_all)):
      for i, (bot, top) in enumerate(zip(all_shapes[:-1], all_shapes[1:])):
        b_hw, t_hw = pooled_spatial_shapes(bot, top)
        if len(bot) != 4 or bot[0] != s_all[0][0] or b_hw != t_hw:
          raise MethodShapeError(
              f"fsp: the {who}'s maps {i} {bot} and {i + 1} {top} (NHWC) cannot form an "
              f"FSP matrix; it needs square [N, H, W, C] maps of one batch")

  def init(rng, feats_s: Features, feats_t: Features):
    del rng
    check(feats_s, feats_t)
    return {}

  def init_loss(aux_params, aux_state, feats_s: Features, feats_t: Features, batch,
                train: bool):
    del aux_params, train
    check(feats_s, feats_t)
    mask = batch.get("mask") if batch else None
    g_t = [jax.lax.stop_gradient(t) for t in _maps(feats_t)]
    per_pair = fsp_losses(_maps(feats_s), g_t, mask)
    total = sum(per_pair, jnp.zeros((), jnp.float32))
    metrics = {f"fsp_{i}": v for i, v in enumerate(per_pair)}
    metrics["fsp"] = total
    return total, metrics, aux_state

  def loss(aux_params, aux_state, feats_s: Features, feats_t: Features, batch, train: bool):
    # helper/loops.py: loss_kd = 0 during the main stage of fsp.
    del aux_params, feats_s, feats_t, batch, train
    return jnp.zeros((), jnp.float32), {}, aux_state

  pretrain = PretrainStage(epochs=init_epochs, train_student=True, loss=init_loss,
                           trainable=())
  return Method(name="fsp", init=init, loss=loss, pretrain=pretrain,
                default_weights=DEFAULT_WEIGHTS)
