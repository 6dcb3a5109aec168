"""Contrastive distillation machinery shared by CRD and CKTF.

* ``memory``: ``ContrastMemory``, the row-sharded pair of memory banks
  (scoring with both cost-model paths, Z constants, momentum update).
* ``sampling``: ``build_sampler`` / ``NegativeSampler``, on-device negatives
  with the reference datasets' semantics.
* ``crd``: embedding heads, ``contrast_loss`` (NCE) and ``CRDHead``, one
  reference ``CRDLoss`` that CKTF instantiates once per layer pair.
"""

from cktf_jax.contrast.crd import (HEADS, CRDEmbed, CRDHead, Embed, EmbedMLP, EmbedPad,
                                   contrast_loss, l2_normalize_no_eps, make_embed)
from cktf_jax.contrast.memory import (Z_UNSET, BankState, ContrastMemory, choose_scoring,
                                      default_mesh, single_device_mesh)
from cktf_jax.contrast.sampling import (DATASET_POLICIES, NegativeSampler, build_sampler)

__all__ = ["HEADS", "CRDEmbed", "CRDHead", "Embed", "EmbedMLP", "EmbedPad", "contrast_loss",
           "l2_normalize_no_eps", "make_embed", "Z_UNSET", "BankState", "ContrastMemory",
           "choose_scoring", "default_mesh", "single_device_mesh", "DATASET_POLICIES",
           "NegativeSampler", "build_sampler"]
