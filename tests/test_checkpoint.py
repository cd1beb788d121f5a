"""Checkpoints: bit-exact round trips of a seed-stacked training state, atomic writes,
strict loaders that name what is wrong, and checkpoint listing (docs/design.md §7)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save as st_save

from cfgzero_theory import checkpoint as ckpt

N_SEEDS = 3


class Model(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(5, 4, rngs=rngs)
        self.hidden = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)])


@jax.jit  # one compilation instead of many eager ops (keeps the file fast)
def _training_state(key):
    model_key, state_key = jax.random.split(key)
    keys = jax.random.split(model_key, N_SEEDS)
    params = jax.vmap(lambda k: nnx.split(Model(rngs=nnx.Rngs(k)))[1])(keys)  # all nnx.Param
    opt_state = jax.vmap(optax.adam(1e-3).init)(params)
    # Take one (fake) optimiser step so mu/nu/count are not all zeros.
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p), params)
    updates, opt_state = jax.vmap(optax.adam(1e-3).update)(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "model": params,
        "opt_state": opt_state,
        "keys": jax.random.split(state_key, N_SEEDS),
        "epoch": jnp.asarray(7, jnp.int32),
    }


def training_state(seed=0):
    """A seed-stacked training state: nnx params, adam state, typed keys, epoch counter."""
    state = _training_state(jax.random.key(seed))
    state["extras"] = (
        jnp.asarray(np.array([True, False, True])),
        jnp.asarray(np.arange(N_SEEDS, dtype=np.int32) - 1),
        jnp.asarray(np.float32(-0.0)),
    )
    return state


def leaf_bytes(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    array = np.asarray(leaf)
    return array.dtype, array.shape, array.tobytes()


def assert_bit_identical(restored, original):
    assert jax.tree.structure(restored) == jax.tree.structure(original)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original), strict=True):
        assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array))
        assert a.dtype == b.dtype
        assert leaf_bytes(a) == leaf_bytes(b)


# --------------------------------------------------------------------------- round trips


def test_training_state_round_trip_is_bit_identical(tmp_path):
    state = training_state()
    path = ckpt.checkpoint_path(tmp_path, 7)
    ckpt.save_pytree(path, state, metadata={"epoch": "7", "config": json.dumps({"lr": 1e-3})})

    restored = ckpt.load_pytree(path, state)
    assert_bit_identical(restored, state)
    assert jax.dtypes.issubdtype(restored["keys"].dtype, jax.dtypes.prng_key)
    assert restored["keys"].dtype == state["keys"].dtype
    # The restored keys draw the same numbers.
    draw = jax.vmap(lambda k: jax.random.normal(k, (4,)))
    np.testing.assert_array_equal(draw(restored["keys"]), draw(state["keys"]))
    # ... and the restored state merges back into the model.
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Model(rngs=nnx.Rngs(0))))
    first = jax.tree.map(lambda leaf: np.asarray(leaf)[0], restored["model"])
    np.testing.assert_array_equal(
        nnx.merge(graphdef, first).embed.embedding[...], state["model"]["embed"]["embedding"][0]
    )

    metadata = ckpt.read_metadata(path)
    assert metadata["epoch"] == "7" and json.loads(metadata["config"]) == {"lr": 1e-3}
    assert metadata["checkpoint.format"] == ckpt.FORMAT
    assert json.loads(metadata["checkpoint.prng_keys"]) == {"keys": "threefry2x32"}


def test_abstract_template_and_readable_names(tmp_path):
    state = training_state()
    path = tmp_path / "state.safetensors"
    ckpt.save_pytree(path, state)
    template = jax.eval_shape(lambda: state)  # ShapeDtypeStructs, typed keys included
    restored = ckpt.load_pytree(path, template)
    assert_bit_identical(restored, state)

    # Plain safetensors file with readable, path-derived names (the reader is independent).
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        names = set(f.keys())
    assert "model/hidden/0/kernel" in names
    assert "model/embed/embedding" in names
    assert "opt_state/0/mu/hidden/1/bias" in names
    assert "opt_state/0/count" in names
    assert "keys" in names and "epoch" in names and "extras/2" in names
    assert not any(name.endswith("/value") for name in names)


def test_dtypes_scalars_and_python_leaves_round_trip(tmp_path):
    tree = {
        "bf16": jnp.asarray(np.array([1.5, -2.0, 3e-3], dtype=ml_dtypes.bfloat16)),
        "f16": np.array([[1.0, np.inf]], dtype=np.float16),
        "nan": np.frombuffer(np.uint32(0x7FC01234).tobytes(), np.float32).copy(),  # payload
        "u8": np.arange(4, dtype=np.uint8),
        "i8": np.array(-3, dtype=np.int8),
        "bool0": np.bool_(True),
        "np_scalar": np.float32(2.5),
        "py_int": 12,
        "py_float": 0.1,
        "py_bool": False,
        "empty": np.zeros((0, 3), np.float32),
        "weak": jnp.asarray(3),  # weakly typed
        "keys2d": jax.random.split(jax.random.key(1), (2, 3)),
        "none": None,
        "empty_state": optax.EmptyState(),
        "weird/key%": np.ones(2, np.int16),
        "weird": {"key%": np.zeros(2, np.int16)},
    }
    path = tmp_path / "dtypes.safetensors"
    ckpt.save_pytree(path, tree)
    restored = ckpt.load_pytree(path, tree)
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for name in ("f16", "nan", "u8", "i8", "empty", "weird/key%"):
        assert type(restored[name]) is np.ndarray
        assert restored[name].dtype == tree[name].dtype
        assert restored[name].tobytes() == np.asarray(tree[name]).tobytes()
    assert restored["bf16"].dtype == jnp.bfloat16
    assert np.asarray(restored["bf16"]).tobytes() == np.asarray(tree["bf16"]).tobytes()
    assert type(restored["bool0"]) is np.bool_ and restored["bool0"]
    assert type(restored["np_scalar"]) is np.float32 and restored["np_scalar"] == 2.5
    assert type(restored["py_int"]) is int and restored["py_int"] == 12
    assert type(restored["py_float"]) is float and restored["py_float"] == 0.1
    assert type(restored["py_bool"]) is bool and restored["py_bool"] is False
    assert restored["weak"].weak_type and restored["weak"].dtype == tree["weak"].dtype
    assert restored["keys2d"].shape == (2, 3)
    assert leaf_bytes(restored["keys2d"]) == leaf_bytes(tree["keys2d"])


@jax.tree_util.register_pytree_with_keys_class
class TwoSameKeys:
    """A (deliberately bad) pytree node whose two children have the same key."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def tree_flatten_with_keys(self):
        key = jax.tree_util.GetAttrKey("x")
        return ((key, self.first), (key, self.second)), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_unsupported_dtype_and_bad_metadata_raise(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="'z'.*complex128"):
        ckpt.save_pytree(path, {"z": np.zeros(2, np.complex128)})
    with pytest.raises(ValueError, match="reserved prefix"):
        ckpt.save_pytree(path, {"a": np.zeros(2)}, metadata={"checkpoint.format": "x"})
    with pytest.raises(ValueError, match="str to str"):
        ckpt.save_pytree(path, {"a": np.zeros(2)}, metadata={"epoch": 3})
    with pytest.raises(ValueError, match="same checkpoint name 'a/x'"):
        ckpt.save_pytree(path, {"a": TwoSameKeys(np.zeros(2), np.ones(2))})
    with pytest.raises(ValueError, match="'__metadata__' is reserved"):
        ckpt.save_pytree(path, {"__metadata__": np.zeros(2)})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- atomicity


def test_failed_write_leaves_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = ckpt.checkpoint_path(tmp_path, 3)
    old = training_state(seed=0)
    ckpt.save_pytree(path, old)
    with open(path, "rb") as f:
        before = f.read()

    def write_half_then_die(file, data):
        file.write(data[: len(data) // 2])
        raise RuntimeError("killed mid-write")

    from cfgzero_theory import files

    monkeypatch.setattr(files, "_write_fully", write_half_then_die)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        ckpt.save_pytree(path, training_state(seed=1))
    with open(path, "rb") as f:
        assert f.read() == before
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]
    assert_bit_identical(ckpt.load_pytree(path, old), old)

    # A failure at the rename itself also cleans up.
    monkeypatch.undo()

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        ckpt.save_pytree(path, training_state(seed=1))
    monkeypatch.undo()
    with open(path, "rb") as f:
        assert f.read() == before
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]

    # A successful write replaces the file.
    new = training_state(seed=1)
    ckpt.save_pytree(path, new)
    assert_bit_identical(ckpt.load_pytree(path, new), new)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


# --------------------------------------------------------------------------- loader errors


@pytest.fixture
def saved(tmp_path):
    tree = {
        "w": np.ones((3, 4), np.float32),
        "b": np.zeros(3, np.float32),
        "keys": jax.random.split(jax.random.key(0), 3),
    }
    path = tmp_path / "ck.safetensors"
    ckpt.save_pytree(path, tree)
    return path, tree


def test_missing_key_is_named(saved):
    path, tree = saved
    template = {**tree, "extra_layer": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match=r"missing keys \['extra_layer'\]"):
        ckpt.load_pytree(path, template)


def test_unexpected_key_is_named(saved):
    path, tree = saved
    template = {k: v for k, v in tree.items() if k != "b"}
    with pytest.raises(ValueError, match=r"unexpected keys \['b'\]"):
        ckpt.load_pytree(path, template)


def test_wrong_shape_is_named(saved):
    path, tree = saved
    template = {**tree, "w": jax.ShapeDtypeStruct((3, 5), jnp.float32)}
    with pytest.raises(ValueError, match=r"'w': expected shape \(3, 5\) float32, found \(3, 4\) float32"):
        ckpt.load_pytree(path, template)


def test_wrong_dtype_is_named(saved):
    path, tree = saved
    template = {**tree, "b": np.zeros(3, np.int32)}
    with pytest.raises(ValueError, match=r"'b': expected shape \(3,\) int32, found \(3,\) float32"):
        ckpt.load_pytree(path, template)


def test_prng_key_mismatches_are_named(saved):
    path, tree = saved
    with pytest.raises(ValueError, match="'keys': expected shape .* found .*PRNG key data"):
        ckpt.load_pytree(path, {**tree, "keys": np.zeros((3, 2), np.uint32)})
    with pytest.raises(ValueError, match="'w': expected a PRNG key array"):
        ckpt.load_pytree(path, {**tree, "w": jax.random.split(jax.random.key(0), 3)})
    with pytest.raises(ValueError, match=r"'keys': expected PRNG key data of shape \(4, 2\)"):
        ckpt.load_pytree(path, {**tree, "keys": jax.random.split(jax.random.key(0), 4)})


def test_all_problems_reported_together(saved):
    path, tree = saved
    template = {"w": np.ones((2, 4), np.float32), "keys": tree["keys"], "new": np.zeros(1)}
    with pytest.raises(ValueError) as info:
        ckpt.load_pytree(path, template)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys ['new']" in message
    assert "unexpected keys ['b']" in message
    assert "'w': expected shape (2, 4)" in message


@pytest.mark.parametrize("cut", [0, 5, 40, -1])
def test_truncated_file_is_named(saved, cut):
    path, tree = saved
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors checkpoint"):
        ckpt.load_pytree(path, tree)
    with pytest.raises(ValueError, match="is not a readable safetensors checkpoint"):
        ckpt.read_metadata(path)


def test_garbage_and_trailing_bytes_are_named(saved):
    path, tree = saved
    data = path.read_bytes()
    path.write_bytes(data + b"\x00junk")
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors checkpoint"):
        ckpt.load_pytree(path, tree)
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors checkpoint"):
        ckpt.load_pytree(path, tree)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckpt.load_pytree(tmp_path / "nope.safetensors", {"a": np.zeros(1)})


def test_foreign_safetensors_file_loads_when_it_fits(tmp_path):
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(st_save({"layer/w": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    restored = ckpt.load_pytree(path, {"layer": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}})
    np.testing.assert_array_equal(restored["layer"]["w"], np.arange(6).reshape(2, 3))
    assert ckpt.read_metadata(path) == {}


# --------------------------------------------------------------------------- listing


def test_checkpoint_path_validates_epoch(tmp_path):
    assert ckpt.checkpoint_path(tmp_path, 42) == os.path.join(str(tmp_path), "epoch_000042.safetensors")
    assert ckpt.checkpoint_path("d", np.int64(1_234_567)).endswith("epoch_1234567.safetensors")
    for bad in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="epoch"):
            ckpt.checkpoint_path(tmp_path, bad)


def test_list_and_latest_ignore_unrelated_files(tmp_path):
    assert ckpt.list_checkpoints(tmp_path / "absent") == []
    assert ckpt.latest_checkpoint(tmp_path) is None
    for epoch in (10, 2, 1_000_000, 0):
        ckpt.save_pytree(ckpt.checkpoint_path(tmp_path, epoch), {"e": np.int32(epoch)})
    for junk in (
        ".epoch_000011.safetensors.abc123.tmp",  # an unfinished write
        "epoch_000099.safetensors.tmp",
        "epoch_12.safetensors",  # not canonical
        "epoch_000013.json",
        "notes.txt",
        "epoch_abc.safetensors",
    ):
        (tmp_path / junk).write_bytes(b"x")
    (tmp_path / "epoch_000050.safetensors").mkdir()  # a directory, not a checkpoint

    listed = ckpt.list_checkpoints(tmp_path)
    assert [epoch for epoch, _ in listed] == [0, 2, 10, 1_000_000]
    assert all(path == ckpt.checkpoint_path(tmp_path, epoch) for epoch, path in listed)
    assert ckpt.latest_checkpoint(tmp_path) == (1_000_000, ckpt.checkpoint_path(tmp_path, 1_000_000))
    epoch, path = ckpt.latest_checkpoint(tmp_path)
    assert ckpt.load_pytree(path, {"e": np.int32(0)})["e"] == epoch


def test_save_creates_parent_directories(tmp_path):
    path = ckpt.checkpoint_path(tmp_path / "run" / "ckpts", 1)
    ckpt.save_pytree(path, {"a": jnp.zeros(2)})
    assert ckpt.latest_checkpoint(tmp_path / "run" / "ckpts") == (1, path)


def test_restored_arrays_take_the_template_sharding(tmp_path):
    # Seeds sharded over every device (one on plain CPU; four with
    # XLA_FLAGS=--xla_force_host_platform_device_count=4).
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.array(jax.devices())
    sharding = NamedSharding(Mesh(devices, ("seed",)), PartitionSpec("seed"))
    n = 2 * len(devices)
    tree = {
        "w": jax.device_put(jnp.arange(3.0 * n).reshape(n, 3), sharding),
        "keys": jax.device_put(jax.random.split(jax.random.key(0), n), sharding),
    }
    path = tmp_path / "sharded.safetensors"
    ckpt.save_pytree(path, tree)
    restored = ckpt.load_pytree(path, tree)
    assert_bit_identical(restored, tree)
    assert restored["w"].sharding == sharding and restored["keys"].sharding == sharding
