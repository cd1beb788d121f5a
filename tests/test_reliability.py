"""Nothing silently wrong: verified checkpoints, honest resume, one writer per folder.

Each case is a regression test of a way a run could once end with wrong results and no
error: a flipped bit, swapped tensors, a checkpoint of another run, a file whose name lies
about its epoch, a truncated file, a killed write, two writers in one folder.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cfgzero_theory import GaussianMixture, checkpoint
from cfgzero_theory.models import NetworkConfig
from cfgzero_theory.training import TrainConfig, run_fingerprint, train, training_state_path

MIXTURE = GaussianMixture([0.5, 0.5], [[2.0, 0.0], [-2.0, 0.0]], [np.diag([1.0, 0.25])] * 2, [0, 1])
NET = NetworkConfig(dim=2, num_classes=2, width=16, depth=2)
CONFIG = TrainConfig(epochs=4, dataset_size=128, batch_size=64, num_seeds=1, checkpoint_epochs=(0, 2))


def _params(result, epoch):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(result.networks[epoch].state)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run, without files."""
    return _params(train(MIXTURE, NET, CONFIG, progress=False), CONFIG.epochs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    train(MIXTURE, NET, CONFIG, out_dir=str(folder), progress=False)
    return folder


@pytest.fixture
def run_dir(finished, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    return folder


def _resume(folder, *messages):
    """Rerun in ``folder``; every message must appear among the warnings it raises."""
    with pytest.warns(UserWarning) as caught:
        result = train(MIXTURE, NET, CONFIG, out_dir=str(folder), progress=False)
    text = " | ".join(str(w.message) for w in caught)
    for message in messages:
        assert message in text, text
    return _params(result, CONFIG.epochs)


def _tensor_span(path, name):
    """Byte range of tensor ``name``'s data in a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    begin, end = header[name]["data_offsets"]
    return 8 + size + begin, 8 + size + end, header, size


# ----------------------------------------------------------------------------- verified files
def test_a_flipped_bit_is_named_and_never_resumed_from(run_dir, reference):
    path = checkpoint.checkpoint_path(run_dir, 2)
    name = sorted(json.loads(checkpoint.read_metadata(path)["checkpoint.digests"]))[0]
    begin, _, _, _ = _tensor_span(path, name)
    data = bytearray(open(path, "rb").read())
    data[begin + 3] ^= 0x10
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=f"tensor '{name}' does not match its stored digest"):
        checkpoint.load_pytree(path, _template(run_dir))
    assert _same(_resume(run_dir, "skipping", "restarts from epoch 0"), reference)


def _template(folder):
    """A template for the network files of ``folder``: the file's own arrays (shapes and dtypes)."""
    from safetensors.numpy import load_file

    arrays = load_file(str(checkpoint.checkpoint_path(folder, 0)))
    nested: dict = {}
    for name, array in arrays.items():
        node = nested
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jax.ShapeDtypeStruct(array.shape, array.dtype)
    return nested


def test_swapped_tensors_and_nan_overwrites_are_caught(tmp_path):
    tree = {"a": np.arange(6, dtype=np.float32), "b": np.arange(6, 12).astype(np.float32)}
    path = str(tmp_path / "x.safetensors")
    checkpoint.save_pytree(path, tree)
    template = {k: jax.ShapeDtypeStruct((6,), np.float32) for k in tree}
    # swap the two tensors' offsets in the header: same shapes, so only the digests can tell
    a_begin, a_end, header, size = _tensor_span(path, "a")
    header["a"]["data_offsets"], header["b"]["data_offsets"] = header["b"]["data_offsets"], header["a"]["data_offsets"]
    raw = open(path, "rb").read()
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    open(path, "wb").write(raw[:8] + encoded + raw[8 + size:])
    with pytest.raises(ValueError, match="does not match its stored digest"):
        checkpoint.load_pytree(path, template)
    checkpoint.save_pytree(path, tree)
    begin, _, _, _ = _tensor_span(path, "b")
    raw = bytearray(open(path, "rb").read())
    raw[begin:begin + 4] = np.float32(np.nan).tobytes()
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="tensor 'b' does not match"):
        checkpoint.load_pytree(path, template)


def test_files_without_digests_load_with_a_warning(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "old.safetensors")
    save_file({"a": np.ones(3, np.float32)}, path, metadata={"checkpoint.format": "cfgzero_theory.checkpoint/1",
                                                              "checkpoint.prng_keys": "{}"})
    with pytest.warns(UserWarning, match="unverified"):
        loaded = checkpoint.load_pytree(path, {"a": jax.ShapeDtypeStruct((3,), np.float32)})
    np.testing.assert_array_equal(loaded["a"], 1.0)


# ----------------------------------------------------------------------------- honest resume
def test_fingerprint_sees_covariance_eigenvectors_and_every_setting():
    rotated = GaussianMixture([0.5, 0.5], [[2.0, 0.0], [-2.0, 0.0]], [np.diag([0.25, 1.0])] * 2, [0, 1])
    base = run_fingerprint(NET, CONFIG, MIXTURE)
    assert base == run_fingerprint(NET, CONFIG, MIXTURE)
    assert base != run_fingerprint(NET, CONFIG, rotated)  # same eigenvalues, other eigenvectors
    assert base != run_fingerprint(NET, TrainConfig(**{**CONFIG.__dict__, "data_seed": 1}), MIXTURE)


def test_a_run_of_other_eigenvectors_is_refused(run_dir):
    rotated = GaussianMixture([0.5, 0.5], [[2.0, 0.0], [-2.0, 0.0]], [np.diag([0.25, 1.0])] * 2, [0, 1])
    with pytest.raises(ValueError, match="different run configuration"):
        train(rotated, NET, CONFIG, out_dir=str(run_dir), progress=False)


def test_a_file_whose_name_lies_about_its_epoch_is_skipped(run_dir, reference):
    shutil.copyfile(checkpoint.checkpoint_path(run_dir, 2), checkpoint.checkpoint_path(run_dir, 4))
    assert _same(_resume(run_dir, "stores epoch 2, not the epoch 4", "restarts from epoch 0"), reference)


def test_a_truncated_old_checkpoint_does_not_block_resume(run_dir, reference):
    path = checkpoint.checkpoint_path(run_dir, 0)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert _same(_resume(run_dir, f"skipping {path}"), reference)


def test_a_truncated_training_state_falls_back_to_a_fresh_start(run_dir, reference):
    path = training_state_path(run_dir)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:100])
    assert _same(_resume(run_dir, "training state is unusable"), reference)


def test_temporaries_of_killed_writes_are_removed_at_start(run_dir, reference):
    stale = run_dir / ".epoch_000002.safetensors.0123456789ab.tmp"
    stale.write_bytes(b"x" * 1000)
    unrelated = run_dir / "notes.tmp"
    unrelated.write_text("mine")
    assert _same(_resume(run_dir, "removed the temporary file"), reference)
    assert not stale.exists() and unrelated.exists()


KILLED_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from cfgzero_theory import checkpoint
    path = sys.argv[1]
    for i in range(10**6):
        checkpoint.save_pytree(path, {"x": np.full(4_000_000, i, np.float32)})
        if i == 0:
            print("ready", flush=True)
    """
)


def test_a_write_killed_at_any_moment_leaves_a_verified_file(tmp_path):
    path = str(tmp_path / "state.safetensors")
    template = {"x": jax.ShapeDtypeStruct((4_000_000,), np.float32)}
    for delay in (0.05, 0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, path], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        x = checkpoint.load_pytree(path, template)["x"]  # digests verified: a complete file
        assert np.all(x == x[0])
        checkpoint.remove_temporaries(tmp_path)
        assert os.listdir(tmp_path) == ["state.safetensors"]


# ----------------------------------------------------------------------------- one writer
def test_a_second_writer_is_refused_with_the_holder_named(run_dir):
    with checkpoint.FolderLock(run_dir):
        with pytest.raises(ValueError, match=f"in use by process {os.getpid()}"):
            train(MIXTURE, NET, CONFIG, out_dir=str(run_dir), progress=False)
    assert not (run_dir / ".lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}))
    with checkpoint.FolderLock(tmp_path) as lock:
        assert lock.stale_holder["pid"] == int(dead.stdout)
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------- boundaries
def test_samplers_refuse_what_they_cannot_sample():
    import jax.numpy as jnp

    from cfgzero_theory import make_rule, mixtures, sampling
    from cfgzero_theory.schedules import FlowMatchEuler, FlowSchedule

    gm = mixtures.class_conditional_2d()
    x0 = jnp.zeros((4, 2))
    rule = make_rule("cfg", 2.0)
    bad_times = {"decreasing": [0.0, 0.6, 0.3, 1.0], "NaN": [0.0, float("nan"), 1.0], "out of range": [-0.5, 0.5, 1.0]}
    for times in bad_times.values():
        with pytest.raises(ValueError, match="times must be finite and strictly increasing"):
            sampling.sample(GaussianMixture.velocity, gm, x0, jnp.asarray(times), 1, rule)
    labels, null = sampling.mixture_contexts(1, 4)
    for sigmas in ([0.2, 0.6, 0.0], [1.0, float("nan"), 0.0]):
        schedule = FlowSchedule(jnp.asarray(sigmas), jnp.asarray(sigmas[:-1]) * 1000)
        with pytest.raises(ValueError, match="sigmas must be finite and strictly decreasing"):
            sampling.sample_flow(sampling.mixture_flow_model, gm, x0, schedule, labels, null, rule)
    schedule = FlowSchedule(jnp.asarray([1.0, 0.5, 0.0]), jnp.asarray([1000.0, 500.0]))
    with pytest.raises(ValueError, match="label values \\[9\\]"):
        sampling.sample_flow(sampling.mixture_flow_model, gm, x0, schedule, *sampling.mixture_contexts(9, 4), rule)
    with pytest.raises(ValueError, match="make_rule\\('cfg-zero-star', scale\\)"):
        sampling.sample_flow(sampling.mixture_flow_model, gm, x0, schedule, labels, null, "cfg-zero-star")
    with pytest.raises(ValueError, match="solver must be a FlowSolver"):
        sampling.sample_flow(sampling.mixture_flow_model, gm, x0, schedule, labels, null, rule, solver="euler")
    out = sampling.sample_flow(sampling.mixture_flow_model, gm, x0, schedule, labels, null, rule, solver=FlowMatchEuler())
    assert np.all(np.isfinite(out.samples))


def test_wrong_types_are_value_errors_naming_the_argument(tmp_path):
    from cfgzero_theory import schedules, sampling

    for call, match in [
        (lambda: checkpoint.save_pytree(tmp_path / "x.safetensors", {0: np.ones(2), "0": np.ones(2)}), "dict keys"),
        (lambda: schedules.flow_match_euler_schedule(4, dtype="banana"), "dtype must be a floating dtype"),
        (lambda: sampling.time_grid(4, dtype="int32"), "dtype must be a floating dtype"),
        (lambda: checkpoint.checkpoint_path(tmp_path, True), "epoch must be an integer"),
        (lambda: sampling.PerturbedGuidance(lambda *a: 0, 2.8, 0.5, 0.2), "start must not exceed stop"),
        (lambda: sampling.PerturbedGuidance(lambda *a: 0, float("nan")), "scale must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    assert checkpoint.checkpoint_path(tmp_path, np.int64(3)).endswith("epoch_000003.safetensors")


CONCURRENT_JSON_WRITER = textwrap.dedent(
    """
    import sys
    from experiments._common import write_json
    path, tag = sys.argv[1], sys.argv[2]
    for i in range(300):
        write_json(path, {"writer": tag, "i": i, "padding": [i] * 2000})
    """
)


def test_concurrent_json_writers_never_expose_a_partial_file(tmp_path):
    path = str(tmp_path / "result.json")
    writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_JSON_WRITER, path, tag]) for tag in "ab"]
    partial = reads = 0
    while any(w.poll() is None for w in writers):
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            continue
        reads += 1
        try:
            json.loads(text)
        except ValueError:
            partial += 1
    assert [w.returncode for w in writers] == [0, 0]
    assert reads > 0 and partial == 0
    assert json.load(open(path))["i"] == 299
    assert os.listdir(tmp_path) == ["result.json"]
