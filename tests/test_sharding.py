"""Weight sharding over a device mesh (:mod:`cfgzero_theory.ports.sharding`) and the loaders' ``sharding=``.

The rule is tested as a pure function of ``(shape, n)``; the layouts on a mesh run in one
subprocess with four fake CPU devices (``--xla_force_host_platform_device_count=4``): tiny
random diffusers / transformers folders (an SD3 transformer, a VAE, a CLIP text tower) saved
here are loaded there with and without ``sharding=mesh_sharding(min_size=1024)`` (the tiny
tensors are all below the default ``2**14``): every parameter split as :func:`shard_axis`
says, with the unsharded values.  The transformer's outputs and samples in a three-step
CFG-Zero* ``sample_flow`` run (``sd3_model_fn``) agree sharded and unsharded to ``1e-5``
relative to their scale (float32; only a split contraction axis changes the order of a sum).
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from text_encoder_helpers import perturbed

from cfgzero_theory.sd3 import load_clip_text_encoder, load_sd3_transformer, load_t5_encoder, load_vae
from cfgzero_theory.ports.sharding import ParamSharding, describe_sharding, mesh_sharding, shard_axis, shard_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
    pos_embed_max_size=16,
)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    latent_channels=16, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
)
CLIP = dict(
    vocab_size=99, hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu", eos_token_id=2, bos_token_id=97,
    pad_token_id=98,
)


@pytest.mark.parametrize("shape, n, min_size, axis", [
    ((1536, 6144), 4, 2**14, 1),      # the larger axis
    ((6144, 1536), 4, 2**14, 0),      # the larger axis, even when it is the input features
    ((1536, 1536), 4, 2**14, 1),      # tie: the last axis (output features of an (in, out) kernel)
    ((99, 4096), 4, 2**14, 1),        # only one divisible axis
    ((4099, 4096), 4, 2**14, 1),      # the largest axis is not divisible: the largest that is
    ((3, 3, 512, 512), 8, 2**14, 3),  # HWIO conv kernel: its output channels
    ((1, 9216, 1536), 4, 2**14, 1),   # SD3's positional table: the token axis
    ((1536,), 4, 2**14, None),        # a bias: too small
    ((127, 129), 4, 2**14, None),     # large, but no axis divisible
    ((1536, 6144), 1, 2**14, None),   # one device: nothing to split
    ((), 4, 0, None),                 # a scalar has no axis
    ((8, 0), 4, 0, 0),                # an empty axis is never chosen
])
def test_shard_axis_rule(shape, n, min_size, axis):
    assert shard_axis(shape, n, min_size) == axis


def test_shard_axis_threshold_and_bad_arguments():
    assert shard_axis((127, 128), 4) is None and shard_axis((128, 128), 4) == 1  # 2**14 elements: split
    for bad in [0, 2.0, True]:
        with pytest.raises(ValueError, match="n must"):
            shard_axis((8, 8), bad)
    with pytest.raises(ValueError, match="min_size"):
        shard_axis((8, 8), 2, min_size=-1)


def test_param_sharding_on_one_device_and_bad_arguments():
    sharding = mesh_sharding()
    assert sharding.axis == "model" and sharding.axis_size == len(jax.devices()) and sharding.min_size == 2**14
    assert ParamSharding(sharding.mesh).axis == "model"  # default: the mesh's first axis
    spec = sharding.sharding_for("blocks.0.ff.kernel", (4096, 4096))
    assert isinstance(spec, NamedSharding) and spec.mesh == sharding.mesh
    with pytest.raises(ValueError, match="axis must be one of"):
        ParamSharding(sharding.mesh, "data")
    with pytest.raises(ValueError, match="mesh must be"):
        ParamSharding("model")
    with pytest.raises(ValueError, match="min_size"):
        mesh_sharding(min_size=1.5)
    with pytest.raises(ValueError, match="devices must not be empty"):
        mesh_sharding([])
    with pytest.raises(ValueError, match="'x.kernel': shape must be"):
        sharding.sharding_for("x.kernel", (4, -1))
    with pytest.raises(ValueError, match="'x.kernel': shape must be"):
        sharding.sharding_for("x.kernel", (4, True))
    with pytest.raises(ValueError, match="min_size"):
        mesh_sharding(min_size=True)
    assert mesh_sharding(min_size=np.int64(8)).min_size == 8 and type(mesh_sharding(min_size=np.int64(8)).min_size) is int
    assert shard_axis((np.int64(256), 256), np.int64(1), np.int32(0)) is None


def test_shard_state_keeps_variables_and_describe_counts_bytes():
    model = nnx.Linear(64, 256, rngs=nnx.Rngs(0))
    state = shard_state(nnx.state(model), mesh_sharding(min_size=1024))
    assert isinstance(state["kernel"], nnx.Param)
    nnx.update(model, state)
    summary = describe_sharding(nnx.state(model))
    n = len(jax.devices())
    assert summary["arrays"] == 2 and summary["total_bytes"] == (64 * 256 + 256) * 4
    assert summary["sharded"] == (1 if n > 1 else 0) and summary["replicated"] == 2 - summary["sharded"]
    assert summary["max_device_bytes"] == (64 * 256 // n + 256) * 4 and len(summary["device_bytes"]) == n
    plain = shard_state({"w": np.ones((4, 4), np.float32)}, mesh_sharding())
    assert plain["w"].sharding.spec == PartitionSpec(None, None)
    with pytest.raises(ValueError, match="'w' is a ndarray"):
        describe_sharding({"w": np.ones(3)})
    with pytest.raises(ValueError, match="param_sharding must be"):
        shard_state(state, "fsdp")


@pytest.mark.parametrize("load", [load_sd3_transformer, load_vae, load_clip_text_encoder, load_t5_encoder])
def test_bad_sharding_argument_names_it(tmp_path, load):
    with pytest.raises(ValueError, match="sharding must be a .*ParamSharding or None, got 'fsdp'"):
        load(tmp_path, sharding="fsdp")


FOUR_DEVICES = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from cfgzero_theory import presets
    from cfgzero_theory.sampling import sample_flow
    from cfgzero_theory.schedules import flow_match_euler_schedule
    from cfgzero_theory.sd3 import load_clip_text_encoder, load_sd3_transformer, load_vae, sd3_model_fn
    from cfgzero_theory.ports.sharding import describe_sharding, mesh_sharding, shard_axis, shard_state

    assert len(jax.devices()) == 4
    transformer_dir, vae_dir, clip_dir, pipeline_dir = sys.argv[1:]
    sharding = mesh_sharding(min_size=1024)

    def close(a, b):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and np.abs(b).max() > 0.1
        err = np.abs(a - b).max()
        assert err <= 1e-5 * np.abs(b).max(), (err, np.abs(b).max())

    def check_layout(model):
        split = 0
        for path, var in nnx.to_flat_state(nnx.state(model)):
            arr = var[...]
            axis = shard_axis(arr.shape, 4, 1024)
            shard = arr.sharding.shard_shape(arr.shape)
            assert len(arr.addressable_shards) == 4, path
            if axis is None:
                assert arr.sharding.is_fully_replicated and shard == arr.shape, path
            else:
                split += 1
                assert shard[axis] * 4 == arr.shape[axis] and len(arr.sharding.device_set) == 4, path
                assert [s.data.shape for s in arr.addressable_shards] == [shard] * 4, path
        summary = describe_sharding(nnx.state(model))
        assert split > 0 and summary["sharded"] == split
        assert summary["sharded"] + summary["replicated"] == summary["arrays"]
        assert summary["max_device_bytes"] < summary["total_bytes"], summary
        return summary

    def same_values(a, b):
        for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
            np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))

    # SD3 transformer: layout, values, the model outputs and samples of a three-step CFG-Zero* run
    plain, split = load_sd3_transformer(transformer_dir), load_sd3_transformer(transformer_dir, sharding=sharding)
    summary = check_layout(split)
    same_values(split, plain)
    in_memory = shard_state(nnx.state(plain), sharding)  # the same layout for a module built in memory
    for (path, a), (_, b) in zip(nnx.to_flat_state(in_memory), nnx.to_flat_state(nnx.state(split))):
        assert a[...].sharding.is_equivalent_to(b[...].sharding, b[...].ndim), path
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32)
    embeds = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    pooled = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
    model_fn = sd3_model_fn(plain)
    rule = presets.get("sd3").rule("cfg-zero-star", scale=4.0, zero_init_steps=1)
    schedule = flow_match_euler_schedule(3, shift=3.0)
    context, uncond = (embeds, pooled), (jnp.zeros_like(embeds), jnp.zeros_like(pooled))
    ours, reference = (sample_flow(model_fn, nnx.state(m), x, schedule, context, uncond, rule, return_trajectory=True)
                       for m in (split, plain))
    close(ours.v_cond[0], reference.v_cond[0])  # the transformer's output on the same inputs
    close(ours.v_uncond[0], reference.v_uncond[0])
    close(ours.samples, reference.samples)

    # VAE and CLIP text tower (intermediate size 37: its MLP kernels split along the 32 features)
    plain, split = load_vae(vae_dir), load_vae(vae_dir, sharding=sharding)
    check_layout(split)
    same_values(split, plain)
    plain, split = load_clip_text_encoder(clip_dir), load_clip_text_encoder(clip_dir, sharding=sharding)
    check_layout(split)
    same_values(split, plain)
    assert split.layers[0].mlp.fc1.kernel[...].sharding.spec == jax.sharding.PartitionSpec("model", None)

    # the whole pipeline loaded sharded (min_size 256: most of the tiny tensors split) samples the same images
    from cfgzero_theory.sd3.pipeline import SD3Pipeline
    pipes = [SD3Pipeline.from_pretrained(pipeline_dir, sharding=s) for s in (mesh_sharding(min_size=256), None)]
    assert describe_sharding(nnx.state(pipes[0].vae))["sharded"] > 0
    (lat_split, img_split), (lat_plain, img_plain) = (
        p("a photo of a cat", guidance="cfg-zero-star", scale=4.0, num_steps=2, max_sequence_length=8) for p in pipes)
    close(lat_split, lat_plain)
    close(img_split, img_plain)
    print("ok", summary["max_device_bytes"], summary["total_bytes"])
    """
)


def test_loaders_shard_over_four_devices(torch, diffusers, tmp_path):
    """Tiny folders (and a tiny pipeline) saved here, loaded sharded and unsharded in a subprocess
    with four CPU devices."""
    import transformers

    torch.manual_seed(0)
    with torch.no_grad():
        for model, folder in [(diffusers.SD3Transformer2DModel(**TRANSFORMER), "transformer"),
                              (diffusers.AutoencoderKL(**VAE), "vae")]:
            perturbed(torch, model).save_pretrained(tmp_path / folder, safe_serialization=True)
        clip = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP))
        perturbed(torch, clip).save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    from cfgzero_theory.sd3.tiny import build_tiny_random_pipeline

    build_tiny_random_pipeline(tmp_path / "pipeline")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    folders = [str(tmp_path / name) for name in ("transformer", "vae", "text_encoder", "pipeline")]
    done = subprocess.run([sys.executable, "-c", FOUR_DEVICES, *folders], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    assert words[0] == "ok" and int(words[1]) < int(words[2])  # one device's bytes < one copy of the weights


FLUX_FOUR_DEVICES = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from flax import nnx
    from cfgzero_theory import pipelines
    from cfgzero_theory.ports.sharding import describe_sharding, mesh_sharding

    assert len(jax.devices()) == 4
    folder = sys.argv[1]
    split = pipelines.from_pretrained(folder, sharding=mesh_sharding(min_size=256), compilation_cache=False)
    plain = pipelines.from_pretrained(folder, compilation_cache=False)
    summary = describe_sharding(nnx.state(split.transformer))
    assert summary["sharded"] > 0, summary
    options = dict(num_steps=2, height=32, width=48, max_sequence_length=8)
    (lat_split, img_split), (lat_plain, img_plain) = (p("a photo of a cat", **options) for p in (split, plain))
    scale = max(1.0, float(np.abs(np.asarray(lat_plain)).max()))
    assert float(np.abs(np.asarray(lat_split) - np.asarray(lat_plain)).max()) <= 1e-4 * scale
    assert float(np.abs(np.asarray(img_split) - np.asarray(img_plain)).max()) <= 1e-4
    print("ok", summary["max_device_bytes"], summary["total_bytes"])
    """
)


def test_flux_pipeline_shards_over_four_devices(torch, diffusers, tmp_path):
    """A tiny Flux pipeline loaded with its weights split over four CPU devices as they are read
    samples what the unsharded one samples."""
    from cfgzero_theory.flux.tiny import build_tiny_random_pipeline

    build_tiny_random_pipeline(tmp_path / "flux")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", FLUX_FOUR_DEVICES, str(tmp_path / "flux")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    assert words[0] == "ok" and int(words[1]) < int(words[2])


WAN_FOUR_DEVICES = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from cfgzero_theory import pipelines
    from cfgzero_theory.ports.sharding import ParamSharding, describe_sharding

    assert len(jax.devices()) == 4
    folder = sys.argv[1]
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    split = pipelines.from_pretrained(folder, sharding=ParamSharding(mesh, "model", 256), compilation_cache=False)
    plain = pipelines.from_pretrained(folder, compilation_cache=False)
    summary = describe_sharding(nnx.state(split.transformer))
    assert summary["sharded"] > 0, summary
    prompts = ["a photo of a cat", "a red dog"]
    options = dict(num_steps=2, num_frames=5, height=32, width=48)
    lat_split, vid_split = split(prompts, batch_sharding=NamedSharding(mesh, PartitionSpec("data")), **options)
    assert lat_split.sharding.spec[0] == "data", lat_split.sharding
    lat_plain, vid_plain = plain(prompts, **options)
    scale = max(1.0, float(np.abs(np.asarray(lat_plain)).max()))
    assert float(np.abs(np.asarray(lat_split) - np.asarray(lat_plain)).max()) <= 1e-4 * scale
    assert float(np.abs(np.asarray(vid_split) - np.asarray(vid_plain)).max()) <= 1e-4
    print("ok", summary["max_device_bytes"], summary["total_bytes"])
    """
)


def test_wan_pipeline_shards_weights_and_the_guidance_batch_over_four_devices(torch, diffusers, tmp_path):
    """A tiny Wan T2V pipeline on a 2 × 2 mesh — weights split over ``model`` as they are read,
    the guidance batch over ``data`` — samples what the unsharded one samples."""
    from cfgzero_theory.wan.tiny import build_random_pipeline

    build_random_pipeline(tmp_path / "wan", "tiny")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", WAN_FOUR_DEVICES, str(tmp_path / "wan")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    assert words[0] == "ok" and int(words[1]) < int(words[2])
