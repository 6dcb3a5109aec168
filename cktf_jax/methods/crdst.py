"""CKTF (``--distill crdst``): one CRD head per student/teacher layer pair.

Zhao, Chen, Kong, Fang, "A Contrastive Knowledge Transfer Framework for Model
Compression and Transfer Learning", ICASSP 2023. Reference:
``helper/loops.py: train_distill`` (``distill == 'crdst'``), the construction
in ``train_student.py`` and ``distiller_zoo/ST.py: SimilarityTransfer``.

With ``L`` stages the method builds ``L + 2`` CRD heads (``cktf_jax.contrast.
CRDHead``, each the reference's ``CRDLoss`` with its OWN embeds, memory banks
and Z constants) on the pairs of ``contrast.pairing.cktf_pairs``::

    head 0        stems (f0), each pooled by its model's own pooling
    heads 1..L    the SimilarityTransfer stage pairs (``st_method``)
    head L+1      the pooled classifier inputs (plain CRD)

All heads score the same batch rows: ``index`` and one ``contrast_idx`` per
batch (the batch's own when it carries one, else drawn once on device and
shared). The reference's objective is::

    loss = gamma * CE + alpha * KD + beta * crd_final + theta * sum(crd_0 .. crd_L)

(``crd_final`` = head L+1, the reference's ``loss_kd_crd``; the sum is its
``loss_kd_crdSt``). The train step multiplies the method loss by ``beta``, so
this method returns::

    method_loss = crd_final + (theta / beta) * sum(crd_0 .. crd_L)

which needs ``beta > 0`` (``ValueError`` at construction otherwise; the
reference's ``beta = 0`` objective, CE + KD + theta * intermediate heads, is
not expressible while the step owns the ``beta`` factor). ``beta``
must be the EFFECTIVE weight the step uses; the train loop passes it as
``hparams['beta']``.

The scripts' weights (``-r 1 -a 0 -b 0.8 --theta 0.1``) are the defaults;
"CKTF + KD" is the same method with ``alpha = 1`` (config ``weights.alpha``).

Hyper-parameters (``create_method('crdst', hparams)``, a dict or ConfigDict):

* ``model_s`` (required), ``model_t`` -- model names; they pick the pooling of
  the pairs (``pairing.pool_kind_for_model``: ``resnet*``/``wrn*`` 8x8
  average pooling, ``ResNet*``/``vgg*`` global pooling; MobileNetV2 and
  ShuffleNets are not supported, as in the reference). ``model_t`` defaults to
  ``model_s``'s rule (it only pools the teacher stem).
* ``st_method`` (``'Last'``) -- ``Last`` | ``Smallest`` | ``Largest`` |
  ``First`` | ``Random`` (reference ``--st_method``; note train_student.py's
  own default is ``Smallest``, the scripts pass it explicitly).
* ``theta`` (0.1), ``beta`` (0.8) -- see above.
* ``st_scale`` (None) -- when set, the factor of the intermediate heads'
  sum instead of ``theta / beta`` (``beta`` is then not needed):
  ``method_loss = crd_final + st_scale * sum(crd_0 .. crd_L)``. ``1.0`` is
  the reference's ``--distill2 crdst`` term, ``loss_kd_crdSt + loss_kd_crd``
  unweighted (then multiplied by ``kd2weights``; config ``method2.st_scale``).
* ``feat_dim`` (128), ``nce_k`` (16384), ``nce_t`` (0.1: the reference's
  CIFAR-100 value; it uses 0.07 for Tiny-ImageNet/STL-10), ``nce_m`` (0.5),
  ``head`` (``'linear'``), and every other ``ContrastSetup`` field (``labels``,
  ``n_data``, ``dataset``, ``mode``, ``sampling``, ``bank_dtype``,
  ``scoring``, ``mesh``, ``mesh_axis``), see ``methods/crd.py``.

Head sizes follow ``pairing.crdst_embed_dims`` (what train_student.py builds);
``init`` raises ``MethodShapeError`` naming the models and shapes when the
pairs cannot feed them.

Aux variables from ``init``: ``{'params': {'crd_<i>': {'embed_s', 'embed_t'}},
'contrast': {'crd_<i>': bank}, 'crd_sampler': ... (on-device sampling),
'crdst_rng': {'key'} (``Random`` only)}``. The banks are row-sharded over
``mesh_axis``.

Metrics (unweighted): ``crd_<i>`` (each head's loss), ``crd_<i>_s`` /
``crd_<i>_t`` (its two NCE terms), ``crd_final`` (= ``crd_<L+1>``),
``crd_st_sum`` (heads 0..L), ``st_choice_<stage>`` (the selected teacher
block of each stage, as a float).
"""

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cktf_jax.contrast import pairing
from cktf_jax.contrast.sampling import raw_key
from cktf_jax.methods.base import Method, MethodShapeError, register_method
from cktf_jax.methods.crd import SAMPLER_COLLECTION, ContrastSetup
from cktf_jax.models.features import Features

NAME = "crdst"
CONTRAST_COLLECTION = "contrast"
RNG_COLLECTION = "crdst_rng"
DEFAULT_WEIGHTS = (1.0, 0.0, 0.8)  # scripts: -r 1 -a 0 -b 0.8 (theta 0.1)
DEFAULTS = dict(st_method="Last", theta=0.1, beta=DEFAULT_WEIGHTS[2], feat_dim=128,
                nce_t=0.1, nce_m=0.5, head="linear", model_s=None, model_t=None,
                st_scale=None)


def head_name(i: int) -> str:
  """The aux key of head ``i`` (the reference's ``criterion_kd[i + 1]``)."""
  return f"crd_{i}"


def _describe(feats: Features) -> str:
  return (f"stem {tuple(feats.stem.shape)}, stage blocks "
          f"{[[tuple(b.shape) for b in stage] for stage in feats.blocks]}, pooled "
          f"{tuple(feats.pooled.shape)}")


@register_method(NAME)
def make_crdst(hparams: Mapping[str, Any]) -> Method:
  hp = dict(DEFAULTS)
  hp.update({k: v for k, v in dict(hparams).items() if v is not None or k not in DEFAULTS})
  st_method = str(hp["st_method"])
  if st_method not in pairing.ST_METHODS:
    raise ValueError(f"crdst: unknown st_method {st_method!r}; valid: "
                     f"{', '.join(pairing.ST_METHODS)}")
  theta, beta = float(hp["theta"]), float(hp["beta"])
  if hp["st_scale"] is None and not beta > 0.0:
    raise ValueError(
        f"crdst needs beta > 0 (got {beta}): the train step weights the method loss by beta, "
        "and CKTF returns crd_final + (theta / beta) * sum(intermediate heads), so beta = 0 "
        "would also drop the theta-weighted heads. Set weights.beta > 0.")
  if not hp["model_s"]:
    raise ValueError("crdst needs hparams['model_s'] (the student's model name): it picks "
                     "the pooling of the layer pairs (see contrast.pairing.pool_kind_for_model)")
  model_s, model_t = str(hp["model_s"]), hp["model_t"]
  pool_s = pairing.pool_kind_for_model(model_s)
  pool_t = pairing.pool_kind_for_model(str(model_t)) if model_t else pool_s
  model_t = str(model_t) if model_t else "(teacher)"
  st_scale = theta / beta if hp["st_scale"] is None else float(hp["st_scale"])
  setup = ContrastSetup.from_hparams(hp)

  def heads_of(feats_s: Features, feats_t: Features):
    try:
      dims = pairing.crdst_embed_dims(feats_s, feats_t, pool_s, pool_t)
    except ValueError as e:
      raise MethodShapeError(
          f"crdst ({model_s} -> {model_t}): {e} [student: {_describe(feats_s)}; "
          f"teacher: {_describe(feats_t)}]") from None
    return tuple(setup.head_for(s, t, what=f"crdst head {i} ({model_s} -> {model_t})")
                 for i, (s, t) in enumerate(dims))

  def init(rng, feats_s: Features, feats_t: Features):
    heads = heads_of(feats_s, feats_t)
    k_heads, k_sample, k_st = jax.random.split(rng, 3)
    params, banks = {}, {}
    for i, (head, key) in enumerate(zip(heads, jax.random.split(k_heads, len(heads)))):
      params[head_name(i)], banks[head_name(i)] = head.init(key)
    variables: Dict[str, Any] = {"params": params, CONTRAST_COLLECTION: banks}
    sampler_state = setup.init_sampler_state(k_sample)
    if sampler_state is not None:
      variables[SAMPLER_COLLECTION] = sampler_state
    if st_method == "Random":
      variables[RNG_COLLECTION] = jax.device_put(
          {"key": raw_key(k_st)}, setup.memory.replicated)
    return variables

  def pairs_of(feats_s, feats_t, key, mask) -> Tuple[Tuple[Any, ...], Tuple[Any, ...]]:
    # The order of pairing.cktf_pairs (stem, stages, pooled), keeping the
    # stage selections for the metrics.
    stages = pairing.similarity_transfer(feats_s.blocks, feats_t.blocks, st_method, pool_s,
                                         key=key, mask=mask)
    stem = (pairing.pool_and_flatten(feats_s.stem, pool_s),
            pairing.pool_and_flatten(feats_t.stem, pool_t))
    return (stem, *stages.pairs, (feats_s.pooled, feats_t.pooled)), stages.keys

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    heads = heads_of(feats_s, feats_t)
    new_state = dict(aux_state)
    contrast_idx, sampler_state = setup.contrast_indices(
        aux_state.get(SAMPLER_COLLECTION), batch, train)
    if sampler_state is not None:
      new_state[SAMPLER_COLLECTION] = sampler_state
    st_key = None
    if st_method == "Random":
      key, st_key = jax.random.split(aux_state[RNG_COLLECTION]["key"])
      if train:
        new_state[RNG_COLLECTION] = {"key": key}
    mask = batch.get("mask")
    pairs, choices = pairs_of(feats_s, feats_t, st_key, mask)

    metrics, banks, values = {}, {}, []
    for i, (head, (f_s, f_t)) in enumerate(zip(heads, pairs)):
      name = head_name(i)
      value, aux, banks[name] = head.apply(
          aux_params[name], aux_state[CONTRAST_COLLECTION][name], f_s, f_t, batch["index"],
          contrast_idx, mask, train)
      values.append(value)
      metrics.update({name: value, f"{name}_s": aux["s_loss"], f"{name}_t": aux["t_loss"]})
    new_state[CONTRAST_COLLECTION] = banks
    st_sum = sum(values[:-1])  # the reference's python sum, head 0 first
    crd_final = values[-1]
    metrics.update(crd_final=crd_final, crd_st_sum=st_sum)
    metrics.update({f"st_choice_{i}": k.astype(jnp.float32) for i, k in enumerate(choices)})
    return crd_final + np.float32(st_scale) * st_sum, metrics, new_state

  return Method(name=NAME, init=init, loss=loss, default_weights=DEFAULT_WEIGHTS,
                needs_contrast_idx=setup.sampler is None)
