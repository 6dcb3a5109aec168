"""The reference's optimiser and learning-rate schedule.

SGD exactly as ``torch.optim.SGD(momentum, weight_decay, nesterov)`` applies it
(dampening 0): weight decay is added to the gradient *before* momentum,

    d_t = g_t + wd * p_t;   buf_1 = d_1,  buf_t = m * buf_{t-1} + d_t
    p_{t+1} = p_t - lr_t * (d_t + m * buf_t if nesterov else buf_t)

on every trainable parameter (BatchNorm scales and biases and the methods'
embeds included). A learning-rate change does not rescale the buffer.

Schedule (``helper/util.py: adjust_learning_rate``, called before each epoch
``e = 1..E``): ``lr_e = lr0 * rate ** #{d in decay_epochs : e > d}``; epoch 150
of ``150,180,210`` still runs at ``lr0``.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def epoch_learning_rate(epoch: int, base_lr: float, decay_epochs: Sequence[int],
                        decay_rate: float) -> float:
  """The lr in effect during (1-based) ``epoch``, in float64 like the reference."""
  return base_lr * decay_rate ** int(np.sum(epoch > np.asarray(decay_epochs)))


def step_learning_rate_fn(base_lr: float, decay_epochs: Sequence[int], decay_rate: float,
                          steps_per_epoch: int) -> Callable:
  """``optax`` schedule: step ``s`` (0-based) belongs to epoch ``s // steps_per_epoch + 1``."""
  boundaries = jnp.asarray(decay_epochs, jnp.int32)

  def schedule(step):
    epoch = step // steps_per_epoch + 1
    return base_lr * decay_rate ** jnp.sum(epoch > boundaries)

  return schedule


def torch_sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 5e-4,
              nesterov: bool = False) -> optax.GradientTransformation:
  """``torch.optim.SGD`` semantics: coupled weight decay, then (Nesterov) momentum."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )


def distillation_optimizer(learning_rate, params, frozen_aux: Sequence[str] = (),
                           momentum: float = 0.9, weight_decay: float = 5e-4,
                           nesterov: bool = False) -> optax.GradientTransformation:
  """``torch_sgd`` over ``params = {'student': ..., 'aux': ...}``, except the aux
  entries named in ``frozen_aux`` (``Method.frozen_aux``), which get no update
  and no weight decay: they are outside the reference's ``trainable_list``."""
  labels = {
      "student": jax.tree_util.tree_map(lambda _: "train", params["student"]),
      "aux": {name: jax.tree_util.tree_map(lambda _, n=name: "frozen" if n in frozen_aux
                                           else "train", sub)
              for name, sub in params["aux"].items()},
  }
  return optax.multi_transform(
      {"train": torch_sgd(learning_rate, momentum, weight_decay, nesterov),
       "frozen": optax.set_to_zero()}, labels)


def momentum_buffers(opt_state):
  """The SGD momentum buffers (torch's ``momentum_buffer``) inside an optimiser state."""
  return optax.tree_utils.tree_get(opt_state, "trace")
