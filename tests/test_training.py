"""Velocity networks and flow-matching training: objective, seeds, sharding, exact resume."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory import CFG, NULL_LABEL, mixtures
from cfgzero_theory.models import NetworkConfig, VelocityMLP, init_networks, network_velocity, select
from cfgzero_theory.sampling import sample, time_grid
from cfgzero_theory.training import TrainConfig, initial_state, loss_floor, make_epoch_fn, train

ROOT = Path(__file__).resolve().parents[1]
MIXTURE = mixtures.class_conditional_2d()
NET = NetworkConfig(dim=2, num_classes=3, width=32, depth=2)
SMALL = TrainConfig(epochs=6, dataset_size=512, batch_size=64, num_seeds=2, checkpoint_epochs=(0, 2, 4))


def test_network_config_validation():
    with pytest.raises(ValueError, match="width"):
        NetworkConfig(dim=2, num_classes=3, width=0)
    with pytest.raises(ValueError, match="activation"):
        NetworkConfig(dim=2, num_classes=3, activation="swish!")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(dataset_size=10, batch_size=20)
    with pytest.raises(ValueError, match="label_dropout"):
        TrainConfig(label_dropout=1.0)
    with pytest.raises(ValueError, match="checkpoint_epochs"):
        TrainConfig(epochs=3, checkpoint_epochs=(5,))


def test_null_label_is_the_extra_embedding_row():
    from flax import nnx

    model = VelocityMLP(NET, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 2))
    null = model(x, 0.3, jnp.full(5, NULL_LABEL))
    np.testing.assert_allclose(null, model(x, 0.3, jnp.full(5, NET.num_classes)))
    assert not np.allclose(null, model(x, 0.3, jnp.zeros(5, int)))
    assert model(x, jnp.linspace(0, 1, 5), jnp.arange(5) % 3).shape == (5, 2)


def test_stacked_networks_plug_into_the_sampler():
    nets = init_networks(NET, jax.random.split(jax.random.key(0), 3))
    assert jax.tree_util.tree_leaves(nets.state)[0].shape[0] == 3
    one = select(nets, 1)
    x0 = jax.random.normal(jax.random.key(2), (16, 2))
    out = sample(network_velocity, one, x0, time_grid(4), 0, CFG(2.0))
    assert out.samples.shape == (16, 2) and np.all(np.isfinite(out.samples))
    batched = jax.vmap(lambda n: sample(network_velocity, n, x0, time_grid(4), 0, CFG(2.0)).samples)(nets)
    np.testing.assert_allclose(batched[1], out.samples, rtol=1e-5, atol=1e-5)


def test_loss_floor_is_the_loss_of_the_exact_field():
    """The floor equals the Monte-Carlo flow-matching loss of the exact velocity (independent estimate)."""
    key = jax.random.key(3)
    floor = loss_floor(MIXTURE, 0.1, key, n=100_000)
    k_data, k_t, k_noise, k_drop = jax.random.split(jax.random.key(4), 4)
    n = 100_000
    x1, labels = MIXTURE.sample_labelled(k_data, n)
    t = jax.random.uniform(k_t, (n,))
    x0 = jax.random.normal(k_noise, x1.shape)
    labels = jnp.where(jax.random.bernoulli(k_drop, 0.1, (n,)), NULL_LABEL, labels)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    exact_loss = float(jnp.mean(jnp.sum((MIXTURE.velocity(x_t, t, labels) - (x1 - x0)) ** 2, axis=-1)))
    assert floor == pytest.approx(exact_loss, rel=0.03)


def test_training_learns_and_epochs_compile_once():
    config = TrainConfig(epochs=12, dataset_size=1024, batch_size=64, num_seeds=2, learning_rate=3e-3)
    result = train(MIXTURE, NetworkConfig(dim=2, num_classes=3, width=64, depth=3), config, progress=False)
    mean_loss = result.losses.mean(axis=1)
    assert mean_loss[-1] < 0.5 * mean_loss[0]
    assert mean_loss[-1] < 1.8 * result.loss_floor  # close to the irreducible loss
    assert mean_loss[-1] > 0.8 * result.loss_floor
    assert not np.allclose(result.losses[:, 0], result.losses[:, 1])  # seeds differ
    assert sorted(result.networks) == [12]  # no checkpoint epochs asked: the final one only
    # the compiled epoch is reused across epochs: one trace for the whole run
    graphdef, state = initial_state(NET, config, jax.random.split(jax.random.key(0), 2))
    epoch_fn = make_epoch_fn(graphdef, config)
    keys = jax.random.split(jax.random.key(1), 2)
    x1, labels = result.dataset
    for epoch in range(3):
        state, _ = epoch_fn(state, keys, epoch, x1, labels)
    assert epoch_fn._cache_size() == 1


def test_vmapped_seeds_equal_separate_runs():
    x1, labels = MIXTURE.sample_labelled(jax.random.key(5), SMALL.dataset_size)
    graphdef, state = initial_state(NET, SMALL, jax.random.split(jax.random.key(6), 2))
    keys = jax.random.split(jax.random.key(7), 2)
    epoch_fn = make_epoch_fn(graphdef, SMALL)
    both, loss_both = epoch_fn(state, keys, 0, x1, labels)
    for s in range(2):
        single = jax.tree_util.tree_map(lambda a: a[s : s + 1], state)
        alone, loss_alone = epoch_fn(single, keys[s : s + 1], 0, x1, labels)
        np.testing.assert_allclose(loss_alone[0], loss_both[s], rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(alone.params), jax.tree_util.tree_leaves(both.params)):
            np.testing.assert_allclose(a[0], b[s], rtol=1e-4, atol=1e-5)


RUN_SCRIPT = textwrap.dedent(
    """
    import sys, jax, numpy as np
    from cfgzero_theory import mixtures
    from cfgzero_theory.models import NetworkConfig
    from cfgzero_theory.training import TrainConfig, train
    out_dir, result_path, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
    if slow:  # slow the loop down so the parent can kill it between checkpoints
        import time, cfgzero_theory.training as tr
        original = tr.make_epoch_fn
        def slowed(*a, **k):
            fn = original(*a, **k)
            def run(*args):
                time.sleep(0.6)
                return fn(*args)
            return run
        tr.make_epoch_fn = slowed
    res = train(
        mixtures.class_conditional_2d(),
        NetworkConfig(dim=2, num_classes=3, width=32, depth=2),
        TrainConfig(epochs=6, dataset_size=512, batch_size=64, num_seeds=4, checkpoint_epochs=(1, 2, 3, 4, 5)),
        out_dir=out_dir, progress=False,
    )
    leaves = jax.tree_util.tree_leaves(res.networks[6].state)
    np.savez(result_path, losses=res.losses, devices=len(jax.devices()),
             sharded=len(leaves[0].sharding.device_set), *[np.asarray(a) for a in leaves])
    """
)


def _run(args, env_extra=None, **kwargs):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, *args], cwd=ROOT, env=env, **kwargs)


def test_killed_run_resumes_bit_identical_on_four_devices(tmp_path):
    """SIGKILL mid-run, resume from the last checkpoint: the result equals an uninterrupted run bit
    for bit.  Runs with four host devices, so the seed axis is sharded four ways."""
    four = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    full_dir, full_out = tmp_path / "full", tmp_path / "full.npz"
    assert _run([str(full_dir), str(full_out), "fast"], four).wait(timeout=300) == 0

    killed_dir, killed_out = tmp_path / "killed", tmp_path / "killed.npz"
    proc = _run([str(killed_dir), str(killed_out), "slow"], four)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed_dir / "epoch_000003.safetensors").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not killed_out.exists(), "the run finished before it could be killed"
    assert _run([str(killed_dir), str(killed_out), "fast"], four).wait(timeout=300) == 0

    full, resumed = np.load(full_out), np.load(killed_out)
    assert int(full["devices"]) == 4 and int(full["sharded"]) == 4
    for name in full.files:
        np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)


def test_out_dir_of_another_run_is_refused(tmp_path):
    train(MIXTURE, NET, SMALL, out_dir=str(tmp_path), progress=False)
    other = TrainConfig(epochs=6, dataset_size=512, batch_size=64, num_seeds=2, learning_rate=1e-2)
    with pytest.raises(ValueError, match="different run"):
        train(MIXTURE, NET, other, out_dir=str(tmp_path), progress=False)
    # the same configuration resumes from the final checkpoint without training again
    again = train(MIXTURE, NET, SMALL, out_dir=str(tmp_path), progress=False)
    assert sorted(again.networks) == [0, 2, 4, 6]


def test_residual_network_and_config_checks():
    from flax import nnx

    from cfgzero_theory.models import VelocityResMLP

    config = NetworkConfig(dim=2, num_classes=3, width=16, depth=2, architecture="resmlp", input_scale=0.5)
    model = VelocityResMLP(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 2))
    out = model(x, jnp.linspace(0, 1, 5), jnp.array([0, 1, 2, NULL_LABEL, 1]))
    assert out.shape == (5, 2) and np.all(np.isfinite(out))
    # input_scale multiplies x before the first layer: a network with scale s on x equals scale 1 on s·x
    plain = VelocityResMLP(NetworkConfig(dim=2, num_classes=3, width=16, depth=2, architecture="resmlp"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model(x, 0.3, jnp.zeros(5, int)), plain(0.5 * x, 0.3, jnp.zeros(5, int)), rtol=1e-6)
    nets = init_networks(config, jax.random.split(jax.random.key(0), 3))
    assert jax.tree_util.tree_leaves(nets.state)[0].shape[0] == 3
    with pytest.raises(ValueError, match="architecture"):
        NetworkConfig(dim=2, num_classes=3, architecture="transformer")
    with pytest.raises(ValueError, match="input_scale"):
        NetworkConfig(dim=2, num_classes=3, input_scale=0.0)
    with pytest.raises(ValueError, match="num_data_seeds"):
        TrainConfig(num_data_seeds=0)


def test_several_datasets_train_at_once_like_separate_runs():
    """num_data_seeds = 2: network i·S + s trains on dataset data_seed + i exactly as a run with that data seed."""
    both = TrainConfig(epochs=2, dataset_size=256, batch_size=64, num_seeds=1, num_data_seeds=2, data_seed=3)
    result = train(MIXTURE, NET, both, progress=False)
    assert result.losses.shape == (2, 2) and result.dataset[0].shape == (2, 256, 2)
    np.testing.assert_array_equal(result.dataset[0][1], MIXTURE.sample_labelled(jax.random.key(4), 256)[0])
    assert not np.allclose(result.losses[:, 0], result.losses[:, 1])
    # same keys as the joint run, one dataset at a time: the epoch function with per-network data
    graphdef, state = initial_state(NET, both, jax.random.split(jax.random.split(jax.random.key(0))[0], 2))
    keys = jax.random.split(jax.random.split(jax.random.key(0))[1], 2)
    x1, y = result.dataset
    joint, loss = make_epoch_fn(graphdef, both)(state, keys, 0, x1, y)
    one = TrainConfig(epochs=2, dataset_size=256, batch_size=64, num_seeds=1)
    for i in range(2):
        single = jax.tree_util.tree_map(lambda a: a[i : i + 1], state)
        alone, loss_alone = make_epoch_fn(graphdef, one)(single, keys[i : i + 1], 0, x1[i], y[i])
        np.testing.assert_allclose(loss_alone[0], loss[i], rtol=1e-5)


def test_ema_warmup_follows_the_parameters_early():
    """With the warmed-up decay min(d, (1 + n)/(10 + n)), the EMA after a few steps sits near the
    current parameters, not near the initialisation (which a plain decay of 0.999 would keep)."""
    config = TrainConfig(epochs=1, dataset_size=512, batch_size=64, num_seeds=1, learning_rate=1e-2, ema_decay=0.999)
    graphdef, state = initial_state(NET, config, jax.random.split(jax.random.key(0), 1))
    x1, y = MIXTURE.sample_labelled(jax.random.key(1), 512)
    new, _ = make_epoch_fn(graphdef, config)(state, jax.random.split(jax.random.key(2), 1), 0, x1, y)
    flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    init, params, ema = flat(state.params), flat(new.params), flat(new.ema)
    # after 8 steps the weight left on the initialisation is prod_n (1 + n)/(10 + n) = 9!·10!/17!... < 0.01
    weight_on_init = np.prod([(1 + n) / (10 + n) for n in range(1, 9)])
    assert weight_on_init < 0.01
    assert np.linalg.norm(ema - params) < 0.5 * np.linalg.norm(params - init)


def test_checkpoint_files_hold_networks_and_one_training_state(tmp_path):
    from cfgzero_theory import checkpoint
    from cfgzero_theory.training import training_state_path

    result = train(MIXTURE, NET, SMALL, out_dir=str(tmp_path), progress=False)
    files = sorted(os.listdir(tmp_path))
    assert files == ["epoch_000000.safetensors", "epoch_000002.safetensors", "epoch_000004.safetensors",
                     "epoch_000006.safetensors", "training_state.safetensors"]
    assert checkpoint.read_metadata(training_state_path(tmp_path))["epoch"] == "6"
    assert os.path.getsize(tmp_path / "epoch_000006.safetensors") < 0.5 * os.path.getsize(training_state_path(tmp_path))
    # a missing network file before the saved state: the run retrains from scratch, with the same result
    os.remove(tmp_path / "epoch_000002.safetensors")
    with pytest.warns(UserWarning, match=r"no valid network file for epochs \[2\]: training restarts from epoch 0"):
        again = train(MIXTURE, NET, SMALL, out_dir=str(tmp_path), progress=False)
    assert sorted(again.networks) == [0, 2, 4, 6] and (tmp_path / "epoch_000002.safetensors").exists()
    for a, b in zip(jax.tree_util.tree_leaves(again.networks[6].state), jax.tree_util.tree_leaves(result.networks[6].state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
