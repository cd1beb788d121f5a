"""Animated sampling trajectories for lectures: noise becomes data, rule against rule.

:func:`animate_trajectories` integrates the guided ODE ``dx/dt = ṽ_t(x)`` of a 2-D model
once per guidance rule, from the *same* noise points, and writes an animation with one
panel per rule (e.g. CFG and CFG-Zero* at ``w = 4``, side by side):

* the points move from noise (``t = 0``) to data (``t = 1``), each with a short fading trail
  of its last positions;
* behind them, the exact noised class density ``p_t(x | c)`` of the mixture is drawn as a
  grey image that changes with ``t`` (``N(0, I)`` at ``t = 0``, the class data density at
  ``t = 1``), so the audience sees where the points *should* be at every moment;
* each panel's title names the rule, the current time ``t`` and the solver step under way,
  counted from 1 for the audience (``step 1/N`` is solver step ``i = 0``, the one ``K = 1``
  zeroes), and says ``zero velocity`` while the rule applies a zero velocity (zero-init
  steps, detected from the velocities the sampler used, so any rule works).

Conventions (docs/design.md §2): theory time, ``t = 0`` noise, ``t = 1`` data; the field is
``velocity_fn(params, x, t, label)`` in the sampler's protocol
(:mod:`cfgzero_theory.sampling`): by default the exact field of the mixture
(``GaussianMixture.velocity`` with ``params = mixture``), or a learned network
(``velocity_fn = models.network_velocity``, ``params`` one unstacked
:class:`~cfgzero_theory.models.Network`).  The background is always the *exact* density.

Frames: frame ``f`` shows time ``t_i + (f mod F)/F·(t_{i+1} − t_i)`` with ``i = ⌊f / F⌋`` and
``F = frames_per_step``; between two solver states the points are drawn on the straight
segment joining them (the path of an Euler step).  There are ``num_steps·F + 1`` frames; the
last one (``t = 1``) is held ``hold`` seconds longer (GIF: a longer frame duration; MP4:
repeated frames).

Output: a GIF always (matplotlib's Pillow writer); an MP4 only where matplotlib finds ffmpeg
(``matplotlib.animation.writers.is_available("ffmpeg")``), otherwise the MP4 is skipped and
the returned list of written paths says so.  Files are written to a temporary file in the
target folder and renamed onto the target (``os.replace``), so a reader never sees half a
file.  The module never calls ``matplotlib.use`` and never touches pyplot: figures are
plain :class:`matplotlib.figure.Figure` objects.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from cfgzero_theory import plotting
from cfgzero_theory.guidance import describe
from cfgzero_theory.mixture import GaussianMixture
from cfgzero_theory.sampling import SOLVERS, sample, time_grid
from cfgzero_theory.validation import check_choice, check_int, check_real

__all__ = ["FORMATS", "TITLE_SPACE", "animate_trajectories", "check_view", "default_view", "frame_count", "frame_size"]

#: File formats :func:`animate_trajectories` can write.
FORMATS = ("gif", "mp4")

#: Height (inches) added above the square panels for the titles.
TITLE_SPACE = 0.9

#: Half-width of the box that always stays in view around the origin (the noise at t = 0).
NOISE_HALF_WIDTH = 3.0


def frame_count(num_steps: int, frames_per_step: int = 1) -> int:
    """Number of frames of an animation: ``num_steps·frames_per_step + 1``."""
    return num_steps * frames_per_step + 1


def frame_size(num_panels: int, panel_size: float = 4.0, dpi: int = 100) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of every frame: ``num_panels·panel_size`` by ``panel_size + TITLE_SPACE`` inches at ``dpi``."""
    return round(num_panels * panel_size * dpi), round((panel_size + TITLE_SPACE) * dpi)


def default_view(mixture: GaussianMixture, label=None, points=None, margin: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """A square view ``(lo, hi)`` holding the noise, the class's components and most of ``points``.

    The union of ``[−3, 3]²`` (the bulk of ``N(0, I)``), the mean ± 4 standard deviations of
    every component of class ``label`` (of every component for ``None``) and, if given, the
    0.5–99.5 % quantiles of ``points`` ``(..., 2)`` per coordinate; widened by ``margin`` of
    its size on each side and made square around its centre (panels have equal aspect).
    """
    label = mixture.check_label(label)
    keep = np.ones(mixture.num_components, bool) if label is None else np.asarray(mixture.labels) == label
    keep &= np.asarray(mixture.weights) > 0
    means = np.asarray(mixture.means, np.float64)[keep]
    covs = np.asarray(mixture.covs, np.float64)[keep]
    stds = np.sqrt(np.clip(np.diagonal(covs, axis1=1, axis2=2), 0.0, None))
    lo = np.minimum((means - 4 * stds).min(0), -NOISE_HALF_WIDTH)
    hi = np.maximum((means + 4 * stds).max(0), NOISE_HALF_WIDTH)
    if points is not None:
        flat = np.asarray(points, np.float64).reshape(-1, 2)
        flat = flat[np.all(np.isfinite(flat), axis=1)]
        if flat.size:
            lo = np.minimum(lo, np.quantile(flat, 0.005, axis=0))
            hi = np.maximum(hi, np.quantile(flat, 0.995, axis=0))
    centre, half = 0.5 * (lo + hi), 0.5 * float(np.max(hi - lo)) * (1 + 2 * margin)
    return centre - half, centre + half


# ----------------------------------------------------------------------------- validation
def _named_rules(rules) -> list[tuple[str, object]]:
    """``rules`` (a mapping title → rule, or a sequence of rules) as ``[(title, rule), ...]``."""
    if isinstance(rules, Mapping):
        items = list(rules.items())
        if not all(isinstance(name, str) for name, _ in items):
            raise ValueError("rules: the keys of a mapping must be titles (str)")
    elif isinstance(rules, Sequence) and not isinstance(rules, str):
        items = [(describe(rule) if callable(rule) else "", rule) for rule in rules]
    elif callable(rules):
        items = [(describe(rules), rules)]
    else:
        raise ValueError(f"rules must be a guidance rule, a sequence of rules or a mapping title -> rule, got {type(rules).__name__}")
    if not items:
        raise ValueError("rules must hold at least one guidance rule")
    for name, rule in items:
        if not callable(rule):
            raise ValueError(f"rules: {name or rule!r} is not a guidance rule (not callable)")
    return items


def check_view(grid) -> tuple[np.ndarray, np.ndarray]:
    """A plotting window ``(lo, hi)`` of scalars or ``(x, y)`` pairs as two finite ``(2,)`` arrays, ``hi > lo``."""
    try:
        lo, hi = grid
        lo = np.broadcast_to(np.asarray(lo, np.float64), (2,))
        hi = np.broadcast_to(np.asarray(hi, np.float64), (2,))
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (lo, hi) of scalars or (x, y) pairs, got {grid!r}") from None
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(hi > lo)):
        raise ValueError(f"grid must have finite bounds with hi > lo in both coordinates, got {grid!r}")
    return lo, hi


def _output_root(path) -> str:
    try:
        root = os.fspath(path)
    except TypeError:
        raise ValueError(f"path must be a file path without extension, got {path!r}") from None
    if not root or root.endswith(os.sep):
        raise ValueError(f"path must name a file (without extension), got {root!r}")
    if os.path.splitext(root)[1].lower().lstrip(".") in FORMATS:
        raise ValueError(f"path must not carry an extension (the formats add it), got {root!r}")
    return root


# ----------------------------------------------------------------------------- writing
def _ffmpeg_available() -> bool:
    from matplotlib import animation

    return animation.writers.is_available("ffmpeg")


def _atomic_target(target: str, fmt: str) -> str:
    """A fresh temporary name next to ``target`` that keeps the extension (writers pick the format from it)."""
    folder, base = os.path.split(target)
    return os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp.{fmt}")


def _write(fig, draw: Callable[[int], None], num_frames: int, target: str, fmt: str, fps: float, hold: float, dpi: int):
    """Render every frame with ``draw(f)`` into ``target`` (GIF or MP4), atomically."""
    from matplotlib import animation

    tmp = _atomic_target(target, fmt)
    extra = max(0, round(hold * fps)) if fmt == "mp4" else 0
    if fmt == "gif":
        writer = _holding_pillow_writer(fps, hold)
    else:  # yuv420p (playable everywhere) needs even dimensions: pad by one pixel if needed
        writer = animation.FFMpegWriter(
            fps=fps, codec="h264", extra_args=["-pix_fmt", "yuv420p", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
        )
    try:
        with writer.saving(fig, tmp, dpi):
            for f in range(num_frames):
                draw(f)
                writer.grab_frame()
            for _ in range(extra):
                writer.grab_frame()
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _holding_pillow_writer(fps: float, hold: float):
    """matplotlib's Pillow GIF writer, with the last frame shown ``hold`` seconds longer."""
    from matplotlib.animation import PillowWriter

    class HoldingPillowWriter(PillowWriter):
        def finish(self):
            durations = [int(1000 / self.fps)] * len(self._frames)
            durations[-1] += int(1000 * hold)
            self._frames[0].save(self.outfile, save_all=True, append_images=self._frames[1:], duration=durations, loop=0)

    return HoldingPillowWriter(fps=fps)


# ----------------------------------------------------------------------------- the animation
def animate_trajectories(
    mixture: GaussianMixture,
    label,
    rules,
    path,
    *,
    num_points: int = 400,
    num_steps: int = 25,
    seed: int = 0,
    fps: float = 6.0,
    velocity_fn: Callable = GaussianMixture.velocity,
    params=None,
    grid=None,
    solver: str = "euler",
    shift: float = 1.0,
    frames_per_step: int = 1,
    trail: int = 4,
    hold: float = 1.5,
    res: int = 120,
    panel_size: float = 4.0,
    dpi: int = 100,
    field_name: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[str]:
    """Animate guided sampling of a 2-D class, one panel per rule, over the exact ``p_t(x | c)``.

    Every rule integrates ``dx/dt = rule(v(x, t, c), v(x, t, ∅), step)`` with
    :func:`~cfgzero_theory.sampling.sample` from the same ``num_points`` noise points
    ``x0 ~ N(0, I)`` (drawn from ``jax.random.key(seed)``) on ``time_grid(num_steps, shift)``.
    See the module docstring for what the frames show.

    Args:
      mixture: the exact 2-D :class:`~cfgzero_theory.GaussianMixture` (the background, and
        the field when ``velocity_fn`` is the default).
      label: the guided class (an int), or ``None`` for the whole mixture (then both branches
        are unconditional and guidance does nothing).
      rules: a guidance rule, a sequence of rules (titled with
        :func:`~cfgzero_theory.guidance.describe`), or a mapping title → rule; one panel each,
        coloured by :func:`~cfgzero_theory.plotting.rule_color`.
      path: output path *without* extension; ``path.gif`` (and ``path.mp4``) are written,
        creating the folder.
      num_points: noise points per panel.
      num_steps: solver steps ``N``.
      seed: seed of the noise points.
      fps: frames per second.
      velocity_fn: ``(params, x, t, label) -> velocity`` (default: the exact mixture field).
      params: pytree handed to ``velocity_fn``: ``None`` means ``mixture`` and is allowed only
        with the default ``velocity_fn``; for a learned network, one unstacked ``Network``
        (``models.select(networks, seed)``).
      grid: the view ``(lo, hi)`` (scalars or ``(x, y)`` pairs); default :func:`default_view`
        of the mixture and every trajectory.
      solver: ``"euler"`` or ``"heun"``.
      shift: time shift of the grid (``> 1`` puts more steps near the noise).
      frames_per_step: frames per solver step ``F`` (``> 1`` interpolates along each step).
      trail: number of previous frames each point's fading trail reaches back (``0``: none).
      hold: extra seconds the last frame is shown.
      res: background image resolution (cells per axis).
      panel_size: size of one square panel, inches (frames are :func:`frame_size` pixels).
      dpi: pixels per inch of the frames.
      field_name: what the field is, for the figure's heading (default ``"exact field"``
        for the default ``velocity_fn``, ``"model field"`` otherwise).
      formats: any of ``("gif", "mp4")``; the GIF is always written (it is added if
        missing), the MP4 only where ffmpeg is available.

    Returns:
      The paths written, GIF first: ``[path.gif, path.mp4]``, or ``[path.gif]`` when ffmpeg is
      absent or ``"mp4"`` was not asked for.

    Raises:
      ValueError: naming the argument, for a mixture that is not 2-D, an unknown class, no or
        non-callable rules, a path with an extension, non-positive sizes, counts or rates,
        an unknown solver or format, or a malformed ``grid``.
    """
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
    if mixture.dim != 2:
        raise ValueError(f"mixture must be 2-D to be animated, got dimension {mixture.dim}")
    if label is not None:
        label = check_int("label", label)
    label = mixture.check_label(label)  # ValueError naming the label if it has no component
    named = _named_rules(rules)
    root = _output_root(path)
    num_points = check_int("num_points", num_points, minimum=1)
    num_steps = check_int("num_steps", num_steps, minimum=1)
    frames_per_step = check_int("frames_per_step", frames_per_step, minimum=1)
    trail = check_int("trail", trail, minimum=0)
    res = check_int("res", res, minimum=2)
    dpi = check_int("dpi", dpi, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    fps = check_real("fps", fps, positive=True)
    hold = check_real("hold", hold, minimum=0.0)
    shift = check_real("shift", shift, positive=True)
    panel_size = check_real("panel_size", panel_size, positive=True)
    check_choice("solver", solver, SOLVERS)
    if not callable(velocity_fn):
        raise ValueError(f"velocity_fn must be callable, got {type(velocity_fn).__name__}")
    exact = velocity_fn is GaussianMixture.velocity
    if params is None:
        if not exact:
            raise ValueError("params must be given when velocity_fn is not the exact mixture field")
        params = mixture
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty selection of {FORMATS}, got {formats!r}")
    view = None if grid is None else check_view(grid)
    if field_name is None:
        field_name = "exact field" if exact else "model field"

    # ---- integrate every rule from the same noise
    times = time_grid(num_steps, shift)
    x0 = jax.random.normal(jax.random.key(seed), (num_points, 2), mixture.dtype)
    runs = []
    for name, rule in named:
        out = sample(velocity_fn, params, x0, times, label, rule, solver=solver, return_trajectory=True)
        trajectory = np.asarray(out.trajectory, np.float64)  # (N + 1, B, 2)
        zeroed = np.all(np.asarray(out.guided) == 0, axis=(1, 2))  # (N,) steps the rule zeroed
        runs.append((name, rule, trajectory, zeroed))
    lo, hi = view if view is not None else default_view(mixture, label, np.stack([r[2] for r in runs]))

    # ---- frame positions and times (straight segments between solver states)
    t_np = np.asarray(times, np.float64)
    num_frames = frame_count(num_steps, frames_per_step)
    frame = np.arange(num_frames)
    step = np.minimum(frame // frames_per_step, num_steps - 1)
    frac = (frame - step * frames_per_step) / frames_per_step  # 1.0 only on the last frame
    frame_t = (1 - frac) * t_np[step] + frac * t_np[step + 1]
    frame_step = frame // frames_per_step  # == num_steps on the last frame
    positions = [(1 - frac)[:, None, None] * traj[step] + frac[:, None, None] * traj[step + 1] for _, _, traj, _ in runs]
    # the data density of a singular mixture does not exist: stop the background just short of t = 1
    t_background = np.minimum(frame_t, 1 - 1e-3) if mixture.is_singular else frame_t

    from matplotlib import rc_context
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    want_mp4 = "mp4" in formats and _ffmpeg_available()
    folder = os.path.dirname(root)
    if folder:
        os.makedirs(folder, exist_ok=True)

    written = []
    with plotting.style(), rc_context({"savefig.bbox": "standard"}):  # frames must keep one size
        panels = len(runs)
        width, height = frame_size(panels, panel_size, dpi)
        # a hundredth of a pixel more, so that the writers' int(inches * dpi) gives exactly the frame size
        fig = Figure(figsize=((width + 0.01) / dpi, (height + 0.01) / dpi), dpi=dpi)
        top = 1 - TITLE_SPACE / (panel_size + TITLE_SPACE)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=top, wspace=0.06)
        class_name = "the whole mixture" if label is None else f"class c = {label}"
        fig.suptitle(
            f"{field_name}, {class_name}, {num_steps} {solver} steps · background: exact p_t(x | c)",
            y=1 - 0.12 * TITLE_SPACE / (panel_size + TITLE_SPACE), fontsize=9,
        )
        axes = [fig.add_subplot(1, panels, k + 1) for k in range(panels)]
        artists = []
        for ax, (name, rule, _, _), pos in zip(axes, runs, positions):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(plotting.OKABE_ITO["grey"])
            color = plotting.rule_color(rule)
            trails = LineCollection([], linewidths=0.8, zorder=2)
            ax.add_collection(trails)
            dots = ax.scatter(pos[0, :, 0], pos[0, :, 1], s=5, color=color, linewidths=0, zorder=3)
            title = ax.set_title("", loc="left")
            artists.append({"image": None, "trails": trails, "dots": dots, "title": title, "color": to_rgba(color)})

        cache = {}  # frame -> log-density on the grid, shared by the panels

        def log_density_at(f: int):
            def log_density(x):
                if f not in cache:
                    cache.clear()
                    cache[f] = mixture.log_prob_t(x, float(t_background[f]), label)
                return cache[f]

            return log_density

        def draw(f: int):
            for ax, art, (name, _, _, zeroed), pos in zip(axes, artists, runs, positions):
                if art["image"] is not None:
                    art["image"].remove()
                art["image"] = plotting.density_image(ax, log_density_at(f), lo, hi, res)
                art["dots"].set_offsets(pos[f])
                first = max(0, f - trail)
                if f > first:
                    seg = np.stack([pos[first:f], pos[first + 1 : f + 1]], axis=2)  # (L, B, 2 ends, 2)
                    age = np.arange(f - first, 0, -1)  # 1 = newest segment
                    alpha = 0.55 * (1 - (age - 1) / max(trail, 1))
                    colors = np.repeat(np.array([(*art["color"][:3], a) for a in alpha]), pos.shape[1], axis=0)
                    art["trails"].set_segments(seg.reshape(-1, 2, 2))
                    art["trails"].set_color(colors)
                else:
                    art["trails"].set_segments([])
                i = frame_step[f]
                if i >= num_steps:
                    status = f"t = 1.000 · done ({num_steps} steps)"
                else:
                    status = f"t = {frame_t[f]:.3f} · step {i + 1}/{num_steps}"
                    if zeroed[i]:
                        status += " · zero velocity"
                art["title"].set_text(f"{name}\n{status}")

        targets = [("gif", f"{root}.gif")] + ([("mp4", f"{root}.mp4")] if want_mp4 else [])
        for fmt, target in targets:
            _write(fig, draw, num_frames, target, fmt, fps, hold, dpi)
            written.append(target)
    return written
