"""Training and evaluation of MobileNetV2.

One jit-compiled train step runs over a `jax.sharding.Mesh` with a single
"data" axis: the global batch is split across all devices of all hosts, the
TrainState is replicated, and XLA reduces gradients and BatchNorm statistics
over the global batch. The same code runs on 1 CPU, N GPUs or a TPU slice.

Neither this module nor the training loop imports TensorFlow (the GPU/TPU
images need not have it): metrics go to TensorBoard through
`mnv2_flax.metric_writer`.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import struct
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnv2_flax import checkpoint, config_lib, data, datasets, errors, metric_writer, models

Metrics = dict[str, jax.Array]
PixelStats = tuple[np.ndarray, np.ndarray]  # (mean, std) per channel, 0..255 units, float32.


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  ema_params: Any = None  # An EMA of `params` when optimizer.ema_decay > 0.
  ema_decay: float = struct.field(pytree_node=False, default=0.0)

  def eval_variables(self) -> dict[str, Any]:
    params = self.params if self.ema_params is None else self.ema_params
    return {"params": params, "batch_stats": self.batch_stats}


# --- optimisation ----------------------------------------------------------------


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_steps: int
) -> optax.Schedule:
  """Warmup, then cosine / exponential (x decay_rate per decay_epochs) / constant."""
  o = config.optimizer
  warmup = int(o.warmup_epochs * steps_per_epoch)
  if o.schedule == "cosine":
    main = optax.cosine_decay_schedule(o.learning_rate, max(num_steps - warmup, 1))
  elif o.schedule == "exponential":
    main = optax.exponential_decay(
        o.learning_rate,
        int(o.decay_epochs * steps_per_epoch),
        o.decay_rate,
        staircase=True,
    )
  else:
    main = optax.constant_schedule(o.learning_rate)
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, o.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def weight_decay_mask(params: Any, mode: str) -> Any:
  """True for the leaves that get weight decay (see optimizer.weight_decay_mask)."""

  def decays(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    if mode == "all":
      return True
    if names[-1] != "kernel":
      return False
    return not (mode == "kernels_except_depthwise" and "depthwise" in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(
    config: ml_collections.ConfigDict, lr_fn: optax.Schedule
) -> optax.GradientTransformation:
  o = config.optimizer
  if o.name == "rmsprop":
    # TensorFlow's RMSProp: eps inside the sqrt, accumulator starts at 1.
    opt = optax.rmsprop(
        lr_fn,
        decay=o.rmsprop_decay,
        eps=o.rmsprop_eps,
        initial_scale=1.0,
        eps_in_sqrt=True,
        momentum=o.momentum,
    )
  else:
    opt = optax.sgd(lr_fn, momentum=o.momentum, nesterov=o.nesterov)
  decay = optax.add_decayed_weights(
      o.weight_decay, functools.partial(weight_decay_mask, mode=o.weight_decay_mask)
  )
  tx = optax.chain(decay, opt)
  f = config.finetune
  if f.freeze == "none" and f.backbone_lr_multiplier == 1.0:
    return tx
  # Fine-tuning: the backbone (all but the classifier) frozen or slower.
  if f.freeze == "backbone":
    backbone = optax.set_to_zero()
  else:
    backbone = optax.chain(tx, optax.scale(f.backbone_lr_multiplier))
  return optax.multi_transform({"classifier": tx, "backbone": backbone}, parameter_groups)


def parameter_groups(params: Any) -> Any:
  """ "classifier" for the classifier's leaves, "backbone" for the others."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "classifier" if path[0].key == "classifier" else "backbone", params
  )


# --- steps -----------------------------------------------------------------------


def normalize_pixels(pixels: jax.Array, pixel_stats: PixelStats) -> jax.Array:
  """uint8 (..., C) -> float32 (x - mean) / std, bit for bit the float32
  expression numpy computes, on every backend: a lookup in the table of the
  256 values per channel. (XLA computes the division as a multiplication by
  the reciprocal: 1 ulp off for a fifth of the values; the lookup costs
  2.7 ms per 32 images at 224x224 on a 2-core CPU.)"""
  mean, std = pixel_stats
  table = (np.arange(256, dtype=np.float32)[:, None] - mean) / std
  return jnp.asarray(table)[pixels.astype(jnp.int32), jnp.arange(table.shape[1])]


def prepare_images(
    images: jax.Array, image_size: int, pixel_stats: PixelStats | None = None
) -> jax.Array:
  """The model's input: uint8 pixels normalised on the device with
  `pixel_stats` (`normalize_pixels`), then resized when the dataset's native
  size differs from the model's."""
  if images.dtype == jnp.uint8:
    if pixel_stats is None:
      raise ValueError("uint8 images need pixel_stats to be normalised")
    images = normalize_pixels(images, pixel_stats)
  if images.shape[1:3] == (image_size, image_size):
    return images
  shape = (images.shape[0], image_size, image_size, images.shape[3])
  return jax.image.resize(images, shape, "bilinear")


def classification_metrics(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Metrics:
  """Weighted sums of loss, top-1 and top-5 hits, and the example count."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  k = min(5, logits.shape[-1])
  top_k = jax.lax.top_k(logits, k)[1]
  hits = top_k == labels[:, None]
  return {
      "loss": jnp.sum(loss * weights),
      "top1": jnp.sum(hits[:, 0] * weights),
      "top5": jnp.sum(jnp.any(hits, axis=-1) * weights),
      "count": jnp.sum(weights),
  }


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    image_size: int,
    label_smoothing: float,
    lr_fn: optax.Schedule,
    skip_nonfinite: bool,
    pixel_stats: PixelStats | None = None,
) -> tuple[TrainState, Metrics]:
  """One optimisation step on the global batch; metrics are batch means.
  `rng` is the run's dropout key (an argument, not a constant: one compiled
  step serves every seed). uint8 images are normalised with `pixel_stats`."""
  images = prepare_images(batch["image"], image_size, pixel_stats)
  labels = batch["label"]
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
    )
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema_params is not None:
    new_state = new_state.replace(
        ema_params=optax.incremental_update(
            new_state.params, state.ema_params, 1.0 - state.ema_decay
        )
    )
  finite = jnp.isfinite(loss) & jnp.all(
      jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
  )
  if skip_nonfinite:
    new_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), new_state, state
    ).replace(step=state.step + 1)
  sums = classification_metrics(logits, labels, jnp.ones_like(loss, shape=labels.shape))
  metrics = {k: sums[k] / sums["count"] for k in ("top1", "top5")}
  metrics.update(
      loss=loss,
      learning_rate=lr_fn(state.step),
      nonfinite=jnp.logical_not(finite).astype(jnp.int32),
  )
  if "unreadable" in batch:  # Image files replaced by others (data.Dataset).
    metrics["unreadable_images"] = jnp.sum(batch["unreadable"])
  return new_state, metrics


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    image_size: int,
    pixel_stats: PixelStats | None = None,
) -> Metrics:
  images = prepare_images(batch["image"], image_size, pixel_stats)
  logits = state.apply_fn(state.eval_variables(), images, train=False)
  sums = classification_metrics(logits, batch["label"], batch["mask"])
  if "unreadable" in batch:  # Image files left out (data.Dataset).
    sums["unreadable_images"] = jnp.sum(batch["unreadable"])
  return sums


# --- set-up ----------------------------------------------------------------------


@struct.dataclass
class Setup:
  """Everything built from a config before the loop: compiled steps included.

  The jitted `init` and `step` take the run's keys (`init_rng`,
  `dropout_rng`) as arguments, not as constants: set-ups that differ only
  in the seed can share them, and the compilation cache serves every seed.
  """

  mesh: jax.sharding.Mesh = struct.field(pytree_node=False)
  dataset: Any = struct.field(pytree_node=False)
  model: nn.Module = struct.field(pytree_node=False)
  steps_per_epoch: int = struct.field(pytree_node=False)
  num_steps: int = struct.field(pytree_node=False)
  init: Callable[[jax.Array], TrainState] = struct.field(pytree_node=False)
  step: Callable[..., tuple[TrainState, Metrics]] = struct.field(pytree_node=False)
  eval_step: Callable[..., Metrics] = struct.field(pytree_node=False)
  init_rng: jax.Array = struct.field(pytree_node=False)
  dropout_rng: jax.Array = struct.field(pytree_node=False)
  # (mean, std) in 0..255 units: how the steps normalise uint8 batches.
  pixel_stats: PixelStats | None = struct.field(pytree_node=False, default=None)
  fault: str = struct.field(pytree_node=False, default="")  # config.testing.fault

  def init_state(self) -> TrainState:
    return self.init(self.init_rng)

  def train_step(
      self, state: TrainState, batch: dict[str, jax.Array]
  ) -> tuple[TrainState, Metrics]:
    return self.step(state, batch, self.dropout_rng)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def shard(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Assembles this process's numpy batch into a global, data-sharded array."""
    sharding = NamedSharding(self.mesh, P("data"))
    local_devices = len(self.mesh.local_devices)
    if self.fault == "drop_shard" and local_devices > 1:
      # The last local device's rows arrive as zeros (config.testing.fault).
      image = np.array(batch["image"])
      image[len(image) - len(image) // local_devices :] = 0
      batch = {**batch, "image": image}
    return {
        k: v if isinstance(v, jax.Array) else jax.make_array_from_process_local_data(sharding, v)
        for k, v in batch.items()
    }


def create_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D "data" mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: XLA propagates the batch sharding (and inserts the cross-device
  # reductions for gradients and BatchNorm statistics) by itself.
  return jax.make_mesh(
      (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def setup(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh | None = None,
    *,
    mode: str = "train",
    class_names: tuple[str, ...] = (),
) -> Setup:
  """Validates the config, builds the dataset, model, optimizer and steps on
  `mesh` (default: `create_mesh()`, all devices).

  mode and class_names go to `datasets.create_dataset`: "eval" reads only the
  evaluation split, labelled by a checkpoint's class names."""
  mesh = create_mesh() if mesh is None else mesh
  config_lib.validate(config, mesh.size)
  if config.model.head != "classifier":
    raise errors.ConfigError(
        f"config.model.head: {config.model.head!r} has no classifier to train or evaluate; "
        "fine-tune such a checkpoint with model.head='classifier' (a new classifier is made)"
    )
  if config.model.dtype == "float64" and not jax.config.jax_enable_x64:
    raise errors.ConfigError(
        "config.model.dtype: 'float64' needs jax_enable_x64, set before JAX computes anything "
        "(the command line sets it; in Python: jax.config.update('jax_enable_x64', True))"
    )
  dataset = datasets.create_dataset(
      config,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      mode=mode,
      class_names=class_names,
  )
  info = dataset.info
  steps_per_epoch = max(info.num_train_examples // config.global_batch_size, 1)
  num_steps = (
      config.num_train_steps
      if config.num_train_steps > 0
      else int(config.num_epochs * steps_per_epoch)
  )
  fault = config.testing.fault
  model = models.create_model(
      config.model,
      info.num_classes,
      freeze_batch_stats=config.finetune.freeze_batch_stats or config.finetune.freeze == "backbone",
      statistics_groups=mesh.size if fault == "batch_stats_per_device" else 1,
  )
  lr_fn = learning_rate_schedule(config, steps_per_epoch, num_steps)
  tx = create_optimizer(config, lr_fn)
  image_size = config.dataset.image_size
  # The normalisation checkpoints record (settings_of): uint8 batches get it on device.
  pixel_stats = data.pixel_stats(info.normalization or (config.dataset.mean, config.dataset.std))
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(rng: jax.Array) -> TrainState:
    images = jnp.zeros((1, image_size, image_size, info.image_shape[-1]))
    variables = model.init(rng, images, train=False)
    ema = config.optimizer.ema_decay
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
        ema_params=variables["params"] if ema > 0 else None,
        ema_decay=ema,
    )

  step = jax.jit(
      functools.partial(
          train_step,
          image_size=image_size,
          lr_fn=lr_fn,
          label_smoothing=config.optimizer.label_smoothing,
          skip_nonfinite=config.skip_nonfinite_updates,
          pixel_stats=pixel_stats,
      ),
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
  )
  return Setup(
      mesh=mesh,
      dataset=dataset,
      model=model,
      steps_per_epoch=steps_per_epoch,
      num_steps=num_steps,
      init=init,
      step=step,
      eval_step=jax.jit(
          functools.partial(eval_step, image_size=image_size, pixel_stats=pixel_stats),
          in_shardings=(replicated, batch_sharding),
          out_shardings=replicated,
      ),
      init_rng=init_rng,
      dropout_rng=dropout_rng,
      pixel_stats=pixel_stats,
      fault=fault,
  )


def evaluate_dataset(s: Setup, state: TrainState) -> dict[str, float]:
  """Top-1/top-5/loss over every eval example exactly once; raises
  NonFiniteError on a NaN/inf loss (the weights or statistics are broken)."""
  totals: dict[str, float] = {}
  for batch in s.dataset.eval_batches():
    sums = jax.device_get(s.eval_step(state, s.shard(batch)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = totals.pop("count")
  unreadable = totals.pop("unreadable_images", None)
  results = {k: v / count for k, v in totals.items()}
  if not np.isfinite(results["loss"]):
    raise errors.NonFiniteError(
        f"non-finite eval loss ({results['loss']}) of the weights at step {int(state.step)}"
    )
  results["num_examples"] = int(round(count))
  if unreadable is not None:
    results["unreadable_images"] = int(round(unreadable))
  return results


def ensure_workdir(workdir: str) -> str:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise config_lib.ConfigError(f"--workdir {workdir} is not writable: {e.strerror}") from e
  return workdir


def write_results(workdir: str, results: dict[str, Any], name: str = "results.json") -> None:
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, name), results, sort_keys=True)


class PreemptionWatcher:
  """Turns SIGTERM/SIGINT into "save at the next step boundary, then stop".

  With several processes, JAX's preemption sync point makes all of them agree
  on the step (the coordination service relays the notice).
  """

  def __init__(self):
    self._requested = False
    self._previous = {}
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: checkpointing at the next step.", signum)
    self._requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def abstract_state(s: Setup) -> TrainState:
  """The TrainState's shapes, dtypes and shardings, without computing it."""
  return checkpoint.abstract(jax.eval_shape(s.init_state), s.replicated)


def restore_or_init(
    s: Setup, ckpt: checkpoint.Checkpointer, config: ml_collections.ConfigDict
) -> TrainState:
  """Latest checkpoint of the workdir, else `checkpoint_path`'s weights, else init."""
  if ckpt.latest_step() is not None:
    state, step = ckpt.restore(abstract_state(s))
    logging.info("Resumed from %s at step %d.", ckpt.directory, step)
    return state
  state = s.init_state()
  if config.checkpoint_path:  # Fine-tuning: weights only, fresh optimizer.
    saved, step = checkpoint.read_checkpoint(config.checkpoint_path)
    variables, fresh = checkpoint.merge_matching(
        {"params": state.params, "batch_stats": state.batch_stats},
        {"params": saved["params"], "batch_stats": saved["batch_stats"]},
    )
    logging.info(
        "Initialised from %s step %d; newly initialised (shape differs or absent): %s",
        config.checkpoint_path,
        step,
        fresh or "none",
    )
    variables = jax.device_put(variables, s.replicated)
    state = state.replace(
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        ema_params=None if state.ema_params is None else variables["params"],
    )
  return state


def with_checkpoint_settings(
    config: ml_collections.ConfigDict, directory: str, keys: tuple[str, ...]
) -> ml_collections.ConfigDict:
  """`config` with `keys` taken from DIRECTORY's settings file, if it has one
  (the weights' padding, BatchNorm epsilon, normalisation, ...); each value
  that changes is logged."""
  settings = checkpoint.read_settings(directory)
  if settings is None:
    return config
  config, changed = config_lib.apply_settings(config, settings["config"], keys)
  for change in changed:
    logging.warning("From %s/%s: config.%s", directory, checkpoint.SETTINGS_FILE, change)
  return config


def write_settings(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, *directories: str
) -> None:
  if jax.process_index() == 0:
    settings = config_lib.settings_of(config, info.num_classes, info.normalization)
    for directory in directories:
      checkpoint.write_settings(directory, settings, info.class_names, source="mnv2_flax")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from WORKDIR/checkpoints if any), evaluates, returns results."""
  start_time = time.time()
  workdir = ensure_workdir(workdir)
  if config.checkpoint_path:  # Fine-tuning: the weights' own settings.
    config = with_checkpoint_settings(config, config.checkpoint_path, config_lib.WEIGHT_KEYS)
  s = setup(config)
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      keep=config.keep_checkpoints,
      best_metric=config.best_metric,
  )
  write_settings(
      config,
      s.dataset.info,
      ckpt.directory,
      *([ckpt.directory + "_best"] if config.best_metric else []),
  )
  state = restore_or_init(s, ckpt, config)
  start_step = int(state.step)
  is_main = jax.process_index() == 0
  writer = metric_writer.MetricWriter(workdir if is_main else None)
  if start_step == 0:
    writer.write_hparams(flatten(config.to_dict()))
  progress = metric_writer.Progress(s.num_steps, start_step)
  profile = metric_writer.Profile(
      config.profile_steps if is_main else 0, first=start_step + 2, logdir=workdir
  )
  preemption = PreemptionWatcher()
  batches: Iterator[dict[str, Any]] = s.dataset.train_batches(start_step)
  logging.info(
      "Training %d steps (%d per epoch) from step %d on %d devices.",
      s.num_steps,
      s.steps_per_epoch,
      start_step,
      jax.device_count(),
  )

  pending: list[Metrics] = []  # Step metrics not yet logged.
  unchecked: list[tuple[int, jax.Array]] = []  # (step, non-finite flag) to inspect.
  interval_start = time.time()
  step = start_step

  def check_finite() -> None:
    """Raises on a non-finite step (so kept checkpoints never hold NaNs)
    unless such updates are skipped by config."""
    flags = jax.device_get([flag for _, flag in unchecked])
    bad = [n for (n, _), flag in zip(unchecked, flags) if flag]
    unchecked.clear()
    if bad and not config.skip_nonfinite_updates:
      last_good = ckpt.latest_step()
      raise errors.NonFiniteError(
          f"non-finite loss or gradients at step {bad[0]}; stopped at step {step}. "
          "Last good checkpoint: "
          + ("none" if last_good is None else f"{ckpt.directory}/{last_good}")
      )

  try:
    while step < s.num_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = s.train_step(state, s.shard(next(batches)))
      step += 1
      pending.append(metrics)
      unchecked.append((step, metrics["nonfinite"]))
      profile(step)
      if step % config.log_every_steps == 0 or step == s.num_steps:
        check_finite()
        fetched = jax.device_get(pending)
        summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        summary["skipped_updates"] = summary.pop("nonfinite") * len(fetched)
        if "unreadable_images" in summary:  # A count, like skipped_updates.
          summary["unreadable_images"] *= len(fetched)
        summary["images_per_s"] = (
            len(fetched) * config.global_batch_size / (time.time() - interval_start)
        )
        summary.update(progress.scalars(step))
        writer.write_scalars(step, summary)
        pending, interval_start = [], time.time()
      if config.eval_every_steps > 0 and step % config.eval_every_steps == 0 and step < s.num_steps:
        evaluate_and_log(s, state, ckpt, writer, step)
      preempted = preemption.should_stop(step)
      if step % config.checkpoint_every_steps == 0 or preempted:
        check_finite()
        ckpt.save(step, state)
      if preempted:
        logging.warning("Preempted: saved step %d, exiting.", step)
        return {"preempted_at_step": step}
    check_finite()
    ckpt.save(step, state)
    if s.dataset.info.num_eval_examples:
      results = evaluate_and_log(s, state, ckpt, writer, step)
    else:
      logging.warning("The dataset has no evaluation split: the run is not evaluated.")
      results = {}
    results.update(step=step, wall_clock_s=time.time() - start_time)
    write_results(workdir, results)
    return results
  finally:
    preemption.restore_handlers()
    profile.stop()
    writer.close()
    ckpt.wait()
    ckpt.close()


def evaluate_and_log(
    s: Setup, state: TrainState, ckpt: checkpoint.Checkpointer, writer: Any, step: int
) -> dict[str, Any]:
  results = evaluate_dataset(s, state)
  writer.write_scalars(step, {f"eval_{k}": v for k, v in results.items()})
  ckpt.save_best(step, state, results)
  return results


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores the newest checkpoint (workdir's, or config.checkpoint_path) and
  evaluates it on any device count; writes WORKDIR/results.json."""
  start_time = time.time()
  workdir = ensure_workdir(workdir)
  directory = config.checkpoint_path or os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise checkpoint.CheckpointError(f"no checkpoint to evaluate: {directory} does not exist")
  config = with_checkpoint_settings(
      config, directory, config_lib.WEIGHT_KEYS + config_lib.RECIPE_KEYS
  )
  settings = checkpoint.read_settings(directory) or {}
  s = setup(config, mode="eval", class_names=tuple(settings.get("class_names", ())))
  ckpt = checkpoint.Checkpointer(directory, keep=1, read_only=True)
  target = abstract_state(s)
  latest = ckpt.latest_step()
  if latest is not None and ckpt.holds_weights_only(latest):  # Imported weights.
    variables, step = ckpt.restore(
        {"params": target.params, "batch_stats": target.batch_stats}, latest
    )
    # Evaluation reads the weights alone: zeros stand in for the optimizer
    # state, which spares compiling the model's initialisation.
    placeholder = jax.tree.map(
        lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), target
    )
    state = placeholder.replace(ema_params=None, **variables)
  else:
    state, step = ckpt.restore(target)
  results = evaluate_dataset(s, state)
  results.update(
      step=step,
      wall_clock_s=time.time() - start_time,
      checkpoint=os.path.join(ckpt.directory, str(step)),
  )
  write_results(workdir, results)
  return results


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = str(v) if isinstance(v, (tuple, list)) else v
  return out
