"""Training metrics to the log and to TensorBoard event files, without TensorFlow.

clu's metric writers (the flax examples' choice) write their event files through
TensorFlow, whose import costs 3-5 s of every training start and which the GPU
and TPU images need not have. The events here are the same (scalars as tensor
summaries of the "scalars" plugin, as `tf.summary.scalar` writes them; the
HParams dashboard's record), built from tensorboard's protocol buffers and
framed by its RecordWriter: tensorboard's own file writer goes through
`tf.io.gfile`, which imports TensorFlow where it is installed.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util


class MetricWriter:
  """Logs every write ("[step] name=value, ..."); the main process also writes
  a TensorBoard event file to LOGDIR (None: log only)."""

  def __init__(self, logdir: str | None):
    self._records = None
    if logdir:
      name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.0"
      self._records = RecordWriter(open(os.path.join(logdir, name), "wb"))
      self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))
    if self._records:
      summary = summary_pb2.Summary()
      for name, value in scalars.items():
        summary.value.add(
            tag=name,
            tensor=tensor_util.make_tensor_proto(np.float32(value)),
            metadata=scalar_metadata.create_summary_metadata(display_name=name, description=""),
        )
      self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
      self._records.flush()  # Once per logging interval: TensorBoard sees it live.

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The flattened config, for TensorBoard's HParams dashboard (values that
    are not numbers, strings or booleans as their text)."""
    values = {
        k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()
    }
    logging.info("[Hyperparameters] %s", values)
    if self._records:
      summary = hparams_summary.hparams_pb(values)
      self._write(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

  def close(self) -> None:
    if self._records:
      self._records.close()
      self._records = None


class Progress:
  """steps/s over each logging interval, and the log line with the ETA that
  clu's ReportProgress gave."""

  def __init__(self, num_steps: int, start_step: int):
    self.num_steps = num_steps
    self.started = time.time()
    self._mark = (start_step, self.started)

  def scalars(self, step: int) -> dict[str, float]:
    last_step, last_time = self._mark
    now = time.time()
    steps_per_s = (step - last_step) / max(now - last_time, 1e-9)
    self._mark = (step, now)
    eta_s = (self.num_steps - step) / max(steps_per_s, 1e-9)
    logging.info(
        "%.1f steps/s, %.1f%% (%d/%d), ETA: %dm",
        steps_per_s,
        100 * step / self.num_steps,
        step,
        self.num_steps,
        eta_s // 60,
    )
    return {"steps_per_sec": steps_per_s, "uptime": now - self.started}


class Profile:
  """A jax.profiler trace of NUM_STEPS steps from step FIRST, into LOGDIR
  (TensorBoard's profile plugin reads it)."""

  def __init__(self, num_steps: int, first: int, logdir: str):
    self.first, self.last, self.logdir = first, first + num_steps, logdir
    self.active = False

  def __call__(self, step: int) -> None:
    if step == self.first and self.last > self.first and not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif step >= self.last and self.active:
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
