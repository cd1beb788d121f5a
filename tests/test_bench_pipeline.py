"""Smoke test of ``python -m experiments.bench_pipeline --quick``: it runs, reports, and agrees.

No timing thresholds: only the report's structure, the signs of the timings, the ratios'
definition (diffusers / ours) and the agreement of the two pipelines' final latents (tiny
config, float32, CPU) are checked.
"""

import math

import pytest
from bench_helpers import positive, strict_loads


SECTIONS = ("step", "loop_per_step", "encode", "denoise", "decode", "end_to_end")


def test_bench_pipeline_quick_reports_and_agrees(torch, diffusers, tmp_path):
    from experiments import bench_pipeline

    out = tmp_path / "sub" / "pipeline.json"
    returned = bench_pipeline.main(["--quick", "--device", "cpu", "--out", str(out)])
    report = strict_loads(out.read_text())
    assert report == returned

    for key in ("benchmark", "jax_version", "jax_backend", "jax_device_kind", "torch_version", "diffusers_version",
                "torch_num_threads", "cpu_cores", "platform", "device", "dtype", "settings", "definitions", "configs",
                "runtime_s"):
        assert key in report, key
    assert report["benchmark"] == "bench_pipeline" and report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["settings"]["quick"] is True and report["settings"]["configs"] == ["tiny"]
    assert report["settings"]["steps"] == 2 and report["settings"]["repeats"] == 1

    [tiny] = report["configs"]
    assert tiny["config"] == "tiny" and tiny["steps"] == 2 and tiny["batch"] == 1 and tiny["model_batch"] == 2
    assert tiny["latent_shape"] == [1, 16, 16, 16] and tiny["image_size"] == [32, 32]
    # ours also counts the fixed positional table (a buffer in diffusers): 16 positions² × width 16
    assert tiny["transformer_params_ours"] == tiny["transformer_params_diffusers"] + 16 * 16 * 16 > 16 * 16 * 16
    for side in ("ours", "diffusers"):
        for section in SECTIONS:
            timing = tiny[side][section]
            for stat in ("median_s", "min_s", "max_s"):
                assert positive(timing[stat]), (side, section, stat, timing)
            assert timing["min_s"] <= timing["median_s"] <= timing["max_s"]
        assert math.isclose(tiny[side]["loop_per_step"]["median_s"], tiny[side]["denoise"]["median_s"] / 2)
    for key in ("compile_s", "compile_cfg_zero_star_s"):
        assert positive(tiny["ours"][key])
    assert positive(tiny["ours"]["end_to_end_cfg_zero_star"]["median_s"])
    assert positive(tiny["diffusers"]["first_call_s"])

    ratios = tiny["ratios_diffusers_over_ours"]
    for section in SECTIONS:
        assert math.isclose(ratios[section],
                            tiny["diffusers"][section]["median_s"] / tiny["ours"][section]["median_s"])
    assert math.isclose(ratios["end_to_end_vs_ours_cfg_zero_star"],
                        tiny["diffusers"]["end_to_end"]["median_s"] / tiny["ours"]["end_to_end_cfg_zero_star"]["median_s"])

    agree = tiny["agreement"]
    assert agree["final_latents"]["finite"] and agree["images"]["finite"]
    assert agree["ours_cfg_zero_star_latents_finite"] is True
    # same weights, latents, schedule and CFG on both sides, float32 on a CPU
    assert agree["final_latents"]["relative"] <= 1e-3, agree
    assert agree["images"]["relative"] <= 1e-3, agree


def test_bench_pipeline_refuses_medium_on_cpu_and_bad_configs(torch, diffusers):
    from experiments import bench_pipeline

    with pytest.raises(SystemExit) as exit_info:
        bench_pipeline.main(["--config", "medium", "--device", "cpu"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="--config must name"):
        bench_pipeline.parse_configs(["tiny,huge"], "cpu")
    assert bench_pipeline.parse_configs(["tiny,mid", "tiny"], "cpu") == ["tiny", "mid"]
    assert bench_pipeline.parse_configs(None, "cpu") == ["tiny", "mid"]
    assert bench_pipeline.parse_configs(None, "gpu") == ["tiny", "mid", "medium"]


@pytest.mark.parametrize("dual", [(), (0,)])
def test_analytic_flops_agree_with_xla_cost_analysis(dual):
    """The benchmark's FLOP count, written from the architecture, against XLA's own count of
    the compiled program (on CPU XLA's attention is plain matmuls, so it sees everything; its
    count also includes the elementwise work the analytic one leaves out)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cfgzero_theory.sd3.transformer import SD3Config, SD3Transformer
    from cfgzero_theory.sd3.weights import sd3_model_fn
    from experiments.bench_pipeline import _flops, mmdit_step_flops

    config = SD3Config(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=32,
                       num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=128,
                       pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16, dual_attention_layers=dual)
    model = SD3Transformer(config, rngs=nnx.Rngs(0))
    context = (jnp.zeros((2, 40, 96)), jnp.zeros((2, 64)))
    compiled = jax.jit(sd3_model_fn(model)).lower(nnx.state(model), jnp.zeros((2, 16, 16, 16)), 1.0, 1000.0,
                                                  context).compile()
    xla = _flops(compiled)
    if xla is None:
        pytest.skip("this XLA backend reports no cost analysis")
    analytic = mmdit_step_flops(config, image_tokens=64, text_tokens=40, batch=2)
    assert 0.9 * xla <= analytic <= xla, (analytic, xla)
