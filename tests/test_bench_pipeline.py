"""Smoke test of ``python -m experiments.bench_pipeline --quick``: it runs, reports, and agrees.

No timing thresholds: only the report's structure (the last stdout line, the ``--out`` file
and the return value are the same JSON object), the signs of the timings, the ratios'
definition (diffusers / ours) and the agreement of the two pipelines' final latents (tiny
config, float32, CPU) are checked.  The FLOP count is tested in ``test_sd3_flops.py``.
"""

import math

import pytest
from bench_helpers import last_line_report, positive, strict_loads


SECTIONS = ("step", "loop_per_step", "encode", "denoise", "decode", "end_to_end")


def test_bench_pipeline_quick_reports_and_agrees(torch, diffusers, tmp_path, capsys):
    from experiments import bench_pipeline

    out = tmp_path / "sub" / "pipeline.json"
    returned = bench_pipeline.main(["--quick", "--device", "cpu", "--no-compilation-cache", "--out", str(out)])
    report = last_line_report(capsys.readouterr().out, "bench_pipeline")
    assert report == returned == strict_loads(out.read_text())  # stdout's last line, the file, the return

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
        bench_pipeline.main(["--config", "medium", "--device", "cpu", "--no-compilation-cache"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="--config must name"):
        bench_pipeline.parse_configs(["tiny,huge"], "cpu")
    assert bench_pipeline.parse_configs(["tiny,mid", "tiny"], "cpu") == ["tiny", "mid"]
    assert bench_pipeline.parse_configs(None, "cpu") == ["tiny", "mid"]
    assert bench_pipeline.parse_configs(None, "gpu") == ["tiny", "mid", "medium"]


def test_bench_pipeline_refuses_an_unwritable_out_before_any_work(monkeypatch, tmp_path, capsys):
    from experiments import bench_pipeline

    def never(args):
        raise AssertionError("the benchmark ran despite a bad --out")

    monkeypatch.setattr(bench_pipeline, "run", never)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench_pipeline.main(["--quick", "--out", str(blocker / "pipeline.json")])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m experiments.bench_pipeline: error: --out ")


@pytest.mark.parametrize("flag, enabled", [([], True), (["--no-compilation-cache"], False)])
def test_bench_pipeline_turns_the_compilation_cache_on_unless_asked(flag, enabled, monkeypatch):
    from experiments import bench_pipeline

    calls = []
    monkeypatch.setattr(bench_pipeline, "enable_compilation_cache", lambda: calls.append("cache"))
    monkeypatch.setattr(bench_pipeline, "run", lambda args: calls.append("run"))
    bench_pipeline.main(["--quick", *flag])
    assert calls == (["cache", "run"] if enabled else ["run"])


def test_bench_pipeline_flux_quick_reports_and_agrees(torch, diffusers, tmp_path, capsys):
    """``--model flux --quick``: the one-branch Flux path against diffusers' FluxPipeline."""
    from experiments import bench_pipeline

    returned = bench_pipeline.main(["--model", "flux", "--quick", "--device", "cpu", "--no-compilation-cache"])
    report = last_line_report(capsys.readouterr().out, "bench_pipeline")
    assert report == returned and report["settings"]["model"] == "flux"
    assert "one branch" in report["definitions"]["step"]
    [tiny] = report["configs"]
    assert tiny["model"] == "flux" and tiny["model_batch"] == tiny["batch"] == 1  # one branch: no doubled batch
    assert tiny["image_tokens"] == 64 and tiny["image_size"] == [32, 32]
    for section in SECTIONS:
        for side in ("ours", "diffusers"):
            assert positive(tiny[side][section]["median_s"]), (side, section)
        assert math.isclose(tiny["ratios_diffusers_over_ours"][section],
                            tiny["diffusers"][section]["median_s"] / tiny["ours"][section]["median_s"])
    assert positive(tiny["ours"]["end_to_end_zero_init"]["median_s"])
    assert tiny["agreement"]["final_latents"]["relative"] <= 1e-3, tiny["agreement"]
    assert tiny["agreement"]["images"]["relative"] <= 1e-3, tiny["agreement"]
    with pytest.raises(ValueError, match="for --model flux"):
        bench_pipeline.parse_configs(["medium"], "cpu", "flux")
    assert bench_pipeline.parse_configs(None, "gpu", "flux") == ["tiny", "mid", "dev"]


def _check_two_rule_report(tiny: dict, outputs: str) -> None:
    """The shared part of a Wan / Lumina ``--quick`` config report (2 steps, CPU, float32): every
    section timed on both sides with its ratio, per-step loops, the CFG-Zero* timings apart, no
    memory figures on a CPU, and agreement of the latents and decoded ``outputs``."""
    for section in SECTIONS:
        for side in ("ours", "diffusers"):
            timing = tiny[side][section]
            assert positive(timing["median_s"]) and timing["min_s"] <= timing["median_s"] <= timing["max_s"]
        assert math.isclose(tiny["ratios_diffusers_over_ours"][section],
                            tiny["diffusers"][section]["median_s"] / tiny["ours"][section]["median_s"])
    for side in ("ours", "diffusers"):
        assert math.isclose(tiny[side]["loop_per_step"]["median_s"], tiny[side]["denoise"]["median_s"] / 2)
    for key in ("compile_s", "compile_cfg_zero_star_s"):
        assert positive(tiny["ours"][key])
    for key in ("end_to_end_cfg_zero_star", "denoise_cfg_zero_star", "loop_per_step_cfg_zero_star"):
        assert positive(tiny["ours"][key]["median_s"])
    assert positive(tiny["diffusers"]["first_call_s"])
    e2e_zero = tiny["ours"]["end_to_end_cfg_zero_star"]["median_s"]
    assert math.isclose(tiny["ratios_diffusers_over_ours"]["end_to_end_vs_ours_cfg_zero_star"],
                        tiny["diffusers"]["end_to_end"]["median_s"] / e2e_zero)
    memory = tiny["decode_memory"]  # not measurable on a CPU
    assert memory["ours_peak_bytes"] is None and memory["diffusers_peak_bytes"] is None and "CPU" in memory["note"]
    agree = tiny["agreement"]
    assert agree["final_latents"]["finite"] and agree[outputs]["finite"]
    assert agree["ours_cfg_zero_star_latents_finite"] is True
    assert agree["final_latents"]["relative"] <= 1e-3, agree  # float32 on a CPU, like for like
    assert agree[outputs]["relative"] <= 1e-3, agree


def test_bench_pipeline_wan_quick_reports_and_agrees(torch, diffusers, tmp_path, capsys):
    """``--model wan --quick``: Wan2.1 text-to-video against diffusers' WanPipeline (tiny, 2 steps)."""
    from experiments import bench_pipeline

    out = tmp_path / "wan.json"
    returned = bench_pipeline.main(["--model", "wan", "--quick", "--device", "cpu", "--no-compilation-cache",
                                    "--out", str(out)])
    report = last_line_report(capsys.readouterr().out, "bench_pipeline")
    assert report == returned == strict_loads(out.read_text())
    settings = report["settings"]
    assert settings["model"] == "wan" and settings["configs"] == ["tiny"] and settings["steps"] == 2
    assert settings["max_sequence_length"] == 512 and settings["guidance_scale"] == 5.0
    assert settings["zero_init_steps"] == 2 and settings["paper_steps"] == 50
    assert "UMT5" in report["definitions"]["encode"] and "2B" in report["definitions"]["step"]
    [tiny] = report["configs"]
    assert tiny["model"] == "wan" and tiny["batch"] == 1 and tiny["model_batch"] == 2
    assert tiny["video_size"] == [9, 32, 48] and tiny["latent_shape"] == [1, 16, 3, 4, 6]
    assert tiny["video_tokens"] == 3 * 2 * 3 and tiny["text_tokens"] == 512 and tiny["flow_shift"] == 3.0
    assert tiny["transformer_params"] > 0
    _check_two_rule_report(tiny, "videos")
    with pytest.raises(ValueError, match="for --model wan"):
        bench_pipeline.parse_configs(["medium"], "cpu", "wan")
    assert bench_pipeline.parse_configs(None, "gpu", "wan") == ["tiny", "mid", "1.3b"]


def test_bench_pipeline_wan_refuses_other_sequence_lengths_and_1_3b_on_cpu(torch, diffusers, capsys):
    from experiments import bench_pipeline

    for argv, message in ((["--max-sequence-length", "256"], "512 UMT5 tokens"),
                          (["--config", "1.3b", "--device", "cpu"], "--config 1.3b needs")):
        with pytest.raises(SystemExit) as exit_info:
            bench_pipeline.main(["--model", "wan", "--no-compilation-cache", *argv])
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_bench_pipeline_lumina_quick_reports_and_agrees(torch, diffusers, tmp_path, capsys):
    """``--model lumina --quick``: Lumina-Next against diffusers' LuminaPipeline (tiny, 2 steps)."""
    from experiments import bench_pipeline

    out = tmp_path / "lumina.json"
    returned = bench_pipeline.main(["--model", "lumina", "--quick", "--device", "cpu", "--no-compilation-cache",
                                    "--out", str(out)])
    report = last_line_report(capsys.readouterr().out, "bench_pipeline")
    assert report == returned == strict_loads(out.read_text())
    settings = report["settings"]
    assert settings["model"] == "lumina" and settings["configs"] == ["tiny"] and settings["steps"] == 2
    assert settings["max_sequence_length"] == 256 and settings["guidance_scale"] == 4.0
    assert settings["zero_init_steps"] == 1 and settings["guidance_channels"] == 3
    assert settings["clean_caption"] is False and settings["negative_prompt"] == ""
    assert settings["scaling_watershed"] == 1.0 and settings["proportional_attn"] is True
    assert settings["preset_steps"] == 30
    assert "Gemma" in report["definitions"]["encode"] and "RoPE" in report["definitions"]["step"]
    [tiny] = report["configs"]
    assert tiny["model"] == "lumina" and tiny["batch"] == 1 and tiny["model_batch"] == 2
    assert tiny["image_size"] == [64, 64] and tiny["latent_grid"] == [8, 8] and tiny["latent_shape"] == [1, 4, 8, 8]
    assert tiny["image_tokens"] == 16 and tiny["base_sequence_length"] == 16
    assert tiny["resolution_scaling_factor"] == 1.0
    # the tokenizer's padding, not the cap: "a photo of a cat" is 6 tokens with BOS, padded to 8 on both sides
    assert tiny["caption_tokens"] == tiny["caption_tokens_diffusers"] == 8
    assert tiny["transformer_params"] > 0 and tiny["text_encoder_params"] > 0 and tiny["vae_params"] > 0
    _check_two_rule_report(tiny, "images")
    with pytest.raises(ValueError, match="for --model lumina"):
        bench_pipeline.parse_configs(["medium"], "cpu", "lumina")
    assert bench_pipeline.parse_configs(None, "gpu", "lumina") == ["tiny", "mid", "next"]


def test_bench_pipeline_lumina_refuses_other_sequence_lengths_and_next_on_cpu(torch, diffusers, capsys):
    from experiments import bench_pipeline

    for argv, message in ((["--max-sequence-length", "128"], "256 Gemma tokens"),
                          (["--config", "next", "--device", "cpu"], "--config next needs")):
        with pytest.raises(SystemExit) as exit_info:
            bench_pipeline.main(["--model", "lumina", "--no-compilation-cache", *argv])
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
