"""One figure style for the whole project: colour-blind-safe colours per guidance-rule family.

Importing this module changes no global state: the style is applied with the context
manager :func:`style` (``with plotting.style(): ...``), and ``matplotlib.use(...)`` is left
to scripts (an experiment's ``main`` calls ``matplotlib.use("Agg")``; the library never
does).  ``cfgzero_theory/__init__.py`` does not import this module.

Colours are the Okabe–Ito palette (Okabe & Ito 2008), distinguishable under the common
colour-vision deficiencies; each rule family also has its own line style and marker, so
figures survive greyscale printing:

==================  ===================  ==========  ======
family              colour               line        marker
==================  ===================  ==========  ======
``exact``           black                solid       ``*``
``conditional``     reddish purple       dash-dot    ``D``
``unconditional``   sky blue             dotted      ``v``
``cfg``             vermillion           solid       ``o``
``cfg-star``        blue                 dashed      ``s``
``zero-init``       orange               dotted      ``^``
``cfg-zero-star``   bluish green         solid       ``P``
``other``           grey                 solid       ``.``
==================  ===================  ==========  ======

Families are the guidance kinds of :data:`cfgzero_theory.guidance.KINDS` plus ``exact``,
``unconditional`` and ``other``; a rule says its own family
(:func:`cfgzero_theory.guidance.rule_family`): its kind, ``unconditional`` for CFG at
``w = 0``, ``other`` for rules outside the kinds (APG, TCFG, …), and the wrappers of
:mod:`cfgzero_theory.guidance_family` (interval, rescale, channel subset, …) take their inner
rule's family.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator

import numpy as np

from cfgzero_theory import guidance
from cfgzero_theory.files import atomic_write_bytes

#: The Okabe–Ito palette.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "grey": "#999999",
}

#: Colour of each rule family (see the module docstring).
FAMILY_COLORS = {
    "exact": OKABE_ITO["black"],
    "conditional": OKABE_ITO["reddish_purple"],
    "unconditional": OKABE_ITO["sky_blue"],
    "cfg": OKABE_ITO["vermillion"],
    "cfg-star": OKABE_ITO["blue"],
    "zero-init": OKABE_ITO["orange"],
    "cfg-zero-star": OKABE_ITO["bluish_green"],
    "other": OKABE_ITO["grey"],
}

FAMILY_LINESTYLES = {
    "exact": "-",
    "conditional": "-.",
    "unconditional": ":",
    "cfg": "-",
    "cfg-star": "--",
    "zero-init": ":",
    "cfg-zero-star": "-",
    "other": "-",
}

FAMILY_MARKERS = {
    "exact": "*",
    "conditional": "D",
    "unconditional": "v",
    "cfg": "o",
    "cfg-star": "s",
    "zero-init": "^",
    "cfg-zero-star": "P",
    "other": ".",
}

#: Sequential colour map for density backgrounds (light, so coloured markers stay visible).
DENSITY_CMAP = "Greys"

#: rcParams applied by :func:`style`.
STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 4.5,
    "legend.frameon": False,
    "image.cmap": DENSITY_CMAP,
    "pdf.fonttype": 42,  # embed TrueType: text stays editable in the PDF
}


def rule_family(rule) -> str:
    """The family name of a guidance rule (or a family name passed through unchanged)."""
    if isinstance(rule, str):
        if rule not in FAMILY_COLORS:
            raise ValueError(f"rule family must be one of {sorted(FAMILY_COLORS)}, got {rule!r}")
        return rule
    return guidance.rule_family(rule)


def rule_color(rule) -> str:
    """The fixed colour (hex) of a rule's family; ``rule`` is a rule object or a family name."""
    return FAMILY_COLORS[rule_family(rule)]


def rule_style(rule) -> dict:
    """``color``, ``linestyle`` and ``marker`` keyword arguments for a rule's family."""
    family = rule_family(rule)
    return {"color": FAMILY_COLORS[family], "linestyle": FAMILY_LINESTYLES[family], "marker": FAMILY_MARKERS[family]}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Apply the project style inside a ``with`` block (``matplotlib.rc_context``), nothing global."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def density_image(
    ax,
    log_density_fn: Callable,
    lo,
    hi,
    res: int = 200,
    *,
    cmap: str = DENSITY_CMAP,
    gamma: float = 0.5,
    **imshow_kwargs,
):
    """Draw a 2-D density as a background image on ``ax`` and return the ``AxesImage``.

    ``log_density_fn`` maps points ``(m, 2)`` to log-densities ``(m,)`` (e.g.
    ``lambda x: mixture.log_prob(x, label)``); it is evaluated at the centres of a
    ``res × res`` grid over ``[lo, hi]²`` (``lo``/``hi`` scalars or ``(x, y)`` pairs).  The
    density is shown as ``exp(log p − max log p)`` with a power-law colour scale
    (``gamma < 1`` lifts the tails), under any later scatter (``zorder=0``).
    """
    from matplotlib.colors import PowerNorm

    if not callable(log_density_fn):
        raise ValueError(f"log_density_fn must be callable, got {type(log_density_fn).__name__}")
    if not (isinstance(res, (int, np.integer)) and res >= 2):
        raise ValueError(f"res must be an integer >= 2, got {res!r}")
    lo_, hi_ = np.broadcast_to(np.asarray(lo, float), (2,)), np.broadcast_to(np.asarray(hi, float), (2,))
    if np.any(hi_ <= lo_):
        raise ValueError(f"hi must exceed lo in both coordinates, got lo={lo!r}, hi={hi!r}")
    cx = lo_[0] + (np.arange(res) + 0.5) * (hi_[0] - lo_[0]) / res
    cy = lo_[1] + (np.arange(res) + 0.5) * (hi_[1] - lo_[1]) / res
    gx, gy = np.meshgrid(cx, cy, indexing="xy")  # rows are y, as imshow expects
    log_p = np.asarray(log_density_fn(np.stack([gx.ravel(), gy.ravel()], axis=-1)), dtype=np.float64)
    density = np.exp(log_p - np.max(log_p)).reshape(gy.shape)
    kwargs = dict(origin="lower", extent=(lo_[0], hi_[0], lo_[1], hi_[1]), cmap=cmap, interpolation="bilinear", zorder=0)
    kwargs.update(imshow_kwargs)
    image = ax.imshow(density, norm=PowerNorm(gamma, vmin=0.0, vmax=1.0), **kwargs)
    ax.set_xlim(lo_[0], hi_[0])
    ax.set_ylim(lo_[1], hi_[1])
    ax.set_aspect("equal")
    ax.grid(False)
    return image


def save(fig, path_without_ext, formats=("png", "pdf")) -> list[str]:
    """Write ``fig`` as ``path.png`` and ``path.pdf``, each atomically (:mod:`cfgzero_theory.files`),
    creating the folder; return the paths."""
    path = os.fspath(path_without_ext)
    root, ext = os.path.splitext(path)
    if ext.lower().lstrip(".") in formats:
        raise ValueError(f"path_without_ext must not carry an extension, got {path!r}")
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    written = []
    for fmt in formats:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=STYLE["savefig.dpi"], bbox_inches="tight")
        written.append(atomic_write_bytes(f"{path}.{fmt}", buffer.getvalue()))
    return written
