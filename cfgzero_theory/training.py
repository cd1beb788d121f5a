"""Conditional flow matching on a finite dataset, many seeds at once, with exact resume.

Objective (theory convention, docs/design.md §2): for data ``(x1, y)``, noise ``x0 ~ N(0, I)``,
``t ~ U(0, 1)`` and ``x_t = t·x1 + (1 − t)·x0``,

    L(θ) = E ‖v_θ(x_t, t, ỹ) − (x1 − x0)‖²,   ỹ = NULL_LABEL with probability p (label dropout).

Its minimum over all functions is the *loss floor*
``E_t E_{x_t}[tr Cov(x1 − x0 | x_t, ỹ)]`` (``GaussianMixture.velocity_variance``), drawn
beside every training curve.

An *epoch* is one pass over a finite dataset of ``dataset_size`` points drawn once from the
mixture (``data_seed``), reshuffled every epoch; batches are ``batch_size`` points (the last
partial batch is dropped).  With ``num_data_seeds = D > 1`` there are ``D`` datasets (data
seeds ``data_seed, data_seed + 1, …``) and ``num_seeds`` networks on each: the network axis
holds ``D · num_seeds`` networks, dataset-major.  A whole epoch is one compiled program
(``lax.scan`` over its steps), ``vmap``-ped over the networks, whose axis is sharded over
``jax.devices()``; the program is compiled once per architecture and schedule and reused by
later runs in the same process (other seeds, another mixture of the same dimension).  Every
random draw of epoch ``e`` comes from ``fold_in(seed_key, e)``, so the run depends only on
its configuration: resuming from a checkpoint reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import warnings
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
    the exponential moving average; otherwise snapshots hold the EMA parameters, updated
    after optimizer step ``n`` (``n = 1, 2, …``) with the warmed-up decay
    ``min(ema_decay, (1 + n)/(10 + n))``, so the average never reaches back to the
    initialisation more than a few steps: early snapshots show early training, not the
    untrained network.
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
    num_data_seeds: int = 1
    checkpoint_epochs: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("epochs", "dataset_size", "batch_size", "num_seeds", "num_data_seeds"):
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
    def num_networks(self) -> int:
        """Networks trained at once: ``num_data_seeds · num_seeds`` (dataset-major)."""
        return self.num_data_seeds * self.num_seeds

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
    checkpoint epoch and the final one; ``losses``: mean training loss per epoch and network,
    ``(epochs, num_networks)``; ``loss_floor``: the irreducible loss of the exact mixture;
    ``dataset``: ``(x1, y)``, with a leading dataset axis ``(num_data_seeds, N, …)`` when
    ``num_data_seeds > 1``."""

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
    """The finite training set ``(x1 (N, d), y (N,))``, drawn once from ``data_seed``; with
    ``num_data_seeds = D > 1``, ``D`` sets ``(D, N, d), (D, N)`` from ``data_seed + i``."""
    if config.num_data_seeds == 1:
        return mixture.sample_labelled(jax.random.key(config.data_seed), config.dataset_size)
    sets = [mixture.sample_labelled(jax.random.key(config.data_seed + i), config.dataset_size)
            for i in range(config.num_data_seeds)]
    return jnp.stack([x for x, _ in sets]), jnp.stack([y for _, y in sets])


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
    """``epoch_fn(state, seed_keys, epoch, x1, y) -> (state, mean_loss (networks,))``, jitted, vmapped over networks.

    Epoch ``e`` of a network draws everything from ``fold_in(seed_key, e)``
    (:func:`draw_epoch`), then scans AdamW steps over the batches.  ``x1, y`` are one dataset
    shared by all networks, or (``num_data_seeds > 1``) one per network, ``(networks, N, …)``.
    Outputs are placed with the network sharding of :func:`seed_sharding`, so the state keeps
    one layout from epoch to epoch.  The jitted function is cached per ``graphdef`` and the
    configuration less its seeds and checkpoint epochs, so it compiles once per process.
    """
    return _epoch_fn(graphdef, dataclasses.replace(config, seed=0, data_seed=0, checkpoint_epochs=()))


@functools.lru_cache(maxsize=16)
def _epoch_fn(graphdef, config: TrainConfig):
    seed_axis, _ = seed_sharding(config.num_networks)
    optimizer = make_optimizer(config)
    grad_fn = jax.value_and_grad(flow_matching_loss)

    def one_seed(state: TrainState, seed_key, epoch, x1, labels):
        batches = draw_epoch(jax.random.fold_in(seed_key, epoch), x1, labels, config)

        def step(state: TrainState, inputs):
            batch, n = inputs
            loss, grads = grad_fn(state.params, graphdef, *batch)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            if config.ema_decay:
                decay = jnp.minimum(config.ema_decay, (1.0 + n) / (10.0 + n))
                ema = optax.incremental_update(params, state.ema, 1.0 - decay)
            else:
                ema = params
            return TrainState(params, opt_state, ema), loss

        first = epoch * config.steps_per_epoch + 1
        counts = (first + jnp.arange(config.steps_per_epoch)).astype(jnp.float32)
        state, losses = jax.lax.scan(step, state, (batches, counts))
        return state, jnp.mean(losses)

    data_axis = 0 if config.num_data_seeds > 1 else None
    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None, data_axis, data_axis)), out_shardings=seed_axis)


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
    return networks.graphdef, jax.device_put(state, seed_sharding(config.num_networks)[0])


def run_fingerprint(net_config: NetworkConfig, config: TrainConfig, mixture: GaussianMixture) -> str:
    """SHA-256 of everything a run depends on: both configurations (data and network seeds
    included) and the mixture's parameters as stored bytes (weights, means, covariances,
    labels, with dtypes and shapes).  Two runs resume each other only if these are equal."""
    sha = hashlib.sha256(json.dumps({"network": dataclasses.asdict(net_config),
                                     "training": dataclasses.asdict(config)}, sort_keys=True).encode())
    for array in (mixture.weights, mixture.means, mixture.covs, mixture.labels):
        array = np.ascontiguousarray(np.asarray(array))
        sha.update(f"{array.dtype.str}{array.shape}".encode())
        sha.update(array.reshape(-1).view(np.uint8))
    return sha.hexdigest()


def _run_metadata(net_config: NetworkConfig, config: TrainConfig, mixture: GaussianMixture) -> str:
    """The ``run`` entry of every checkpoint: the configurations and a summary of the mixture as
    JSON (read back by ``widget.networks_from_checkpoints``)."""
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
    """Train ``config.num_networks`` networks on ``num_data_seeds`` finite datasets; resume from ``out_dir``.

    With ``out_dir``, two kinds of files are written atomically at each checkpoint epoch (and
    the final one):

    * ``epoch_XXXXXX.safetensors`` — ``{"networks": kept parameters (EMA if enabled),
      "losses"}``: the stacked networks of that epoch, what studies evaluate;
    * ``training_state.safetensors`` — ``{"state": TrainState, "losses"}`` of the newest
      checkpoint epoch only (parameters, optimizer moments and EMA, so three to four times
      the size of a network file), replaced at each checkpoint.

    Every file carries the run's :func:`run_fingerprint` and its epoch.  A later call with
    the same configuration loads the kept networks and resumes from the training state; it
    ends bit-identical to an uninterrupted run.  Resume is checked, never trusting file names:

    * a folder holding a run of another configuration (another fingerprint) is a
      ``ValueError``;
    * a file that is unreadable, fails its digests (:mod:`cfgzero_theory.checkpoint`) or
      whose stored epoch differs from its name is skipped with a ``UserWarning`` saying so;
    * resume starts from the training state only if it is valid and every checkpoint epoch up
      to it has a valid network file; otherwise training restarts from epoch 0 (the run is
      deterministic: the same result, only slower) and the warning says why.

    While it runs, ``out_dir`` is locked (:class:`~cfgzero_theory.checkpoint.FolderLock`): a
    second run in the same folder is a ``ValueError`` naming the holder.  Temporary files of
    killed writes are removed at the start.
    """
    if net_config.dim != mixture.dim:
        raise ValueError(f"net_config.dim ({net_config.dim}) must equal the mixture's dimension ({mixture.dim})")
    if max(mixture.classes) >= net_config.num_classes:
        raise ValueError(f"net_config.num_classes ({net_config.num_classes}) must exceed every class label {mixture.classes}")
    count = config.num_networks
    seed_axis, replicated = seed_sharding(count)
    init_root, train_root = jax.random.split(jax.random.key(config.seed))
    seed_keys = jax.device_put(jax.random.split(train_root, count), seed_axis)
    dataset = make_dataset(mixture, config)
    if config.num_data_seeds > 1:  # one dataset per network, dataset-major
        x1, labels = jax.device_put(tuple(jnp.repeat(a, config.num_seeds, axis=0) for a in dataset), seed_axis)
    else:
        x1, labels = jax.device_put(dataset, replicated)
    graphdef, state = initial_state(net_config, config, jax.random.split(init_root, count))
    losses = np.full((config.epochs, count), np.nan, np.float32)
    metadata = _run_metadata(net_config, config, mixture)
    fingerprint = run_fingerprint(net_config, config, mixture)
    saved = set(config.checkpoint_epochs) | {config.epochs}
    networks: dict[int, Network] = {}
    start = 0

    def kept_params(state: TrainState):
        return state.ema if config.ema_decay > 0 else state.params

    def record(epoch: int, state: TrainState):
        if epoch not in saved:
            return
        networks[epoch] = Network(graphdef, kept_params(state))
        if out_dir is not None:
            tags = {"run": metadata, "fingerprint": fingerprint, "epoch": str(epoch)}
            checkpoint.save_pytree(checkpoint.checkpoint_path(out_dir, epoch),
                                   {"networks": kept_params(state), "losses": losses}, tags)
            checkpoint.save_pytree(training_state_path(out_dir), {"state": state, "losses": losses}, tags)

    with contextlib.ExitStack() as stack:
        if out_dir is not None:
            stack.enter_context(checkpoint.FolderLock(out_dir))
            for path in checkpoint.remove_temporaries(out_dir):
                warnings.warn(f"removed the temporary file of an interrupted write: {path}", stacklevel=2)
            kept, resumed = _resume(out_dir, fingerprint, {"networks": state.params, "losses": losses},
                                    {"state": state, "losses": losses}, saved)
            networks.update({e: Network(graphdef, jax.device_put(n, seed_axis)) for e, n in kept.items()})
            if resumed is not None:
                start, restored = resumed
                state, losses = jax.device_put(restored["state"], seed_axis), np.array(restored["losses"])
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
    return TrainResult(networks, losses, floor, dataset)


def _resume(out_dir: str, fingerprint: str, network_template, state_template, saved: set[int]):
    """What a run in ``out_dir`` can resume from: ``(networks {epoch: params}, (epoch, state) or None)``.

    Files of another run are a ``ValueError``; unreadable, corrupted or misnamed files are
    skipped with a warning; the training state is used only when every checkpoint epoch up to
    it has a valid network file (see :func:`train`).
    """
    def load(path: str, template, epoch: int | None):
        """The file's content, or ``None`` (with a warning) when it cannot be trusted."""
        try:
            metadata = checkpoint.read_metadata(path)
        except ValueError as err:
            warnings.warn(f"skipping {path}: {err}", stacklevel=3)
            return None
        if metadata.get("fingerprint") != fingerprint:
            raise ValueError(f"out_dir {out_dir!r} holds a checkpoint of a different run configuration ({path}); "
                             "use another folder or delete it")
        stored = metadata.get("epoch")
        if epoch is not None and stored != str(epoch):
            warnings.warn(f"skipping {path}: it stores epoch {stored}, not the epoch {epoch} of its name", stacklevel=3)
            return None
        try:
            return int(stored), checkpoint.load_pytree(path, template)
        except ValueError as err:
            warnings.warn(f"skipping {path}: {err}", stacklevel=3)
            return None

    networks = {}
    for epoch, path in checkpoint.list_checkpoints(out_dir):
        loaded = load(path, network_template, epoch)
        if loaded is not None:
            networks[epoch] = loaded[1]["networks"]
    state_file = training_state_path(out_dir)
    if not os.path.isfile(state_file):
        return networks, None
    loaded = load(state_file, state_template, None)
    if loaded is None:
        warnings.warn("the training state is unusable: training restarts from epoch 0", stacklevel=2)
        return networks, None
    epoch, restored = loaded
    missing = sorted(e for e in saved if e <= epoch and e not in networks)
    if missing:
        warnings.warn(f"no valid network file for epochs {missing}: training restarts from epoch 0 "
                      f"instead of resuming at epoch {epoch}", stacklevel=2)
        return networks, None
    return networks, (epoch, restored)


def training_state_path(out_dir: str) -> str:
    """The file holding the newest full training state of a run in ``out_dir`` (see :func:`train`)."""
    return os.path.join(os.fspath(out_dir), "training_state.safetensors")


def _progress(epochs, enabled: bool, floor: float):
    if not enabled:
        return epochs
    from tqdm.auto import tqdm

    return tqdm(epochs, desc=f"training (loss floor {floor:.4f})", unit="epoch", leave=False)
