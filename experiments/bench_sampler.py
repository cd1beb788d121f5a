"""Per-step overhead of our compiled sampling loop against diffusers schedulers driven from Python.

Run ``python -m experiments.bench_sampler`` (``--help`` for options).  Everything runs in
float32 on this machine's CPU, in one process, JAX and PyTorch side by side.

Cases (2 workloads × 2 schedulers, each reported separately):

* workloads, each a σ-convention model ``v_σ(x, σ, τ, labels)`` on ``B`` points in 2-D with
  labels ``0, 1, 2, 0, 1, …`` (``--batch``, default 64), the unconditional branch being
  ``NULL_LABEL`` and both branches evaluated in one call on the doubled batch ``2B``:

  - ``mixture``: the exact field of ``mixtures.class_conditional_2d()`` (3 classes × 4
    anisotropic Gaussians), ``v_σ = −u_{1−σ}``.  Ours is ``sampling.mixture_flow_model``
    (JAX, eigenbasis precomputed in the mixture).  The peer's is :func:`torch_mixture_model`,
    the same formula written the straightforward way in float32 PyTorch inside this module
    (per call: ``S_k = t²Σ_k + (1 − t)²I``, ``torch.linalg.inv`` and ``logdet`` of the
    ``S_k``, masked softmax of the log-responsibilities over the components of each point's
    class).  The peer therefore runs a genuine PyTorch model, as a pipeline would; its cost
    does not enter the overhead, which is measured with the model time taken out;
  - ``network``: a tiny ``VelocityMLP`` (width 64, depth 3, silu, 3 classes + the null
    class, random weights from seed ``--seed``: :func:`make_network`), ours through
    ``network_velocity`` and the peer the same network in PyTorch
    (``bench_common.build_torch_model``) with the same weights copied in; both read as
    ``v_σ = −v_θ(x, 1 − σ, label)``;

* schedulers, with CFG-Zero* guidance (``CFGZeroStar`` / diffusers'
  ``ClassifierFreeZeroStarGuidance``) at each preset's scale and zero-init steps:

  - ``flow_match_euler``: the ``sd3`` preset, 28 steps, shift 3, scale 7, zero-init 1
    (``FlowMatchEuler`` / ``FlowMatchEulerDiscreteScheduler(shift=3)``);
  - ``unipc``: the ``wan2.1-t2v-480p`` preset, 50 steps, flow_shift 3, scale 5, zero-init 2
    (``UniPC`` / ``UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=3)``, order 2, bh2).

Contenders (one step = doubling the latents, one model call on ``2B``, splitting the
prediction, guidance, solver step):

* ours: ``sample_flow`` (one jitted ``lax.scan`` over the steps; the call's Python-side
  checks and dispatch included), ``block_until_ready``;
* peer: the loop a diffusers pipeline runs, in Python under ``torch.no_grad()``:
  ``scheduler.set_timesteps(N)``, then per step ``torch.cat([x, x])``, the PyTorch model at
  ``scheduler.sigmas[i]``, ``chunk(2)``, ``guider.set_state(...)``, ``guider.forward(v_c,
  v_u).pred`` and ``scheduler.step(..., return_dict=False)[0]``.  ``set_timesteps`` (a
  per-generation cost that also resets the scheduler's multistep state) runs before each
  timed loop, outside the timed span (its time is reported as ``set_timesteps_seconds``), so
  the peer's numbers are per step of the loop proper.

Overhead: the time per step spent outside the model evaluation.  For each side,

    overhead = (loop time − model-only time) / N,

where the model-only loop makes exactly the N model calls of the real loop, on the same
inputs and nothing else: ours is a jitted ``lax.scan`` over ``i`` that calls the same
``model_fn(params, X_i, σ_i, τ_i, [labels; null])`` with ``X_i`` the doubled latents of step
``i`` of our own run (recorded once beforehand) and stacks the outputs; the peer's is a
Python ``for`` loop calling the same PyTorch model on the doubled latents its own run
recorded.  The doubling, the split, the guidance, the solver, its state and the per-call
entry cost are thus overhead on both sides; the scan's (or the Python ``for``'s) own
iteration cost is in both loops and cancels.  The two are timed as back-to-back pairs (one
loop call, one model-only call, in alternating order, each timed on its own), and the
overhead is the median over all pairs of the per-pair difference, divided by ``N``: pairing
call by call cancels most of a shared machine's load drift, which would swamp a difference
of a few percent between separately timed sections.  It is clipped below at a floor of
``max(1% of the side's total per step, 10 ns)`` (a difference of two noisy times can come
out ≈ 0 or negative; the raw value and an ``overhead_clipped`` flag are reported),
so ``overhead_ratio = peer overhead / our overhead`` is always finite (``total_ratio``, the
same for the totals per step, is reported too).  ``meets_target`` is ``overhead_ratio ≥ 5``
per case and for all cases together (booleans, never asserted).

Timing: each contender of each case is one section (ours; the peer per PyTorch thread
setting), which runs enough pairs in a row to last ``--min-time`` seconds; the sections are
timed in interleaved rounds with the order rotated each round
(``bench_common.interleaved_timings``), after ``--warmup`` untimed pairs, so that all see
the same background load.  Totals and model times per step are medians over all the pairs'
calls; ``overhead_round_min/max_seconds`` give the spread of the per-round medians of the
overhead per step (``--repeats`` rounds).  The peer is timed with PyTorch's default thread
count (``torch.get_num_threads()``) and with one thread (``--torch-threads``; ``--quick``
uses one): on a small shared machine intra-op threads can make tiny ops far slower.  The
setting with the lower peer total per step is the one reported as ``peer`` (its thread count
in ``num_threads``), the other is kept in ``peer_by_num_threads``.  Each timing records
``background_cores`` (``bench_common.LoadMeter``): timings taken while it is large are
contaminated.

Correctness: before timing, our final samples are compared with the peer loop's
(``max_abs_diff_final``; float32 on both sides, CFG-Zero* amplifying the field's rounding
differences by up to the scale per step).  The last stdout line is one strict JSON object with
every number, the environment and the target.  Without torch or diffusers (or with
``--no-peer``) only our side is timed and the JSON says why.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

from cfgzero_theory import NULL_LABEL, mixtures, presets
from cfgzero_theory.models import Network, NetworkConfig, VelocityMLP, network_velocity
from cfgzero_theory.sampling import mixture_flow_model, sample_flow
from experiments._common import usage_error, write_json
from experiments.bench_common import (
    build_torch_model, environment, format_number, interleaved_timings, loadavg, print_report, pure_dict,
)

TARGET = {"overhead_ratio_min": 5.0}
WORKLOADS = ("mixture", "network")
#: scheduler name -> the preset that fixes its steps, shift and guidance.
SCHEDULERS = {"flow_match_euler": "sd3", "unipc": "wan2.1-t2v-480p"}
NETWORK = {"width": 64, "depth": 3, "activation": "silu"}
NUM_CLASSES = 3  # class_conditional_2d's default, also the network's
OVERHEAD_FLOOR_FRACTION = 0.01
OVERHEAD_FLOOR_SECONDS = 1e-8
OVERHEAD_DEFINITION = (
    "overhead per step = median over back-to-back pairs of (loop call seconds - model-only call seconds) / N, "
    "clipped below at max(1% of the side's total per step, 1e-8 s); the model-only loop makes the real loop's "
    "N model calls on its recorded doubled-batch inputs and nothing else (ours: jitted lax.scan; peer: Python "
    "for loop), so latent doubling, prediction split, guidance, solver step, solver/guider state and per-call "
    "entry cost count as overhead; the peer's scheduler.set_timesteps runs before each loop, untimed"
)


# --------------------------------------------------------------------------- models
def network_flow_model(network, x, sigma, timestep, labels):
    """A theory-convention network as a σ-convention ``model_fn``: ``v_σ = −v_θ(x, 1 − σ, label)``."""
    return -network_velocity(network, x, 1 - sigma, labels)


@functools.partial(jax.jit, static_argnums=0)
def model_only_loop(model_fn, params, doubled_latents, schedule, both):
    """The N model calls of a ``sample_flow`` run and nothing else: a ``lax.scan`` over ``i``.

    ``doubled_latents`` ``(N, 2B, ...)`` holds the doubled latents of every step; call ``i``
    is ``model_fn(params, doubled_latents[i], σ_i, τ_i, both)``, as in the real loop; the
    outputs are stacked (so none is dead code).
    """

    def body(carry, i):
        return carry, model_fn(params, doubled_latents[i], schedule.sigmas[i], schedule.timesteps[i], both)

    _, outputs = jax.lax.scan(body, None, jnp.arange(schedule.timesteps.shape[0]))
    return outputs


def torch_mixture_model(torch, mixture):
    """The exact mixture field in float32 PyTorch, ``(x2, σ, labels) -> v_σ = −u_{1−σ}(x2 | labels)``.

    ``u_t(x | c) = Σ_k w_k(x) u_k(x)``, ``S_k = t²Σ_k + (1 − t)²I``, ``r_k = x − t·μ_k``,
    ``u_k = μ_k + (tΣ_k − (1 − t)I) S_k⁻¹ r_k``, ``w = softmax_k(log π_k − ½ log det S_k −
    ½ r_kᵀ S_k⁻¹ r_k)`` over the components of the point's class (all of them for
    ``NULL_LABEL``).  Written independently of ``cfgzero_theory.mixture`` (dense inverses,
    no eigendecomposition), from the mixture's weights, means, covariances and labels.
    """
    eigvals, eigvecs = (np.asarray(a, np.float64) for a in (mixture.eigvals, mixture.eigvecs))
    log_pi = torch.from_numpy(np.asarray(mixture.log_weights, np.float32))
    means = torch.from_numpy(np.asarray(mixture.means, np.float32))
    # Σ_k = Q diag(λ) Qᵀ (the mixture's own ``covs``, assembled in NumPy rather than eager JAX).
    covs = torch.from_numpy(np.einsum("kij,kj,klj->kil", eigvecs, eigvals, eigvecs).astype(np.float32))
    comp_labels = torch.from_numpy(np.asarray(mixture.labels, np.int64))
    eye = torch.eye(means.shape[1], dtype=torch.float32)

    def model(x2, sigma, labels):
        t = 1 - sigma
        s = t**2 * covs + (1 - t) ** 2 * eye  # (K, d, d)
        r = x2[:, None, :] - t * means  # (n, K, d)
        s_inv_r = torch.einsum("kij,nkj->nki", torch.linalg.inv(s), r)
        logits = log_pi - 0.5 * torch.logdet(s) - 0.5 * (r * s_inv_r).sum(-1)  # (n, K)
        allowed = (labels[:, None] < 0) | (labels[:, None] == comp_labels[None])
        w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=1)
        u_k = means + torch.einsum("kij,nkj->nki", t * covs - (1 - t) * eye, s_inv_r)
        return -(w[..., None] * u_k).sum(1)

    return model


def torch_network_model(config: NetworkConfig, network):
    """``(x2, σ, labels) -> −v_θ(x2, 1 − σ, labels)`` with the PyTorch copy of ``network``."""
    module = build_torch_model(config, pure_dict(network.state))
    module.eval()

    def model(x2, sigma, labels):
        return -module(x2, (1 - sigma).expand(x2.shape[0]), labels)

    return model, module


def make_network(config: NetworkConfig, seed: int) -> Network:
    """A ``VelocityMLP`` with random weights drawn by NumPy in the module's own parameter tree.

    Kernels ``N(0, 1/fan_in)``, biases ``N(0, 0.1²)``, class embeddings ``N(0, 1)``.  The
    structure comes from ``nnx.eval_shape`` (no computation); nnx's own initialisers would
    run op by op and cost seconds of compilation, which the values do not deserve: any
    weights serve for timing, as long as both sides use the same ones.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VelocityMLP(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "kernel" in names:
            value = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])
        elif "bias" in names:
            value = 0.1 * rng.standard_normal(leaf.shape)
        else:
            value = rng.standard_normal(leaf.shape)
        return jnp.asarray(value.astype(leaf.dtype))

    return Network(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


# --------------------------------------------------------------------------- peer loop
def peer_status(disabled: bool):
    """``(torch, diffusers, None)`` when the peer can run, else ``(None, None, reason)``."""
    if disabled:
        return None, None, "disabled by --no-peer"
    try:
        import torch
        import diffusers
        from diffusers.guiders import ClassifierFreeZeroStarGuidance
    except ImportError as err:
        return None, None, f"torch/diffusers not importable: {err}"
    del ClassifierFreeZeroStarGuidance  # imported only to check that this diffusers has it
    return torch, diffusers, None


def make_scheduler(name: str, preset):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       num_train_timesteps=1000, flow_shift=preset.shift)
    return FlowMatchEulerDiscreteScheduler(shift=preset.shift)


def peer_loop(torch, scheduler, guider, model, x0, labels2, num_steps, record=None):
    """A diffusers pipeline's denoising loop (call it under ``torch.no_grad()``, after
    ``scheduler.set_timesteps(num_steps)``); the final latents.

    With ``record`` a list, the doubled latents and σ fed to the model are appended to it.
    """
    latents = x0
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        doubled = torch.cat([latents, latents])
        if record is not None:
            record.append((doubled, sigma))
        v_c, v_u = model(doubled, sigma, labels2).chunk(2)
        guider.set_state(step=i, num_inference_steps=num_steps, timestep=timestep)
        guided = guider.forward(v_c, v_u).pred
        latents = scheduler.step(guided, timestep, latents, return_dict=False)[0]
    return latents


def peer_model_only(model, inputs, labels2):
    """The peer loop's model calls alone, on its recorded inputs."""
    out = None
    for doubled, sigma in inputs:
        out = model(doubled, sigma, labels2)
    return out


# --------------------------------------------------------------------------- timing helpers
class PairedTiming:
    """A contender's loop and model-only calls, timed as back-to-back pairs.

    Each call of the object runs ``prepare()`` (timed apart: e.g. ``set_timesteps``), then
    one ``loop()`` and one ``model()`` call in alternating order, each timed with
    ``perf_counter`` (both must block until their result is ready).  ``calls`` is the number
    of pairs per round of :func:`bench_common.interleaved_timings`.
    """

    def __init__(self, loop, model, prepare=None):
        self.loop, self.model, self.prepare = loop, model, prepare
        self.loop_s, self.model_s, self.prepare_s = [], [], []
        self.calls = 1

    def __call__(self):
        if self.prepare is not None:
            start = time.perf_counter()
            self.prepare()
            self.prepare_s.append(time.perf_counter() - start)
        loop_first = len(self.loop_s) % 2 == 0
        for fn, out in ((self.loop, self.loop_s), (self.model, self.model_s))[:: 1 if loop_first else -1]:
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)

    def warm_up(self, min_time: float, warmup: int) -> tuple:
        """Compile/warm with one pair, size ``calls`` for ``min_time`` seconds, run ``warmup`` more pairs, then
        forget everything recorded; returns ``(self, calls)``, a section for ``interleaved_timings``."""
        self()
        if min_time > 0:
            start = time.perf_counter()
            self()
            self.calls = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-9)))
        for _ in range(warmup):
            self()
        self.loop_s, self.model_s, self.prepare_s = [], [], []
        return self, self.calls

    def summary(self, num_steps: int, section: dict) -> dict:
        """Per-step totals, model time and overhead (see the module docstring); ``section`` is its timing."""
        loop_s, model_s = np.asarray(self.loop_s), np.asarray(self.model_s)
        diff = loop_s - model_s
        total = float(np.median(loop_s)) / num_steps
        raw = float(np.median(diff)) / num_steps
        floor = max(OVERHEAD_FLOOR_FRACTION * total, OVERHEAD_FLOOR_SECONDS)
        rounds = [float(np.median(diff[i:i + self.calls])) / num_steps for i in range(0, len(diff), self.calls)]
        return {
            "total_per_step_seconds": total,
            "model_per_step_seconds": float(np.median(model_s)) / num_steps,
            "overhead_per_step_seconds": max(raw, floor),
            "overhead_raw_per_step_seconds": raw,
            "overhead_floor_seconds": floor,
            "overhead_clipped": bool(raw < floor),
            "overhead_fraction_of_total": max(raw, floor) / total,
            "overhead_round_min_seconds": min(rounds),
            "overhead_round_max_seconds": max(rounds),
            "loop_call_seconds": {"median": float(np.median(loop_s)), "min": float(loop_s.min()),
                                  "max": float(loop_s.max())},
            "model_call_seconds": {"median": float(np.median(model_s)), "min": float(model_s.min()),
                                   "max": float(model_s.max())},
            "pairs": int(loop_s.size),
            "pairs_per_round": self.calls,
            "rounds": section["repeats"],
            "background_cores": section["background_cores"],
            "background_cores_per_round": section["background_cores_per_repeat"],
        }


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench_sampler",
        description=(
            "Per-step overhead (time outside the model) of our jitted sample_flow loop against the same "
            "loop driven step by step through diffusers schedulers and guiders in Python, on the same CPU, "
            "for the exact mixture field and a tiny network, with Euler (SD3) and UniPC (Wan). The last "
            "stdout line is a JSON object with all results."
        ),
    )
    p.add_argument("--batch", type=int, default=64, help="points per run, B (the model sees 2B; default 64)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds; medians are reported (default 7)")
    p.add_argument("--min-time", type=float, default=0.2,
                   help="each section loops its call for at least this many seconds per round (default 0.2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each section before the rounds")
    p.add_argument("--seed", type=int, default=0, help="noise and network initialisation seed")
    p.add_argument("--torch-threads", choices=("both", "default", "1"), default="both",
                   help="PyTorch threads for the peer: its default count, 1, or both with the setting of the "
                   "lower peer total per step used (default both)")
    p.add_argument("--no-peer", action="store_true", help="time our side only (as when torch is missing)")
    p.add_argument("--json-out", default=None, help="also write the JSON report to this path (atomically)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (seconds): 1 round, one call per section, no warm-up, 1 PyTorch thread")
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", False)  # float32 throughout
    if args.quick:
        args.repeats, args.min_time, args.warmup, args.torch_threads = 1, 0.0, 0, "1"
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or args.min_time < 0:
        usage_error(parser, "--batch and --repeats must be positive, --warmup and --min-time non-negative")

    torch, diffusers, peer_missing = peer_status(args.no_peer)
    env = environment()
    env.update(platform=platform.platform(), torch_version=None, diffusers_version=None,
               torch_num_threads=None, torch_interop_threads=None)
    thread_settings = []
    if torch is not None:
        default_threads = torch.get_num_threads()
        thread_settings = list(dict.fromkeys(
            {"both": (default_threads, 1), "default": (default_threads,), "1": (1,)}[args.torch_threads]))
        env.update(torch_version=torch.__version__, diffusers_version=diffusers.__version__,
                   torch_num_threads=default_threads, torch_interop_threads=torch.get_num_interop_threads(),
                   torch_num_threads_timed=thread_settings)
        torch.set_num_threads(thread_settings[0])
    peer_text = peer_missing if torch is None else (
        f"torch {env['torch_version']} (default {env['torch_num_threads']} threads; timed with "
        f"{', '.join(map(str, thread_settings))}), diffusers {env['diffusers_version']}")
    print(f"jax {env['jax_version']} on {env['backend']} ({env['cpu_cores']} cores, {env['cpu_model']}), float32; "
          f"peer: {peer_text}", flush=True)

    batch = args.batch
    rng = np.random.default_rng(args.seed)
    x0 = rng.standard_normal((batch, 2)).astype(np.float32)
    labels = (np.arange(batch) % NUM_CLASSES).astype(np.int32)
    nulls = np.full(batch, NULL_LABEL, np.int32)
    # Host arrays moved as they are: eager jnp ops would each cost a compilation.
    labels_j, null_j, both_j = (jnp.asarray(a) for a in (labels, nulls, np.concatenate([labels, nulls])))
    x0_j = jnp.asarray(x0)

    mixture = mixtures.class_conditional_2d()
    net_config = NetworkConfig(dim=2, num_classes=NUM_CLASSES, **NETWORK)
    network = make_network(net_config, args.seed)
    ours_models = {"mixture": (mixture_flow_model, mixture), "network": (network_flow_model, network)}

    peer_models, network_parity = {}, None
    if torch is not None:
        from diffusers.guiders import ClassifierFreeZeroStarGuidance

        x0_t = torch.from_numpy(x0.copy())
        labels2_t = torch.from_numpy(np.concatenate([labels, nulls]).astype(np.int64))
        net_model, _ = torch_network_model(net_config, network)
        peer_models = {"mixture": torch_mixture_model(torch, mixture), "network": net_model}
        # The two networks compute the same function (same weights): checked at one σ.
        sigma_t = torch.tensor(0.37, dtype=torch.float32)
        x2 = np.concatenate([x0, 2 * x0])
        with torch.no_grad():
            v_torch = net_model(torch.from_numpy(x2), sigma_t, labels2_t).numpy()
        v_jax = np.asarray(jax.jit(network_flow_model)(network, jnp.asarray(x2), np.float32(0.37), None, both_j))
        network_parity = float(np.max(np.abs(v_torch - v_jax)))

    contenders, cases = {}, []
    for sched_name, preset_name in SCHEDULERS.items():
        preset = presets.get(preset_name)
        n = preset.num_steps
        schedule, solver, rule = preset.schedule(), preset.solver(), preset.rule("cfg-zero-star")
        for workload in WORKLOADS:
            key = f"{workload}/{sched_name}"
            model_fn, params = ours_models[workload]
            run = sample_flow(model_fn, params, x0_j, schedule, labels_j, null_j, rule, solver=solver,
                              return_trajectory=True)
            ours_final = np.asarray(run.samples)
            states = np.asarray(run.trajectory)[:-1]
            doubled = jnp.asarray(np.concatenate([states, states], axis=1))

            def ours_loop(model_fn=model_fn, params=params, schedule=schedule, rule=rule, solver=solver):
                return sample_flow(model_fn, params, x0_j, schedule, labels_j, null_j, rule,
                                   solver=solver).samples.block_until_ready()

            def ours_model(model_fn=model_fn, params=params, doubled=doubled, schedule=schedule):
                return model_only_loop(model_fn, params, doubled, schedule, both_j).block_until_ready()

            contenders[f"ours/{key}"] = PairedTiming(ours_loop, ours_model)
            case = {
                "workload": workload,
                "scheduler": sched_name,
                "preset": preset_name,
                "num_steps": n,
                "shift": preset.shift,
                "guidance": repr(rule),
                "batch": batch,
                "model_batch": 2 * batch,
                "ours_final_max_abs": float(np.max(np.abs(ours_final))),
                "ours_final_finite": bool(np.all(np.isfinite(ours_final))),
            }
            if torch is not None:
                model = peer_models[workload]
                scheduler = make_scheduler(sched_name, preset)
                guider = ClassifierFreeZeroStarGuidance(guidance_scale=preset.scale,
                                                        zero_init_steps=preset.zero_init_steps)
                record = []
                scheduler.set_timesteps(n)
                with torch.no_grad():
                    peer_final = peer_loop(torch, scheduler, guider, model, x0_t, labels2_t, n, record).numpy()
                case["max_abs_diff_final"] = float(np.max(np.abs(peer_final.astype(np.float64) - ours_final)))
                case["peer_final_finite"] = bool(np.all(np.isfinite(peer_final)))

                def peer_run(scheduler=scheduler, guider=guider, model=model, n=n):
                    with torch.no_grad():
                        return peer_loop(torch, scheduler, guider, model, x0_t, labels2_t, n)

                def peer_model(model=model, record=record):
                    with torch.no_grad():
                        return peer_model_only(model, record, labels2_t)

                for threads in thread_settings:
                    def prepare(threads=threads, scheduler=scheduler, n=n):
                        torch.set_num_threads(threads)
                        scheduler.set_timesteps(n)  # resets the step index and the multistep history

                    contenders[f"peer/{key}/{threads}"] = PairedTiming(peer_run, peer_model, prepare)
            cases.append(case)

    sections = {name: c.warm_up(args.min_time, args.warmup) for name, c in contenders.items()}
    timings = interleaved_timings(sections, args.repeats, 0)

    for case in cases:
        key, n = f"{case['workload']}/{case['scheduler']}", case["num_steps"]
        ours = contenders[f"ours/{key}"].summary(n, timings[f"ours/{key}"])
        case["ours"] = ours
        case["peer"] = None
        case["overhead_ratio"] = case["total_ratio"] = case["meets_target"] = None
        line = (f"{key:24s} ours: total {ours['total_per_step_seconds'] * 1e6:8.2f} us/step, model "
                f"{ours['model_per_step_seconds'] * 1e6:8.2f}, overhead {ours['overhead_per_step_seconds'] * 1e6:7.2f}"
                f"{' (clipped)' if ours['overhead_clipped'] else ''}")
        if torch is not None:
            by_threads = {}
            for threads in thread_settings:
                name = f"peer/{key}/{threads}"
                by_threads[str(threads)] = {**contenders[name].summary(n, timings[name]), "num_threads": threads,
                                            "set_timesteps_seconds": float(np.median(contenders[name].prepare_s))}
            used = min(by_threads, key=lambda k: by_threads[k]["total_per_step_seconds"])
            peer = by_threads[used]
            case["peer"] = peer
            case["peer_by_num_threads"] = {
                k: {name: v[name] for name in ("total_per_step_seconds", "model_per_step_seconds",
                                                "overhead_per_step_seconds", "overhead_raw_per_step_seconds",
                                                "overhead_clipped")}
                for k, v in by_threads.items()}
            for k, v in case["peer_by_num_threads"].items():
                v["overhead_ratio"] = v["overhead_per_step_seconds"] / ours["overhead_per_step_seconds"]
            case["overhead_ratio"] = peer["overhead_per_step_seconds"] / ours["overhead_per_step_seconds"]
            case["total_ratio"] = peer["total_per_step_seconds"] / ours["total_per_step_seconds"]
            case["meets_target"] = bool(case["overhead_ratio"] >= TARGET["overhead_ratio_min"])
            line += (f" | peer ({peer['num_threads']} thr): total {peer['total_per_step_seconds'] * 1e6:8.2f}, model "
                     f"{peer['model_per_step_seconds'] * 1e6:8.2f}, overhead "
                     f"{peer['overhead_per_step_seconds'] * 1e6:7.2f}{' (clipped)' if peer['overhead_clipped'] else ''}"
                     f" | overhead ratio {case['overhead_ratio']:.1f}x | diff {case['max_abs_diff_final']:.1e}")
        print(line, flush=True)

    ratios = [c["overhead_ratio"] for c in cases if c["overhead_ratio"] is not None]
    backgrounds = [t["background_cores"] for t in timings.values() if t["background_cores"] is not None]
    report = {
        "benchmark": "bench_sampler",
        **env,
        "settings": {
            "batch": batch, "dim": 2, "repeats": args.repeats, "min_time": args.min_time, "warmup": args.warmup,
            "seed": args.seed, "quick": args.quick, "torch_threads": args.torch_threads,
            "labels": f"arange(B) % {NUM_CLASSES}, unconditional branch NULL_LABEL = {NULL_LABEL}",
            "network": {**NETWORK, "dim": 2, "num_classes": NUM_CLASSES},
            "mixture": "mixtures.class_conditional_2d() (3 classes x 4 components, d = 2)",
            "schedulers": {name: {"preset": p, "num_steps": presets.get(p).num_steps, "shift": presets.get(p).shift,
                                  "guidance_scale": presets.get(p).scale,
                                  "zero_init_steps": presets.get(p).zero_init_steps}
                           for name, p in SCHEDULERS.items()},
            "timing": "per contender, back-to-back (loop call, model-only call) pairs in alternating order; "
            "interleaved rounds over all contenders, order rotated each round; medians over all pairs",
        },
        "overhead_definition": OVERHEAD_DEFINITION,
        "peer_definition": (
            "Python loop under torch.no_grad(): per step torch.cat([x, x]), PyTorch model at scheduler.sigmas[i], "
            "chunk(2), ClassifierFreeZeroStarGuidance.set_state + forward, scheduler.step(return_dict=False); "
            "mixture model: float32 PyTorch dense-inverse field written in this module; network: the same "
            "VelocityMLP in PyTorch with our weights"
        ),
        "peer_available": torch is not None,
        "peer_unavailable_reason": peer_missing,
        "network_parity_max_abs_diff": network_parity,
        "cases": cases,
        "min_overhead_ratio": min(ratios) if ratios else None,
        "max_abs_diff_final": max((c["max_abs_diff_final"] for c in cases if "max_abs_diff_final" in c), default=None),
        "targets": TARGET,
        "meets_target": bool(min(ratios) >= TARGET["overhead_ratio_min"]) if ratios else None,
        "loadavg_at_end": loadavg(),
        "max_background_cores": max(backgrounds, default=None),
        "note": (
            "background_cores = CPU cores used by other processes during a timed section (time-weighted mean "
            "over the rounds); timings taken while it is large are contaminated"
        ),
    }
    if args.json_out:
        write_json(args.json_out, report)
    if ratios:
        print(f"overhead ratio (peer / ours): min {min(ratios):.1f}x over {len(ratios)} cases; target "
              f">= {TARGET['overhead_ratio_min']:g}x: {'met' if report['meets_target'] else 'NOT met'}; "
              f"max background load {format_number(report['max_background_cores'])} cores", flush=True)
    print_report(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
