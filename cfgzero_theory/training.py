"""Conditional flow matching on a finite dataset, many seeds at once, with exact resume.

Objective (theory convention, DESIGN.md §2): for data ``(x1, y)``, noise ``x0 ~ N(0, I)``,
``t ~ U(0, 1)`` and ``x_t = t·x1 + (1 − t)·x0``,

    L(θ) = E ‖v_θ(x_t, t, ỹ) − (x1 − x0)‖²,   ỹ = NULL_LABEL with probability p (label dropout).

Its minimum over all functions is the *loss floor*
``E_t E_{x_t}[tr Cov(x1 − x0 | x_t, ỹ)]`` (``GaussianMixture.velocity_variance``), drawn
beside every training curve.

An *epoch* is one pass over a finite dataset of ``dataset_size`` points drawn once from the
mixture (``data_seed``), reshuffled every epoch; batches are ``batch_size`` points (the last
partial batch is dropped).  A whole epoch is one compiled program (``lax.scan`` over its
steps), ``vmap``-ped over the seeds, whose axis is sharded over ``jax.devices()``.  Every
random draw of epoch ``e`` comes from ``fold_in(seed_key, e)``, so the run depends only on
its configuration: resuming from a checkpoint reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cfgzero_theory import checkpoint
from cfgzero_theory.mixture import NULL_LABEL, GaussianMixture
from cfgzero_theory.models import Network, NetworkConfig, init_networks

Array = jax.Array

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    ``checkpoint_epochs`` lists the epochs (number of completed passes, ``0`` = at
    initialisation) whose networks are kept in the result and, with an output folder,
    written as checkpoints; the final epoch is always written.  ``ema_decay = 0`` disables
    the exponential moving average; otherwise snapshots hold the EMA parameters.
    """

    epochs: int = 20
    dataset_size: int = 2048
    batch_size: int = 128
    learning_rate: float = 2e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    label_dropout: float = 0.1
    ema_decay: float = 0.0
    num_seeds: int = 4
    seed: int = 0
    data_seed: int = 0
    checkpoint_epochs: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("epochs", "dataset_size", "batch_size", "num_seeds"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size > self.dataset_size:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed dataset_size ({self.dataset_size})")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.total_steps):
            raise ValueError(f"warmup_steps must be an integer in [0, {self.total_steps}), got {self.warmup_steps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay!r}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        bad = [e for e in self.checkpoint_epochs if not (isinstance(e, int) and 0 <= e <= self.epochs)]
        if bad:
            raise ValueError(f"checkpoint_epochs must be integers in [0, {self.epochs}], got {bad}")
        object.__setattr__(self, "checkpoint_epochs", tuple(sorted(set(self.checkpoint_epochs))))

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class TrainState(NamedTuple):
    """Per-seed training state (every leaf has a leading seed axis)."""

    params: nnx.State
    opt_state: optax.OptState
    ema: nnx.State


class TrainResult(NamedTuple):
    """``networks[e]``: the stacked networks after epoch ``e`` (EMA if enabled) for every
    checkpoint epoch and the final one; ``losses``: mean training loss per epoch and seed,
    ``(epochs, seeds)``; ``loss_floor``: the irreducible loss of the exact mixture."""

    networks: dict[int, Network]
    losses: np.ndarray
    loss_floor: float
    dataset: tuple[Array, Array]


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with a constant or cosine-decayed learning rate and optional linear warm-up.

    Wrapped in ``optax.flatten``: one update over a single vector of all parameters.
    """
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(config.learning_rate, config.total_steps - config.warmup_steps)
    else:
        decay = optax.constant_schedule(config.learning_rate)
    schedule = decay
    if config.warmup_steps:
        warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
        schedule = optax.join_schedules([warmup, decay], [config.warmup_steps])
    return optax.flatten(optax.adamw(schedule, weight_decay=config.weight_decay))


def make_dataset(mixture: GaussianMixture, config: TrainConfig) -> tuple[Array, Array]:
    """The finite training set ``(x1 (N, d), y (N,))``, drawn once from ``data_seed``."""
    return mixture.sample_labelled(jax.random.key(config.data_seed), config.dataset_size)


def loss_floor(mixture: GaussianMixture, label_dropout: float, key: Array, n: int = 65536) -> float:
    """Monte-Carlo estimate of the irreducible loss ``E tr Cov(x1 − x0 | x_t, ỹ)`` (see module docstring)."""
    k_data, k_t, k_noise, k_drop = jax.random.split(key, 4)
    x1, labels = mixture.sample_labelled(k_data, n)
    t = jax.random.uniform(k_t, (n,), x1.dtype)
    x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
    labels = jnp.where(jax.random.bernoulli(k_drop, label_dropout, (n,)), NULL_LABEL, labels)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    return float(jnp.mean(mixture.velocity_variance(x_t, t, labels)))


class EpochBatches(NamedTuple):
    """Everything random in one epoch, drawn up front: ``(steps, batch, ...)`` arrays."""

    x1: Array
    labels: Array  # after label dropout (NULL_LABEL where dropped)
    x0: Array
    t: Array


def draw_epoch(key, x1, labels, config: TrainConfig) -> EpochBatches:
    """Shuffle the dataset (one sort of random keys) and draw ``t ~ U(0, 1)``, ``x0 ~ N(0, I)``
    and the label-dropout mask for every step of an epoch at once.

    Drawing outside the step loop keeps the random-number generator and the data gather out
    of the per-step program; memory is ``steps · batch · (2d + 2)`` numbers per seed.
    """
    steps, batch = config.steps_per_epoch, config.batch_size
    k_perm, k_t, k_noise, k_drop = jax.random.split(key, 4)
    order = jnp.argsort(jax.random.bits(k_perm, (x1.shape[0],)))[: steps * batch].reshape(steps, batch)
    dropped = jax.random.bernoulli(k_drop, config.label_dropout, (steps, batch))
    return EpochBatches(
        x1=x1[order],
        labels=jnp.where(dropped, NULL_LABEL, labels[order]),
        x0=jax.random.normal(k_noise, (steps, batch, x1.shape[1]), x1.dtype),
        t=jax.random.uniform(k_t, (steps, batch), x1.dtype),
    )


def flow_matching_loss(params, graphdef, x1, labels, x0, t) -> Array:
    """One-batch estimate of ``L(θ)``: ``mean ‖v_θ(x_t, t, y) − (x1 − x0)‖²``, ``x_t = t·x1 + (1 − t)·x0``."""
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    v = nnx.merge(graphdef, params)(x_t, t, labels)
    return jnp.mean(jnp.sum((v - (x1 - x0)) ** 2, axis=-1))


def make_epoch_fn(graphdef, config: TrainConfig):
    """``epoch_fn(state, seed_keys, epoch, x1, y) -> (state, mean_loss (seeds,))``, jitted, vmapped over seeds.

    Epoch ``e`` of a seed draws everything from ``fold_in(seed_key, e)`` (:func:`draw_epoch`),
    then scans AdamW steps over the batches.  Outputs are placed with the seed sharding of
    :func:`seed_sharding`, so the state keeps one layout from epoch to epoch and the program
    compiles once per run.
    """
    seed_axis, _ = seed_sharding(config.num_seeds)
    optimizer = make_optimizer(config)
    grad_fn = jax.value_and_grad(flow_matching_loss)

    def one_seed(state: TrainState, seed_key, epoch, x1, labels):
        batches = draw_epoch(jax.random.fold_in(seed_key, epoch), x1, labels, config)

        def step(state: TrainState, batch: EpochBatches):
            loss, grads = grad_fn(state.params, graphdef, *batch)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = optax.incremental_update(params, state.ema, 1 - config.ema_decay) if config.ema_decay else params
            return TrainState(params, opt_state, ema), loss

        state, losses = jax.lax.scan(step, state, batches)
        return state, jnp.mean(losses)

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None, None, None)), out_shardings=seed_axis)


def seed_sharding(num_seeds: int) -> tuple[NamedSharding, NamedSharding]:
    """Shard the seed axis over the largest number of devices that divides ``num_seeds``.

    Returns ``(seed_axis, replicated)`` shardings on that mesh.
    """
    devices = jax.devices()
    count = max(c for c in range(1, len(devices) + 1) if num_seeds % c == 0)
    mesh = Mesh(np.array(devices[:count]), ("seeds",))
    return NamedSharding(mesh, PartitionSpec("seeds")), NamedSharding(mesh, PartitionSpec())


def initial_state(net_config: NetworkConfig, config: TrainConfig, init_keys) -> tuple[object, TrainState]:
    """``(graphdef, state)`` of freshly initialised networks (one per key), placed with the seed sharding."""
    networks = init_networks(net_config, init_keys)
    opt_state = jax.vmap(make_optimizer(config).init)(networks.state)
    state = TrainState(networks.state, opt_state, networks.state)
    return networks.graphdef, jax.device_put(state, seed_sharding(config.num_seeds)[0])


def _run_metadata(net_config: NetworkConfig, config: TrainConfig, mixture: GaussianMixture) -> str:
    fingerprint = {
        "network": dataclasses.asdict(net_config),
        "training": dataclasses.asdict(config),
        "mixture": {
            "weights": np.asarray(mixture.weights).round(12).tolist(),
            "means": np.asarray(mixture.means).round(12).tolist(),
            "eigvals": np.asarray(mixture.eigvals).round(12).tolist(),
            "labels": np.asarray(mixture.labels).tolist(),
        },
    }
    return json.dumps(fingerprint, sort_keys=True)


def train(
    mixture: GaussianMixture,
    net_config: NetworkConfig,
    config: TrainConfig,
    *,
    out_dir: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``config.num_seeds`` networks on the same finite dataset; resume from ``out_dir``.

    With ``out_dir``, the state after each checkpoint epoch (and the final epoch) is written
    atomically as ``epoch_XXXXXX.safetensors``; a later call with the same configuration
    resumes from the newest one and ends bit-identical to an uninterrupted run.  A folder
    holding a run of another configuration is a ``ValueError``.
    """
    if net_config.dim != mixture.dim:
        raise ValueError(f"net_config.dim ({net_config.dim}) must equal the mixture's dimension ({mixture.dim})")
    if max(mixture.classes) >= net_config.num_classes:
        raise ValueError(f"net_config.num_classes ({net_config.num_classes}) must exceed every class label {mixture.classes}")
    seed_axis, replicated = seed_sharding(config.num_seeds)
    init_root, train_root = jax.random.split(jax.random.key(config.seed))
    seed_keys = jax.device_put(jax.random.split(train_root, config.num_seeds), seed_axis)
    x1, labels = jax.device_put(make_dataset(mixture, config), replicated)
    graphdef, state = initial_state(net_config, config, jax.random.split(init_root, config.num_seeds))
    losses = np.full((config.epochs, config.num_seeds), np.nan, np.float32)
    metadata = _run_metadata(net_config, config, mixture)
    networks: dict[int, Network] = {}
    start = 0

    def record(epoch: int, state: TrainState):
        kept = state.ema if config.ema_decay > 0 else state.params
        if epoch in config.checkpoint_epochs or epoch == config.epochs:
            networks[epoch] = Network(graphdef, kept)
        if out_dir is not None and (epoch in config.checkpoint_epochs or epoch == config.epochs):
            tree = {"state": state, "losses": losses}
            checkpoint.save_pytree(checkpoint.checkpoint_path(out_dir, epoch), tree, {"run": metadata, "epoch": str(epoch)})

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        found = checkpoint.list_checkpoints(out_dir)
        for epoch, path in found:
            if checkpoint.read_metadata(path).get("run") != metadata:
                raise ValueError(f"out_dir {out_dir!r} holds a checkpoint of a different run configuration ({path})")
        template = {"state": state, "losses": losses}
        for epoch, path in found:
            restored = checkpoint.load_pytree(path, template)
            kept = restored["state"].ema if config.ema_decay > 0 else restored["state"].params
            networks[epoch] = Network(graphdef, jax.device_put(kept, seed_axis))
        if found:
            start, path = found[-1]
            restored = checkpoint.load_pytree(path, template)
            state = jax.device_put(restored["state"], seed_axis)
            losses = np.array(restored["losses"])
    if start == 0:
        record(0, state)

    floor = loss_floor(mixture, config.label_dropout, jax.random.key(config.data_seed + 1))
    epoch_fn = make_epoch_fn(graphdef, config)
    bar = _progress(range(start, config.epochs), progress, floor)
    for epoch in bar:
        state, epoch_loss = epoch_fn(state, seed_keys, epoch, x1, labels)
        losses[epoch] = np.asarray(epoch_loss)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[epoch].mean():.4f}", floor=f"{floor:.4f}")
        record(epoch + 1, state)
    return TrainResult(networks, losses, floor, (x1, labels))


def _progress(epochs, enabled: bool, floor: float):
    if not enabled:
        return epochs
    from tqdm.auto import tqdm

    return tqdm(epochs, desc=f"training (loss floor {floor:.4f})", unit="epoch", leave=False)
