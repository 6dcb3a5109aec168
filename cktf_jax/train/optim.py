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

from typing import Callable, Sequence, Tuple

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


def _is_frozen(path, frozen) -> bool:
  names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return any(names[:len(f)] == f for f in frozen)


def distillation_optimizer(learning_rate, params, frozen_aux: Sequence[str] = (),
                           momentum: float = 0.9, weight_decay: float = 5e-4,
                           nesterov: bool = False,
                           frozen_student: Sequence[str] = ()) -> optax.GradientTransformation:
  """``torch_sgd`` over ``params = {'student': ..., 'aux': ...}``, except the aux
  entries named in ``frozen_aux`` (``Method.frozen_aux``) and the student's
  top-level entries named in ``frozen_student``, which get no update and no
  weight decay: they are outside the reference's ``trainable_list``.

  An entry of ``frozen_aux`` is a top-level name of ``params['aux']``
  (``'connector'``) or a ``/``-separated path into it (``'method/connector'``
  when the aux params of two methods are nested, see ``step.METHOD_KEYS``);
  every leaf under it is frozen.
  """
  frozen_a = [tuple(f.split("/")) for f in frozen_aux]
  frozen_s = [(f,) for f in frozen_student]
  label = lambda frozen: (lambda path, _: "frozen" if _is_frozen(path, frozen) else "train")
  labels = {
      "student": jax.tree_util.tree_map_with_path(label(frozen_s), params["student"]),
      "aux": jax.tree_util.tree_map_with_path(label(frozen_a), params["aux"]),
  }
  return optax.multi_transform(
      {"train": torch_sgd(learning_rate, momentum, weight_decay, nesterov),
       "frozen": optax.set_to_zero()}, labels)


def classifier_names(student_params) -> Tuple[str, ...]:
  """The student's classifier entries: the top-level params holding a 2-D
  (``nn.Dense``) kernel (``fc``, ``linear``, ``classifier``, ``classifier.0``).
  Everything else is the reference's ``get_feat_modules()``."""
  return tuple(name for name, sub in student_params.items()
               if isinstance(sub, dict) and "kernel" in sub and len(sub["kernel"].shape) == 2)


def momentum_buffers(opt_state):
  """The SGD momentum buffers (torch's ``momentum_buffer``) inside an optimiser state."""
  return optax.tree_utils.tree_get(opt_state, "trace")
