"""Starting a student from another model's weights.

* ``copy_teacher_convs``: the reference's ``--init_flag`` (train_student.py):
  every student parameter whose name contains ``conv`` and that the teacher
  has under the same name takes the teacher's value.
* ``fine_tune_start``: ``train_teacher.py --fine_tune``: every variable of a
  trained model but its classifier (parameters and BatchNorm statistics),
  with the classifier freshly initialised for the new class count.

Our parameter paths are the reference's attribute names (``layer1.0/conv1/
kernel`` for ``layer1.0.conv1.weight``), so both rules apply to them as they
are; kernels are HWIO on both sides, so equal names mean equal layouts.
"""

from typing import Any, Dict, Tuple

import flax

from cktf_jax.config import ConfigError
from cktf_jax.train.optim import classifier_names


def _flat(tree) -> Dict[Tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def copy_teacher_convs(student_params, teacher_params) -> Tuple[Any, Tuple[str, ...]]:
  """``(params, copied)``: ``student_params`` with every ``conv`` parameter the
  teacher has under the same path replaced by the teacher's; ``copied`` lists
  the paths. A same-named parameter of another shape is an error (the
  reference asserts equal shapes)."""
  student, teacher = _flat(student_params), _flat(teacher_params)
  copied = []
  for path, value in student.items():
    name = "/".join(path)
    if "conv" not in name or path not in teacher:
      continue
    if teacher[path].shape != value.shape:
      raise ConfigError(
          f"config.student.init_from_teacher: student parameter {name} has shape "
          f"{tuple(value.shape)} but the teacher's has {tuple(teacher[path].shape)}; only "
          f"pairs whose same-named convolutions agree (e.g. resnet110 -> resnet56) can be "
          f"initialised from the teacher")
    student[path] = teacher[path]
    copied.append(name)
  return flax.traverse_util.unflatten_dict(student), tuple(copied)


def fine_tune_start(fresh_variables, trained_variables, where: str):
  """``fresh_variables`` (a new model with the target class count) with every
  entry of ``trained_variables`` copied in but the classifier's
  (``optim.classifier_names``). ``where`` names the source in errors."""
  head = set(classifier_names(fresh_variables["params"]))
  fresh, trained = _flat(fresh_variables), _flat(trained_variables)
  missing = sorted("/".join(p) for p in fresh if p[1] not in head and p not in trained)
  if missing:
    raise ConfigError(f"{where} does not hold the variables of this model: missing "
                      f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
  for path in fresh:
    if path[1] in head:
      continue
    if trained[path].shape != fresh[path].shape:
      raise ConfigError(f"{where}: {'/'.join(path)} has shape {tuple(trained[path].shape)}, "
                        f"the model needs {tuple(fresh[path].shape)}")
    fresh[path] = trained[path]
  return flax.traverse_util.unflatten_dict(fresh)
