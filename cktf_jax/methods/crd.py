"""CRD: contrastive representation distillation on the penultimate features.

Tian et al., ICLR 2020; reference ``helper/loops.py`` (``--distill crd``):
``loss_kd = criterion_kd(feat_s[-1], feat_t[-1], index, contrast_idx)`` with
``criterion_kd = CRDLoss(opt)``, i.e. one ``cktf_jax.contrast.CRDHead`` on
``Features.pooled``. Scripts weight it ``-r 1 -a 0 -b 0.8``.

Hyper-parameters (``create_method('crd', hparams)``; a dict or ConfigDict):

* ``n_data`` (int) -- training-set size (memory rows); defaults to
  ``len(labels)``. Required one way or the other.
* ``labels`` -- host array ``[n_data]`` of the training labels (dataset row
  order), needed by class-aware on-device sampling (cifar100, tiny-imagenet,
  imagenet); not needed for stl10 or when ``sampling='batch'``. The sampler
  turns it into class tables that live, replicated, in the aux state
  (collection ``'crd_sampler'``) with the sampler's key and walk, so the loss
  stays a pure function of its arguments and nothing large is baked into the
  program.
* ``dataset`` (``'cifar100'``) -- sampling policy, see ``contrast/sampling.py``.
* ``mode`` (``'exact'``) -- ``'exact'`` | ``'relax'`` positives (reference ``--mode``).
* ``feat_dim`` (128), ``head`` (``'linear'`` | ``'mlp'`` | ``'pad'``),
  ``nce_k`` (16384), ``nce_t`` (0.07), ``nce_m`` (0.5) -- reference flags.
* ``sampling`` (``'device'``) -- ``'device'``: negatives drawn in the step
  from the state's key; ``'batch'``: the batch must carry ``contrast_idx``
  (``needs_contrast_idx``). A batch's ``contrast_idx`` is used whenever present
  (replaying the reference).
* ``bank_dtype`` (``'float32'`` | ``'bfloat16'``), ``scoring`` (``'auto'`` |
  ``'gather'`` | ``'dense'``), ``mesh`` (a ``jax.sharding.Mesh``; default: all
  devices), ``mesh_axis`` (``'data'``) -- bank storage and row sharding.

Aux variables from ``init``: ``{'params': {'embed_s', 'embed_t'}, 'contrast':
{'memory_v1', 'memory_v2', 'z_v1', 'z_v2'}, 'crd_sampler': sampler.init_state(..)}``.
The banks are row-sharded over ``mesh_axis``; keep their sharding when placing
the train state. ``loss(..., train=False)`` scores without updating anything.
Metrics: ``crd`` (the loss), ``crd_s``, ``crd_t`` (its two NCE terms).

``ContrastSetup`` is the hparams-to-parts step, public so CKTF (one CRD head
per layer pair, one ``contrast_idx`` per batch shared by all heads) reuses it.
"""

import dataclasses
import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cktf_jax.contrast.crd import HEADS, CRDHead
from cktf_jax.contrast.memory import ContrastMemory, default_mesh
from cktf_jax.contrast.sampling import DEFAULT_NCE_K, NegativeSampler, build_sampler
from cktf_jax.methods.base import Method, MethodShapeError, register_method

NAME = "crd"
SAMPLER_COLLECTION = "crd_sampler"
DEFAULTS = dict(feat_dim=128, head="linear", nce_k=DEFAULT_NCE_K, nce_t=0.07, nce_m=0.5,
                dataset="cifar100", mode="exact", sampling="device", bank_dtype="float32",
                scoring="auto", mesh=None, mesh_axis="data", n_data=None, labels=None)


def _feature_dim(x) -> int:
  return int(np.prod(x.shape[1:]))


@dataclasses.dataclass(frozen=True)
class ContrastSetup:
  """What the CRD hyper-parameters describe, reusable by CKTF (one
  ``memory`` description shared by its heads, one sampler per batch):

  * ``head_for(s_dim, t_dim)`` -> a ``CRDHead`` (each has its own banks);
  * ``init_sampler_state(rng)`` -> the ``'crd_sampler'`` collection (or None);
  * ``contrast_indices(sampler_state, batch, train)`` -> ``(contrast_idx,
    new_sampler_state)``: the batch's ``contrast_idx`` when present, else
    fresh on-device negatives.
  """

  memory: ContrastMemory
  sampler: Optional[NegativeSampler]
  head: str
  nce_k: int

  @classmethod
  def from_hparams(cls, hparams: Mapping[str, Any]) -> "ContrastSetup":
    hp = dict(DEFAULTS)
    hp.update({k: v for k, v in dict(hparams).items() if k in DEFAULTS})
    if hp["sampling"] not in ("device", "batch"):
      raise ValueError(f"crd: sampling {hp['sampling']!r} is not 'device' or 'batch'")
    if hp["head"] not in HEADS:
      raise ValueError(f"crd: unknown CRD head {hp['head']!r}; valid heads are: {', '.join(HEADS)}")
    labels, n_data = hp["labels"], hp["n_data"]
    if n_data is None and labels is not None:
      n_data = int(np.asarray(labels).shape[0])
    if n_data is None:
      raise ValueError("crd needs hparams['n_data'] (training-set size) or hparams['labels']")
    n_data, nce_k = int(n_data), int(hp["nce_k"])
    mesh = hp["mesh"] if hp["mesh"] is not None else default_mesh(hp["mesh_axis"])
    memory = ContrastMemory(n_data=n_data, feat_dim=int(hp["feat_dim"]),
                            nce_t=float(hp["nce_t"]), nce_m=float(hp["nce_m"]),
                            dtype=hp["bank_dtype"], mesh=mesh, axis=hp["mesh_axis"],
                            scoring=hp["scoring"])
    sampler = None
    if hp["sampling"] == "device":
      sampler = build_sampler(n_data=n_data, nce_k=nce_k, mode=hp["mode"], labels=labels,
                              dataset=hp["dataset"])
    return cls(memory=memory, sampler=sampler, head=hp["head"], nce_k=nce_k)

  def head_for(self, s_dim: int, t_dim: int, what: str = NAME) -> CRDHead:
    return _head_for(self, int(s_dim), int(t_dim), what)

  def init_sampler_state(self, rng) -> Optional[Dict[str, Any]]:
    if self.sampler is None:
      return None
    return jax.device_put(self.sampler.init_state(rng), NamedSharding(self.memory.mesh, P()))

  def contrast_indices(self, sampler_state, batch, train: bool
                       ) -> Tuple[jax.Array, Optional[Dict[str, Any]]]:
    k1 = self.nce_k + 1
    if "contrast_idx" in batch:
      contrast_idx = jnp.asarray(batch["contrast_idx"])
      if contrast_idx.ndim != 2 or contrast_idx.shape[1] != k1:
        raise ValueError(f"crd: batch['contrast_idx'] has shape {tuple(contrast_idx.shape)}, "
                         f"expected [B, nce_k + 1 = {k1}]")
      return contrast_idx, sampler_state
    if self.sampler is None:
      raise ValueError(f"crd with sampling='batch' needs batch['contrast_idx'] [B, nce_k + 1 = {k1}]")
    contrast_idx, advanced = self.sampler.sample(sampler_state, jnp.asarray(batch["index"]))
    return contrast_idx, (advanced if train else sampler_state)


@functools.lru_cache(maxsize=None)
def _head_for(setup: ContrastSetup, s_dim: int, t_dim: int, what: str) -> CRDHead:
  try:
    return CRDHead(s_dim, t_dim, setup.memory, setup.head)
  except ValueError as e:
    raise MethodShapeError(f"{what}: student dim {s_dim}, teacher dim {t_dim}, "
                           f"feat_dim {setup.memory.feat_dim}: {e}") from None


@register_method(NAME)
def make_crd(hparams: Mapping[str, Any]) -> Method:
  setup = ContrastSetup.from_hparams(hparams)

  def head_of(feats_s, feats_t) -> CRDHead:
    return setup.head_for(_feature_dim(feats_s.pooled), _feature_dim(feats_t.pooled))

  def init(rng, feats_s, feats_t):
    head = head_of(feats_s, feats_t)
    k_head, k_sample = jax.random.split(rng)
    params, bank = head.init(k_head)
    variables = {"params": params, "contrast": bank}
    sampler_state = setup.init_sampler_state(k_sample)
    if sampler_state is not None:
      variables[SAMPLER_COLLECTION] = sampler_state
    return variables

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    head = head_of(feats_s, feats_t)
    new_state = dict(aux_state)
    contrast_idx, sampler_state = setup.contrast_indices(
        aux_state.get(SAMPLER_COLLECTION), batch, train)
    if sampler_state is not None:
      new_state[SAMPLER_COLLECTION] = sampler_state
    value, aux, bank = head.apply(aux_params, aux_state["contrast"], feats_s.pooled,
                                  feats_t.pooled, batch["index"], contrast_idx,
                                  batch.get("mask"), train)
    new_state["contrast"] = bank
    metrics = {"crd": value, "crd_s": aux["s_loss"], "crd_t": aux["t_loss"]}
    return value, metrics, new_state

  return Method(name=NAME, init=init, loss=loss, default_weights=(1.0, 0.0, 0.8),
                needs_contrast_idx=setup.sampler is None)
