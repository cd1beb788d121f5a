"""Plumbing shared by the benchmarks (``bench_exact``, ``bench_training``, ``bench_sampler``,
``bench_pipeline``): machine description, load measurement, interleaved timing, the JSON
report line, the PyTorch twin of ``VelocityMLP`` that two of them race against, and the pieces
the per-model pipeline benchmarks share (``bench_flux``, ``bench_wan``, ``bench_lumina``: building
the pipeline pair, per-step division, agreement, decode memory).

Every benchmark prints its report as one strict JSON object on the last line of stdout
(:func:`print_report`).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import resource
import statistics
import time

import numpy as np

from experiments._common import strict_json


# --------------------------------------------------------------------------- report
def print_report(report: dict) -> None:
    """Print ``report`` as one line of strict JSON (non-finite floats as ``null``), the last
    stdout line of every benchmark."""
    print(json.dumps(strict_json(report), allow_nan=False), flush=True)


def format_number(value) -> str:
    """``value`` with two decimals, ``"?"`` for ``None`` (e.g. an unknown background load)."""
    return "?" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------- machine state
def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``), ``None`` where unavailable."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _busy_jiffies() -> int | None:
    """Busy CPU time of the whole machine (all processes), in clock ticks, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal


def _own_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadMeter:
    """CPU cores used by *other* processes while a ``with`` block ran (a contamination indicator).

    ``background_cores = (machine busy seconds − this process's CPU seconds) / wall seconds``
    over the block, clipped at 0; ``None`` where ``/proc/stat`` cannot be read.
    """

    def __enter__(self):
        self.busy, self.own, self.wall = _busy_jiffies(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy = _busy_jiffies()
        wall = time.perf_counter() - self.wall
        if busy is None or self.busy is None or wall <= 0:
            self.background_cores = None
        else:
            other = (busy - self.busy) / os.sysconf("SC_CLK_TCK") - (_own_cpu_seconds() - self.own)
            self.background_cores = max(0.0, other / wall)
        return False


def openblas_libraries() -> list:
    """The OpenBLAS libraries loaded in this process (NumPy's and SciPy's are separate copies),
    as ``(file name, set_num_threads, get_num_threads)`` triples."""
    paths = set()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1]
                name = os.path.basename(path).lower()
                if "openblas" in name and ".so" in name:
                    paths.add(path)
    except OSError:
        return []
    libs = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = getter = None
        for suffix in ("", "64_", "_64_"):
            for prefix in ("scipy_openblas", "openblas"):
                setter = setter or getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getter or getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
        if setter is not None and getter is not None:
            getter.restype = ctypes.c_int
            libs.append((os.path.basename(path), setter, getter))
    return libs


def blas_threads() -> dict:
    """Threads of every loaded OpenBLAS, by library file name."""
    return {name: int(getter()) for name, _, getter in openblas_libraries()}


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # pragma: no cover - informational only
        return None


def _cpu_model() -> str | None:
    """The first ``model name`` of /proc/cpuinfo, ``None`` where unavailable."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment() -> dict:
    """Versions, backend, cores, CPU model, BLAS threads, thread variables and the load average
    at the start: the machine a benchmark ran on (every report carries these keys)."""
    import jax
    import scipy

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "numpy_version": np.__version__,
        "scipy_version": scipy.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "cpu_model": _cpu_model(),
        "dtype": "float32",
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "blas_threads_default": blas_threads(),
        "thread_env": {
            key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        },
        "loadavg_at_start": loadavg(),
    }


# --------------------------------------------------------------------------- timing
def interleaved_timings(sections: dict, rounds: int, warmup: int) -> dict:
    """Median seconds per call of every ``sections[name] = (fn, calls)``, timed in interleaved rounds.

    After ``warmup`` untimed calls of each, every round times each section once (``calls``
    calls of ``fn`` in a row, the mean recorded), in an order rotated from round to round, so
    that every contender sees the same background load (a shared machine's load drifts over a
    run).  Fields: ``seconds`` (median), ``min_seconds``, ``max_seconds``, ``calls_per_repeat``,
    ``repeats``, ``background_cores`` (:class:`LoadMeter`, time-weighted mean over the rounds),
    the per-round ``samples_seconds`` and ``background_cores_per_repeat``.
    """
    names = list(sections)
    for name in names:
        fn, _ = sections[name]
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in names}
    loads = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, calls = sections[name]
            with LoadMeter() as load:
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                elapsed = time.perf_counter() - start
            samples[name].append(elapsed / calls)
            loads[name].append((load.background_cores, elapsed))
    out = {}
    for name in names:
        known = [(b, w) for b, w in loads[name] if b is not None]
        out[name] = {
            "seconds": statistics.median(samples[name]),
            "min_seconds": min(samples[name]),
            "max_seconds": max(samples[name]),
            "calls_per_repeat": sections[name][1],
            "repeats": rounds,
            "background_cores": sum(b * w for b, w in known) / sum(w for _, w in known) if known else None,
            "samples_seconds": samples[name],
            "background_cores_per_repeat": [b for b, _ in loads[name]],
        }
    return out


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled JAX program by XLA's cost analysis (``compiled.cost_analysis()["flops"]``);
    ``None`` where the backend reports none (or zero).  XLA does not see inside custom calls such
    as cuDNN's fused attention, whose work is then missing from the count."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        flops = None if cost is None else cost.get("flops")
        return float(flops) if flops is not None and flops > 0 else None
    except Exception:  # noqa: BLE001 - optional; not every backend reports costs
        return None


# --------------------------------------------------------------------------- VelocityMLP in PyTorch
def layer_sizes(net) -> list[tuple[int, int]]:
    """``(in, out)`` of every Linear layer of ``VelocityMLP`` (a ``NetworkConfig``), in order:
    the first takes ``dim + 2·time_frequencies + class_embedding`` features, ``depth`` hidden
    layers of ``width``, the output layer back to ``dim``."""
    first = net.dim + 2 * net.time_frequencies + net.class_embedding
    widths = [first] + [net.width] * net.depth
    return list(zip(widths[:-1], widths[1:])) + [(net.width, net.dim)]


def pure_dict(state) -> dict:
    """An NNX state as a nested dict of arrays (``nnx.to_pure_dict``)."""
    from flax import nnx

    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def build_torch_model(net, params: dict | None = None):
    """``VelocityMLP`` in PyTorch; with ``params`` (one seed's :func:`pure_dict` of the NNX state), its weights.

    ``v(x, t, label) = Linear_out(act(… act(Linear_1([x, sin(2^k π t), cos(2^k π t), E[label]]))))``,
    ``k = 0 … time_frequencies − 1``, the null label (−1) mapped to the extra embedding row
    ``num_classes``; ``gelu`` is the tanh approximation (``jax.nn.gelu``'s default).
    """
    import torch
    import torch.nn.functional as F

    from cfgzero_theory.models import ACTIVATIONS

    acts = {
        "silu": F.silu,
        "relu": F.relu,
        "gelu": lambda h: F.gelu(h, approximate="tanh"),  # jax.nn.gelu's default
        "tanh": torch.tanh,
    }
    if set(acts) != set(ACTIVATIONS):
        raise RuntimeError(f"activation table out of date: {sorted(ACTIVATIONS)}")

    class TorchVelocityMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.class_embed = torch.nn.Embedding(net.num_classes + 1, net.class_embedding)
            sizes = layer_sizes(net)
            self.hidden = torch.nn.ModuleList([torch.nn.Linear(a, b) for a, b in sizes[:-1]])
            self.out = torch.nn.Linear(*sizes[-1])
            freqs = math.pi * 2.0 ** torch.arange(net.time_frequencies, dtype=torch.float32)
            self.register_buffer("freqs", freqs)
            self.act = acts[net.activation]

        def forward(self, x, t, label):
            phases = t[:, None] * self.freqs
            classes = torch.where(label < 0, net.num_classes, label)  # NULL_LABEL = -1
            h = torch.cat([x, torch.sin(phases), torch.cos(phases), self.class_embed(classes)], dim=-1)
            for layer in self.hidden:
                h = self.act(layer(h))
            return self.out(h)

    model = TorchVelocityMLP()
    if params is not None:
        with torch.no_grad():
            model.class_embed.weight.copy_(torch.from_numpy(np.array(params["class_embed"]["embedding"])))
            layers = list(model.hidden) + [model.out]
            sources = [params["hidden"][i] for i in range(net.depth)] + [params["out"]]
            for layer, src in zip(layers, sources):
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(src["kernel"]).T)))
                layer.bias.copy_(torch.from_numpy(np.array(src["bias"])))
    return model


def time_summary(times) -> dict:
    """Median, min, max and count of a list of seconds."""
    a = np.asarray(times, np.float64)
    return {"median_s": float(np.median(a)), "min_s": float(a.min()), "max_s": float(a.max()), "n": int(a.size)}


def time_call(fn, repeats: int, sync=None, warmup: int = 1) -> dict:
    """``fn()`` ``warmup`` times untimed, then ``repeats`` times timed (``sync()`` inside the span)."""
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        out.append(time.perf_counter() - start)
    return time_summary(out)


def per_step(summary: dict, steps: int) -> dict:
    """A :func:`time_summary` of a whole ``steps``-step loop as seconds per step (``n`` kept)."""
    return {k: (v if k == "n" else v / steps) for k, v in summary.items()}


#: The sections every pipeline benchmark compares (diffusers / ours).
COMPARED_SECTIONS = ("step", "loop_per_step", "denoise", "encode", "decode", "end_to_end")


def finish_report(result: dict, ours: dict, peer: dict, steps: int, *, compile_s: float, variant_compile_s: float,
                  first_call_s: float, variant: str = "cfg_zero_star") -> dict:
    """Complete a per-model pipeline report (``bench_wan``, ``bench_lumina``) whose ``ours`` also
    timed a second rule as ``denoise_<variant>`` / ``end_to_end_<variant>``: per-step loop times,
    compile and first-call times, ``result["ours"]`` / ``["diffusers"]`` and the ratios
    diffusers / ours of :data:`COMPARED_SECTIONS` plus ``end_to_end_vs_ours_<variant>``."""
    ours["loop_per_step"] = per_step(ours["denoise"], steps)
    peer["loop_per_step"] = per_step(peer["denoise"], steps)
    ours[f"loop_per_step_{variant}"] = per_step(ours[f"denoise_{variant}"], steps)
    ours["compile_s"], ours[f"compile_{variant}_s"] = compile_s, variant_compile_s
    peer["first_call_s"] = first_call_s
    result["ours"], result["diffusers"] = ours, peer
    ratios = {key: ratio(peer[key], ours[key]) for key in COMPARED_SECTIONS}
    ratios[f"end_to_end_vs_ours_{variant}"] = ratio(peer["end_to_end"], ours[f"end_to_end_{variant}"])
    result["ratios_diffusers_over_ours"] = ratios
    return result


def decode_memory(gpu: bool, torch, jax_device, ours_decode, peer_decode, sync) -> dict:
    """Peak device memory of one decode on each side of a pipeline benchmark (``bench_wan``,
    ``bench_lumina``); all ``None`` on a CPU, where neither torch nor JAX's CPU client reports an
    allocator peak.

    diffusers: ``torch.cuda.max_memory_allocated`` over ``peer_decode()`` after
    ``reset_peak_memory_stats``; ours: the device's ``memory_stats()["peak_bytes_in_use"]`` after
    ``ours_decode()``, which JAX cannot reset — exact when the decode raised it
    (``ours_peak_set_by_decode``), otherwise an upper bound set earlier in the run.
    """
    if not gpu:
        return {"diffusers_peak_bytes": None, "diffusers_resident_bytes": None, "ours_peak_bytes": None,
                "ours_resident_bytes": None, "ours_peak_set_by_decode": None,
                "note": "not measured on a CPU: neither torch nor JAX's CPU client reports an allocator peak"}
    sync()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    peer_decode()
    sync()
    peer_peak = torch.cuda.max_memory_allocated()
    before = jax_device.memory_stats() or {}
    ours_decode()
    after = jax_device.memory_stats() or {}
    peak_before, peak = before.get("peak_bytes_in_use"), after.get("peak_bytes_in_use")
    return {"diffusers_peak_bytes": int(peer_peak), "diffusers_resident_bytes": int(resident),
            "ours_peak_bytes": peak, "ours_resident_bytes": before.get("bytes_in_use"),
            "ours_peak_set_by_decode": None if peak is None or peak_before is None else bool(peak > peak_before),
            "note": "bytes; resident = allocated before the decode (weights of all models and live arrays); "
                    "diffusers: torch.cuda.max_memory_allocated after reset_peak_memory_stats; ours: JAX's "
                    "memory_stats peak_bytes_in_use, a process-lifetime peak JAX cannot reset: the decode's own "
                    "peak when ours_peak_set_by_decode, else an upper bound set earlier in the run"}


def ratio(peer: dict, ours: dict) -> float:
    """The peer's median over ours (> 1: ours faster)."""
    return peer["median_s"] / ours["median_s"]


def relative_difference(ours, ref) -> dict:
    """``max |ours − ref| / max(1, max |ref|)`` with its parts, and whether both are finite."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ours - ref)))
    return {"max_abs": err, "scale": scale, "relative": err / scale,
            "finite": bool(np.all(np.isfinite(ours)) and np.all(np.isfinite(ref)))}


AGREEMENT_NOTE = "max |ours - diffusers| / max(1, max |diffusers|); a sanity number, not a test"


def agreement(outputs: str, ours_latents, peer_latents, ours_outputs, peer_outputs, variant_latents=None) -> dict:
    """A report's ``agreement``: :func:`relative_difference` of the final latents and of the decoded
    ``outputs`` (``"images"`` or ``"videos"``), and, given ``variant_latents`` (ours under CFG-Zero*),
    whether those are finite."""
    result = {"final_latents": relative_difference(ours_latents, peer_latents),
              outputs: relative_difference(ours_outputs, peer_outputs)}
    if variant_latents is not None:
        result["ours_cfg_zero_star_latents_finite"] = bool(np.all(np.isfinite(variant_latents)))
    return result | {"note": AGREEMENT_NOTE}


def dtypes(name: str, torch) -> tuple:
    """``(torch dtype, JAX dtype)`` for ``--dtype`` ``name`` (``"float32"`` or ``"bfloat16"``)."""
    import jax.numpy as jnp

    return getattr(torch, name), {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def weights_note(perturb) -> str:
    """How a random benchmark pipeline's weights were drawn (its size's ``perturb``)."""
    if perturb is not None:
        return f"default initialisation + {perturb:g}·N(0,1) on every parameter"
    return "default initialisation of the diffusers/transformers classes (not perturbed)"


def build_pipeline_pair(build, load, name: str, seed: int, torch_dtype, jax_dtype, jax_device, torch_device):
    """``(peer, ours, {"build_s", "load_ours_s"})``: the diffusers pipeline ``build(folder, name,
    seed=, torch_dtype=)`` saved to a temporary folder, and ``load(folder, dtype=)`` of it on
    ``jax_device`` (weights on the device before the clock stops); the peer moved to ``torch_device``."""
    import tempfile

    import jax
    from flax import nnx

    seconds = {}
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as folder:
        start = time.perf_counter()
        peer = build(folder, name, seed=seed, torch_dtype=torch_dtype)
        seconds["build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        with jax.default_device(jax_device):
            ours = load(folder, dtype=jax_dtype)
            jax.block_until_ready(nnx.state(ours.transformer))
        seconds["load_ours_s"] = time.perf_counter() - start
    peer.set_progress_bar_config(disable=True)
    peer.to(torch_device)  # already in torch_dtype (cast before saving)
    return peer, ours, seconds
