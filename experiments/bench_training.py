"""Benchmark flow-matching training (``training.make_epoch_fn``) against a plain PyTorch loop.

Run ``python -m experiments.bench_training --width W --depth L --batch B`` (``--help`` for
options).  It times, in float32 on this machine's default JAX backend:

* our jitted training epoch (``make_epoch_fn``: one compiled program, ``lax.scan`` over the
  steps of AdamW on the flow-matching loss, ``vmap``-ped over ``--seeds``), called on a
  dataset of exactly ``steps × batch`` points so that one call is one epoch of ``--steps``
  steps; after a warm-up call (which compiles) every timed call is one whole epoch with
  ``block_until_ready``, and ``steps_per_s`` is ``steps / median epoch seconds``;
* when ``torch`` is importable, the SAME network (layer sizes, activation, sin/cos Fourier
  features of ``t``, class embedding with the null class) and the SAME loss (per step: a batch
  of a per-epoch permutation, fresh ``t ~ U(0, 1)`` and ``x0 ~ N(0, I)``, label dropout,
  squared-error regression of ``x1 − x0``) trained by AdamW with the same learning rate, betas,
  eps and weight decay, written as a plain PyTorch loop (Python ``for`` over the batches,
  ``zero_grad`` / ``backward`` / ``step``, ``torch.set_num_threads(os.cpu_count())``),
  initialised from the JAX network's parameters (``torch.parity_max_abs_err`` checks that the
  two compute the same function), on the same CPU in the same run.

The contenders are timed in interleaved rounds (one epoch of each per round, the order
rotated from round to round; the median over the rounds is reported), so that they all see the
same background load, which drifts on a shared machine.  PyTorch is timed with
``os.cpu_count()`` threads and with one thread (the faster is the baseline; both reported).
Achieved GFLOP/s follow the flop model in ``FLOP_MODEL`` (matrix products only) and are
compared with the machine's float32 matmul peak, measured as in ``bench_exact`` (jitted
``jnp.dot`` of two 2048² matrices) but inside the same rounds.  The last stdout line is one
JSON object with every number, the environment and the targets (``meets_speedup_target`` /
``meets_peak_target``: booleans for the target configurations, ``None`` for others; never
asserted).  Every timing records ``background_cores``, the CPU used by other processes
meanwhile (``bench_common.LoadMeter``): timings taken while it is large are contaminated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import flax
import optax

from cfgzero_theory.models import ACTIVATIONS, NetworkConfig
from cfgzero_theory.training import TrainConfig, initial_state, make_epoch_fn, seed_sharding
from experiments._common import usage_error
from experiments.bench_common import (
    build_torch_model, environment, format_number, interleaved_timings, layer_sizes, loadavg, print_report, pure_dict,
)

FLOP_MODEL = (
    "flops per training step = seeds * 3 * forward, forward = 2*B*sum over the Linear layers of in*out "
    "(hidden layers and the output layer; the first layer's in = dim + 2*time_frequencies + class_embedding); "
    "backward counted as 2x forward. Excluded: the class-embedding gather, the Fourier features, biases, "
    "activations and every other element-wise op, the loss, the data gather/permutation, the random draws "
    "and the AdamW update"
)
TARGETS = {
    "speedup": {"width": 64, "depth": 3, "batch": 256, "speedup_min": 3.0},
    "peak": {"width": 512, "depth": 3, "batch": 4096, "fraction_of_peak_min": 0.6},
}
PEAK_SIZE = 2048
QUICK_PEAK_SIZE = 512
QUICK_STEPS = 5
#: Without ``--steps``, an epoch holds about this many model flops (clamped to [10, 200] steps).
EPOCH_FLOPS = 2.5e10


# --------------------------------------------------------------------------- flop model
def step_flops(net: NetworkConfig, batch: int, seeds: int = 1) -> float:
    """Model flops of one training step (see ``FLOP_MODEL``)."""
    forward = 2.0 * batch * sum(a * b for a, b in layer_sizes(net))
    return 3.0 * forward * seeds


def default_steps(net: NetworkConfig, batch: int) -> int:
    return int(min(200, max(10, math.ceil(EPOCH_FLOPS / step_flops(net, batch)))))


# --------------------------------------------------------------------------- JAX
def make_data(net: NetworkConfig, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled float32 points: one Gaussian blob per class (``x1 = 3·c_y + N(0, I)``).

    Drawn with NumPy rather than ``training.make_dataset`` (a ``GaussianMixture``): the values
    do not affect the timings, and building and sampling a mixture costs seconds of op-by-op
    compilation that ``--quick`` cannot afford.
    """
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((net.num_classes, net.dim))
    labels = rng.integers(0, net.num_classes, size=n).astype(np.int32)
    x1 = (centres[labels] + rng.standard_normal((n, net.dim))).astype(np.float32)
    return x1, labels


def setup_jax(net: NetworkConfig, batch: int, steps: int, seeds: int, lr: float, label_dropout: float, seed: int):
    """Our training epoch on ``steps × batch`` points: ``(run_epoch, holder, data, graphdef, config)``.

    ``run_epoch()`` runs one epoch (the next epoch index each call), blocks, and returns the
    seeds' mean losses; the state (``holder["state"]``) is carried from call to call as in
    ``training.train``; ``holder["initial_params"]`` keeps the initial parameters (NumPy).
    """
    config = TrainConfig(
        epochs=1_000_000,  # only the epoch index matters: constant schedule
        dataset_size=steps * batch,
        batch_size=batch,
        learning_rate=lr,
        schedule="constant",
        weight_decay=0.0,
        label_dropout=label_dropout,
        num_seeds=seeds,
        seed=seed,
        data_seed=seed,
    )
    seed_axis, replicated = seed_sharding(seeds)
    init_root, train_root = jax.random.split(jax.random.key(seed))
    seed_keys = jax.device_put(jax.random.split(train_root, seeds), seed_axis)
    x1, labels = jax.device_put(make_data(net, config.dataset_size, seed), replicated)
    graphdef, state = initial_state(net, config, jax.random.split(init_root, seeds))
    epoch_fn = make_epoch_fn(graphdef, config)
    holder = {"state": state, "epoch": 0, "initial_params": jax.tree_util.tree_map(np.asarray, state.params)}

    def run_epoch():
        holder["state"], loss = epoch_fn(holder["state"], seed_keys, holder["epoch"], x1, labels)
        holder["epoch"] += 1
        return np.asarray(jax.block_until_ready(loss))

    return run_epoch, holder, (np.asarray(x1), np.asarray(labels)), graphdef, config


# --------------------------------------------------------------------------- PyTorch
def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def setup_torch(net: NetworkConfig, params: dict, data, batch: int, steps: int, config: TrainConfig, seed: int):
    """The plain PyTorch loop: ``(run_epoch, model)``; ``run_epoch()`` returns the epoch's mean loss."""
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(seed)
    model = build_torch_model(net, params)
    # optax.adamw defaults: b1 0.9, b2 0.999, eps 1e-8 (torch's too); weight decay as configured.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
    )
    x1 = torch.from_numpy(np.array(data[0], dtype=np.float32))
    labels = torch.from_numpy(np.array(data[1], dtype=np.int64))
    n, dim, p = x1.shape[0], x1.shape[1], config.label_dropout

    def run_epoch():
        order = torch.randperm(n)[: steps * batch].view(steps, batch)
        total = torch.zeros(())
        for i in range(steps):
            idx = order[i]
            xb, yb = x1[idx], labels[idx]
            t = torch.rand(batch)
            x0 = torch.randn(batch, dim)
            yb = torch.where(torch.rand(batch) < p, -1, yb)
            x_t = t[:, None] * xb + (1 - t[:, None]) * x0
            loss = ((model(x_t, t, yb) - (xb - x0)) ** 2).sum(dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach()
        return float(total) / steps

    return run_epoch, model


def torch_parity(net: NetworkConfig, model, graphdef, params, seed: int) -> float:
    """Max |v_torch − v_jax| on random inputs (null labels included), same parameters."""
    import torch
    from flax import nnx

    rng = np.random.default_rng(seed)
    n = 64
    x = rng.standard_normal((n, net.dim)).astype(np.float32)
    t = rng.uniform(size=n).astype(np.float32)
    y = rng.integers(-1, net.num_classes, size=n)
    v_jax = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32)))
    with torch.no_grad():
        v_torch = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y.astype(np.int64))).numpy()
    return float(np.max(np.abs(v_jax - v_torch)))


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench_training",
        description=(
            "Training steps/s of our jitted flow-matching epoch (lax.scan of AdamW steps, vmapped over "
            "seeds) against a plain PyTorch loop on the same CPU, and achieved GFLOP/s against the "
            "machine's float32 matmul peak. The last stdout line is a JSON object with all results."
        ),
    )
    p.add_argument("--width", type=int, default=64, help="hidden width (default 64)")
    p.add_argument("--depth", type=int, default=3, help="number of hidden layers (default 3)")
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--dim", type=int, default=2, help="data dimension (default 2)")
    p.add_argument("--num-classes", type=int, default=3, help="number of classes (default 3)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="silu", help="(default silu)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per timed epoch (default: about {EPOCH_FLOPS:.2g} model flops per epoch, "
        "clamped to [10, 200])",
    )
    p.add_argument(
        "--repeats", type=int, default=5,
        help="timed rounds (one epoch of each contender per round); the median is reported (default 5)",
    )
    p.add_argument(
        "--warmup", type=int, default=1,
        help="untimed calls of each contender before the rounds (JAX: after the compiling one; default 1)",
    )
    p.add_argument("--seeds", type=int, default=1, help="networks trained at once (vmapped; default 1)")
    p.add_argument("--lr", type=float, default=TrainConfig.learning_rate, help="AdamW learning rate")
    p.add_argument("--label-dropout", type=float, default=TrainConfig.label_dropout)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    p.add_argument(
        "--torch-threads",
        choices=("both", "all", "1"),
        default="both",
        help="torch.set_num_threads for the PyTorch loop: os.cpu_count(), 1, or both with the faster as the "
        "baseline (default both)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run (a few seconds): {QUICK_STEPS} steps per epoch, 1 round, no warm-up, "
        f"{QUICK_PEAK_SIZE}x{QUICK_PEAK_SIZE} peak",
    )
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", False)  # float32 throughout
    peak_size, peak_min_time = PEAK_SIZE, 0.2
    if args.quick:
        args.steps, args.repeats, args.warmup = QUICK_STEPS, 1, 0
        peak_size, peak_min_time = QUICK_PEAK_SIZE, 0.0
    for name in ("width", "depth", "batch", "dim", "num_classes", "repeats", "seeds"):
        if getattr(args, name) < 1:
            usage_error(parser, f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or (args.steps is not None and args.steps < 1):
        usage_error(parser, "--warmup must be non-negative and --steps positive")
    net = NetworkConfig(dim=args.dim, num_classes=args.num_classes, width=args.width, depth=args.depth,
                        activation=args.activation)
    steps = args.steps or default_steps(net, args.batch)
    flops = step_flops(net, args.batch, args.seeds)

    env = environment()
    env["flax_version"] = flax.__version__
    env["optax_version"] = optax.__version__
    have_torch = torch_available() and not args.no_torch
    env["torch_version"] = None
    if have_torch:
        import torch

        env["torch_version"] = torch.__version__
        env["torch_interop_threads"] = torch.get_num_interop_threads()
    print(f"jax {env['jax_version']} on {env['backend']} ({env['cpu_cores']} cores, {env['cpu_model']}), float32; "
          f"torch {env['torch_version'] or 'not used'}", flush=True)

    # --- contenders.  JAX: our epoch (the first call compiles; the state carries over).
    run_jax, holder, data, graphdef, config = setup_jax(
        net, args.batch, steps, args.seeds, args.lr, args.label_dropout, args.seed
    )
    start = time.perf_counter()
    jax_losses = [run_jax()]
    compile_and_first = time.perf_counter() - start
    sections = {"jax": (lambda: jax_losses.append(run_jax()), 1)}

    # The machine's float32 matmul peak (bench_exact's measurement: jitted jnp.dot of two
    # size² matrices), timed in the same rounds so that it sees the same background load.
    rng = np.random.default_rng(0)
    a_p, b_p = (jnp.asarray(rng.standard_normal((peak_size, peak_size), dtype=np.float32)) for _ in range(2))
    dot = jax.jit(jnp.dot)
    peak_fn = lambda: dot(a_p, b_p).block_until_ready()  # noqa: E731
    peak_fn()
    start = time.perf_counter()
    peak_fn()
    peak_calls = max(1, math.ceil(peak_min_time / max(time.perf_counter() - start, 1e-9)))
    sections["peak"] = (peak_fn, peak_calls)

    # PyTorch: the plain loop, same network, same initial parameters (seed 0's).  Timed with
    # os.cpu_count() threads (torch.set_num_threads(os.cpu_count())) and with one thread: on a
    # small, shared machine, intra-op threads on tiny matrices can make the loop far slower.
    # The faster is the baseline and both are reported, so a bad threading never inflates the
    # speed-up; speedup_vs_torch_all_threads uses the os.cpu_count() setting alone.
    torch_losses, parity, thread_settings = [], None, []
    if have_torch:
        params0 = jax.tree_util.tree_map(lambda a: a[0], holder["initial_params"])
        run_torch, model = setup_torch(net, pure_dict(params0), data, args.batch, steps, config, args.seed)
        parity = torch_parity(net, model, graphdef, params0, args.seed)
        thread_settings = list(dict.fromkeys({"both": (os.cpu_count(), 1), "all": (os.cpu_count(),), "1": (1,)}[
            args.torch_threads]))
        for threads in thread_settings:
            def run(threads=threads):
                torch.set_num_threads(threads)
                torch_losses.append(run_torch())

            sections[f"torch_{threads}"] = (run, 1)

    timings = interleaved_timings(sections, args.repeats, args.warmup)
    if have_torch:
        torch.set_num_threads(os.cpu_count())

    peak_t = timings["peak"]
    peak_gflops = 2.0 * peak_size**3 / peak_t["seconds"] / 1e9
    peak = {"size": peak_size, "dtype": "float32", "jax_gflops": peak_gflops, "jax_timing": peak_t}
    print(f"matmul peak ({peak_size}x{peak_size} float32): jax {peak_gflops:.1f} GFLOP/s "
          f"(background load {format_number(peak_t['background_cores'])} cores)", flush=True)

    jax_t = timings["jax"]
    jax_steps_per_s = steps / jax_t["seconds"]
    gflops = flops * jax_steps_per_s / 1e9
    jax_result = {
        "epoch_seconds": jax_t["seconds"],
        "steps_per_s": jax_steps_per_s,
        "network_steps_per_s": jax_steps_per_s * args.seeds,
        "gflops": gflops,
        "fraction_of_peak": gflops / peak_gflops,
        "first_call_seconds_incl_compile": compile_and_first,
        "timing": jax_t,
        "mean_loss_first_epoch": float(np.mean(jax_losses[0])),
        "mean_loss_last_epoch": float(np.mean(jax_losses[-1])),
        "epochs_run": len(jax_losses),
    }
    print(f"jax:   {jax_steps_per_s:10.1f} steps/s ({steps} steps/epoch, {jax_t['seconds'] * 1e3:.2f} ms/epoch), "
          f"{gflops:.1f} GFLOP/s = {100 * gflops / peak_gflops:.1f}% of peak | loss "
          f"{jax_result['mean_loss_first_epoch']:.4f} -> {jax_result['mean_loss_last_epoch']:.4f} | "
          f"background load {format_number(jax_t['background_cores'])} cores", flush=True)

    torch_result = None
    if have_torch:
        runs = {str(threads): timings[f"torch_{threads}"] for threads in thread_settings}
        used = min(runs, key=lambda key: runs[key]["seconds"])
        torch_t = runs[used]
        torch_steps_per_s = steps / torch_t["seconds"]
        torch_result = {
            "epoch_seconds": torch_t["seconds"],
            "steps_per_s": torch_steps_per_s,
            "gflops": step_flops(net, args.batch) * torch_steps_per_s / 1e9,
            "timing": torch_t,
            "num_threads_used": int(used),
            "steps_per_s_by_num_threads": {key: steps / run["seconds"] for key, run in runs.items()},
            "timing_by_num_threads": runs,
            "parity_max_abs_err": parity,
            "mean_loss_first_epoch": torch_losses[0],
            "mean_loss_last_epoch": torch_losses[-1],
            "epochs_run": len(torch_losses),
        }
        by = ", ".join(
            f"{k} thr {steps / r['seconds']:.1f} (bg {format_number(r['background_cores'])})" for k, r in runs.items()
        )
        print(f"torch: {torch_steps_per_s:10.1f} steps/s ({torch_t['seconds'] * 1e3:.2f} ms/epoch; {by}) | loss "
              f"{torch_losses[0]:.4f} -> {torch_losses[-1]:.4f} | parity {parity:.1e}", flush=True)

    speedup = None if torch_result is None else jax_result["network_steps_per_s"] / torch_result["steps_per_s"]
    all_key = str(os.cpu_count())
    speedup_all = (
        jax_result["network_steps_per_s"] / torch_result["steps_per_s_by_num_threads"][all_key]
        if torch_result is not None and all_key in torch_result["steps_per_s_by_num_threads"]
        else None
    )
    if speedup is not None:
        print(f"speed-up vs the PyTorch loop: {speedup:.2f}x (per network step)", flush=True)

    def is_target(t):
        return (args.width, args.depth, args.batch) == (t["width"], t["depth"], t["batch"]) and not args.quick

    t_speed, t_peak = TARGETS["speedup"], TARGETS["peak"]
    backgrounds = [t["background_cores"] for t in timings.values()]
    report = {
        "benchmark": "bench_training",
        **env,
        "settings": {
            "width": args.width, "depth": args.depth, "batch": args.batch, "dim": args.dim,
            "num_classes": args.num_classes, "activation": args.activation,
            "time_frequencies": net.time_frequencies, "class_embedding": net.class_embedding,
            "steps_per_epoch": steps, "repeats": args.repeats, "warmup_epochs": args.warmup,
            "seeds": args.seeds, "learning_rate": args.lr, "label_dropout": args.label_dropout,
            "schedule": "constant", "weight_decay": config.weight_decay, "seed": args.seed,
            "quick": args.quick, "dataset_size": config.dataset_size, "torch_threads": args.torch_threads,
            "timing": "interleaved rounds (jax epoch, matmul peak, torch epoch per thread setting), order "
            "rotated each round; median over rounds",
        },
        "network": dataclasses.asdict(net),
        "layer_sizes": layer_sizes(net),
        "flop_model": FLOP_MODEL,
        "gflop_per_step": flops / 1e9,
        "steps_per_s_definition": (
            "steps / median seconds of one whole epoch (one call of the jitted make_epoch_fn, lax.scan over "
            "the steps, block_until_ready), after a compiling call and the warm-up epochs; with seeds > 1 one "
            "step trains every seed's network (network_steps_per_s = steps_per_s * seeds)"
        ),
        "steps_per_s": jax_steps_per_s,
        "network_steps_per_s": jax_result["network_steps_per_s"],
        "gflops": gflops,
        "peak_gflops": peak_gflops,
        "fraction_of_peak": gflops / peak_gflops,
        "jax": jax_result,
        "matmul_peak": peak,
        "torch": torch_result,
        "torch_steps_per_s": None if torch_result is None else torch_result["steps_per_s"],
        "torch_steps_per_s_all_threads": None
        if torch_result is None
        else torch_result["steps_per_s_by_num_threads"].get(all_key),
        "speedup_vs_torch": speedup,
        "speedup_vs_torch_all_threads": speedup_all,
        "speedup_definition": (
            "network_steps_per_s (ours) / torch_steps_per_s: the PyTorch loop trains one network, "
            "python for-loop over batches, zero_grad/backward/step; torch_steps_per_s is the faster of "
            "torch.set_num_threads(os.cpu_count()) and torch.set_num_threads(1) (torch.num_threads_used); "
            "speedup_vs_torch_all_threads compares with the os.cpu_count() setting alone"
        ),
        "loadavg_at_end": loadavg(),
        "max_background_cores": max((v for v in backgrounds if v is not None), default=None),
        "note": (
            "background_cores = CPU cores used by other processes during a timed section (time-weighted "
            "mean over the rounds); timings taken while it is large are contaminated"
        ),
        "targets": TARGETS,
        "meets_speedup_target": bool(speedup >= t_speed["speedup_min"])
        if is_target(t_speed) and speedup is not None
        else None,
        "meets_peak_target": bool(gflops / peak_gflops >= t_peak["fraction_of_peak_min"])
        if is_target(t_peak)
        else None,
    }
    print_report(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
