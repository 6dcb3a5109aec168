"""``config.profile``: a ``jax.profiler`` trace of chosen train steps.

The trace goes to ``WORKDIR/profile`` (``plugins/profile/<run>/*.xplane.pb``
for TensorBoard's profile plugin, plus ``perfetto_trace.json.gz`` for Perfetto):
``tensorboard --logdir WORKDIR/profile``, or open the json.gz at
https://ui.perfetto.dev.
"""

import os

import jax

PROFILE = "profile"


class StepTrace:
  """Traces the 1-based global steps ``[first, first + count)``; ``first=0``: off."""

  def __init__(self, first: int, count: int, workdir: str, steps_per_call: int = 1):
    self.first, self.last = first, first + count - 1
    self.steps_per_call = steps_per_call
    self.directory = os.path.join(workdir, PROFILE)
    self.active = self.started = False

  def before_step(self, step: int) -> None:
    """Called before the host call whose first step is ``step`` (with several
    steps per call the trace starts at the call holding ``first``)."""
    if self.first and not self.started and step >= self.first - self.steps_per_call + 1:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = self.started = True

  def after_step(self, step: int, outputs) -> None:
    """Called after the host call whose last step is ``step``."""
    if self.active and step >= self.last:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    """End the trace (after ``outputs`` are computed) if one is running."""
    if not self.active:
      return
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active = False
    print(f"profile of steps {self.first}-{self.last} written to {self.directory} "
          f"(view: tensorboard --logdir {self.directory})")
