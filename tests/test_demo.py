"""The lecture demo: the trajectory animation and the live guidance widget.

Everything runs tiny (a few points, a few steps, small frames) so the file takes seconds;
what the frames look like at full size is checked by eye, not here.
"""

import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cfgzero_theory import CFG, CFGZeroStar, checkpoint, mixtures
from cfgzero_theory.animation import animate_trajectories, frame_count, frame_size
from cfgzero_theory.mixture import GaussianMixture
from cfgzero_theory.models import Network, NetworkConfig, init_networks, network_velocity, select

NET_CONFIG = NetworkConfig(dim=2, num_classes=3, width=16, depth=2)
TINY = dict(num_points=24, num_steps=3, res=12, dpi=30, panel_size=2.0, hold=0.5)


@pytest.fixture(scope="module")
def mixture():
    return mixtures.class_conditional_2d()


@pytest.fixture(scope="module")
def networks():
    """Three "epochs" of two seeds each: freshly initialised networks (no training needed here)."""
    stack = init_networks(NET_CONFIG, jax.random.split(jax.random.key(0), 6))
    return {epoch: Network(stack.graphdef, jax.tree_util.tree_map(lambda a: a[2 * epoch : 2 * epoch + 2], stack.state))
            for epoch in (0, 1, 2)}


def _only_files(folder):
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------- animation
def test_animation_writes_a_gif_with_one_frame_per_state(mixture, tmp_path):
    path = tmp_path / "sub" / "demo"
    written = animate_trajectories(mixture, 1, [CFG(4.0), CFGZeroStar(4.0)], path, frames_per_step=2,
                                   formats=("gif",), **TINY)
    assert written == [f"{path}.gif"]
    with Image.open(written[0]) as gif:
        assert gif.n_frames == frame_count(3, 2) == 7
        assert gif.size == frame_size(2, 2.0, 30) == (120, 87)
        durations = []
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
    assert durations[-1] > durations[0]  # the last frame is held
    assert _only_files(path.parent) == ["demo.gif"]  # no temporary file left behind


def test_animation_writes_mp4_only_where_ffmpeg_is(mixture, tmp_path):
    from matplotlib import animation

    rules = {"plain CFG": CFG(4.0)}
    written = animate_trajectories(mixture, 0, rules, tmp_path / "clip", **TINY)
    if animation.writers.is_available("ffmpeg"):
        assert written == [f"{tmp_path / 'clip'}.gif", f"{tmp_path / 'clip'}.mp4"]
        assert os.path.getsize(written[1]) > 0
    else:  # honest skip: no MP4, and the returned list says so
        assert written == [f"{tmp_path / 'clip'}.gif"]
        assert not (tmp_path / "clip.mp4").exists()
    assert _only_files(tmp_path) == sorted(os.path.basename(p) for p in written)


def test_animation_of_a_network(mixture, networks, tmp_path):
    written = animate_trajectories(mixture, 2, [CFGZeroStar(3.0, 2)], tmp_path / "net", velocity_fn=network_velocity,
                                   params=select(networks[1], 0), formats=("gif",), **TINY)
    with Image.open(written[0]) as gif:
        assert gif.n_frames == frame_count(3)
        assert gif.size == frame_size(1, 2.0, 30)


@pytest.mark.parametrize(
    "change, argument",
    [
        (dict(mixture=None), "mixture"),
        (dict(label=7), "label"),
        (dict(label=1.5), "label"),
        (dict(rules=[]), "rules"),
        (dict(rules=[3]), "rules"),
        (dict(path="out.gif"), "path"),
        (dict(num_points=0), "num_points"),
        (dict(num_steps=0), "num_steps"),
        (dict(fps=0), "fps"),
        (dict(trail=-1), "trail"),
        (dict(frames_per_step=0), "frames_per_step"),
        (dict(solver="rk4"), "solver"),
        (dict(formats=("avi",)), "formats"),
        (dict(grid=((0.0, 0.0), (0.0, 1.0))), "grid"),
        (dict(velocity_fn=network_velocity), "params"),
        # bool is never a number; NaN / inf are refused
        (dict(label=True), "label"),
        (dict(num_points=True), "num_points"),
        (dict(fps=float("inf")), "fps"),
        (dict(hold=float("nan")), "hold"),
        (dict(dpi=30.0), "dpi"),
    ],
)
def test_animation_rejects_bad_arguments(mixture, tmp_path, change, argument):
    kwargs = dict(mixture=mixture, label=1, rules=[CFG(4.0)], path=tmp_path / "bad", **TINY)
    kwargs.update(change)
    if kwargs["mixture"] is None:
        kwargs["mixture"] = GaussianMixture(np.ones(1), np.zeros((1, 3)), np.eye(3)[None])  # 3-D
    with pytest.raises(ValueError, match=argument):
        animate_trajectories(**kwargs)
    assert _only_files(tmp_path) == []


# ----------------------------------------------------------------------------- widget
def test_widget_names_the_install_command_without_ipywidgets(mixture, monkeypatch):
    from cfgzero_theory.widget import guidance_widget

    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[demo\]"'):
        guidance_widget(mixture, 1)


def _snapshot(box):
    return np.array(box.state["samples"]), box.children[-2].value


def _changed(before, box):
    samples, png = _snapshot(box)
    return not np.allclose(before[0], samples) and before[1] != png


def test_widget_exact_field_rerenders_on_every_slider(mixture):
    pytest.importorskip("ipywidgets")
    from cfgzero_theory.widget import guidance_widget

    box = guidance_widget(mixture, 1, num_points=64, num_trajectories=4, num_steps=6, res=16)
    assert set(box.controls) == {"rule", "scale", "zero_init_steps"}
    assert box.state["first_step"]["learning_error"] < 1e-4  # the exact field has no learning error
    for name, value in (("scale", 2.0), ("zero_init_steps", 3)):
        before = _snapshot(box)
        box.controls[name].value = value
        assert _changed(before, box), name
    assert box.state["per_step"]["zeroed"].tolist() == [True] * 3 + [False] * 3
    assert box.state["rule"] == CFGZeroStar(2.0, 3)
    assert not box.controls["zero_init_steps"].disabled


def test_widget_networks_rerender_on_w_k_epoch_and_seed(mixture, networks):
    pytest.importorskip("ipywidgets")
    from cfgzero_theory.widget import guidance_widget

    box = guidance_widget(mixture, 1, networks=networks, num_points=64, num_trajectories=4, num_steps=6, res=16)
    assert box.controls["epoch"].value == 1  # the first epoch after initialisation
    assert box.state["first_step"]["learning_error"] > 0
    for name, value in (("scale", 6.0), ("zero_init_steps", 0), ("epoch", 2), ("seed", 1)):
        before = _snapshot(box)
        box.controls[name].value = value
        assert _changed(before, box), name
        assert np.all(np.isfinite(box.state["samples"]))
    assert box.state["field"] == "network, epoch 2, seed 1"
    assert set(box.state["metrics"]) == {"nll", "nll_floor", "jsd", "precision"}


def test_widget_loads_a_checkpoint_directory(mixture, tmp_path):
    pytest.importorskip("ipywidgets")
    from cfgzero_theory import training
    from cfgzero_theory.widget import guidance_widget, networks_from_checkpoints

    # checkpoints in the format training.train(out_dir=...) writes, filled with random numbers
    # (no time spent on initialising or training networks)
    config = training.TrainConfig(epochs=2, dataset_size=128, batch_size=64, num_seeds=2, checkpoint_epochs=(0, 1, 2))
    run = training._run_metadata(NET_CONFIG, config, mixture)
    shapes = jax.eval_shape(lambda keys: training.initial_state(NET_CONFIG, config, keys)[1], jax.random.split(jax.random.key(0), 2))
    states = {}
    for epoch in config.checkpoint_epochs:
        rng = np.random.default_rng(epoch)
        states[epoch] = jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
        tree = {"networks": states[epoch].params, "losses": np.zeros((config.epochs, config.num_seeds), np.float32)}
        checkpoint.save_pytree(checkpoint.checkpoint_path(tmp_path, epoch), tree, {"run": run, "epoch": str(epoch)})

    loaded = networks_from_checkpoints(tmp_path, mixture)
    assert list(loaded) == [0, 1, 2]
    for epoch, net in loaded.items():
        for a, b in zip(jax.tree_util.tree_leaves(net.state), jax.tree_util.tree_leaves(states[epoch].params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="different mixture"):
        networks_from_checkpoints(tmp_path, mixtures.class_conditional_2d(radius=4.0))
    with pytest.raises(ValueError, match="no checkpoints"):
        networks_from_checkpoints(tmp_path / "empty")

    box = guidance_widget(mixture, 1, networks=str(tmp_path), num_points=64, num_trajectories=4, num_steps=6, res=16)
    assert box.controls["epoch"].options == (0, 1, 2)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(label=9), "label"),
        (dict(rule="DDIM"), "rule"),
        (dict(scale=20.0), "scale"),
        (dict(zero_init_steps=-1), "zero_init_steps"),
        (dict(num_points=0), "num_points"),
        (dict(solver="rk4"), "solver"),
        (dict(label=True), "label"),
        (dict(scale=True), "scale"),
        (dict(max_scale=float("inf")), "max_scale"),
        (dict(zero_init_steps=True), "zero_init_steps"),
        (dict(num_steps=np.float64(6.0)), "num_steps"),
        (dict(networks={}), "networks"),
        (dict(networks={0: "weights"}), "networks"),
        (dict(epoch=3), "epoch"),
    ],
)
def test_widget_rejects_bad_arguments(mixture, kwargs, argument):
    pytest.importorskip("ipywidgets")
    from cfgzero_theory.widget import guidance_widget

    kwargs = {"label": 1, **kwargs}
    with pytest.raises(ValueError, match=argument):
        guidance_widget(mixture, **kwargs)


def test_widget_offers_kinds_of_the_one_vocabulary():
    from cfgzero_theory.guidance import KIND_LABELS, KINDS
    from cfgzero_theory.widget import WIDGET_KINDS

    assert set(WIDGET_KINDS) <= set(KINDS) and all(kind in KIND_LABELS for kind in WIDGET_KINDS)


