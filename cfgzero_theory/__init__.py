"""cfgzero_theory: classifier-free guidance in flow matching, exact and measurable, in JAX.

Layers (data flows one way): ``mixture`` (exact Gaussian-mixture fields) → ``guidance`` and
``guidance_family`` (rules and the exact guided field) → ``schedules`` / ``unipc`` (diffusers'
σ schedules and solvers) → ``sampling`` (jitted loops, theory and σ convention) and
``presets`` (the paper's sampler configurations) → ``metrics`` (exact sample quality).  ``mixtures`` is the catalog of ready-made mixtures; ``plotting`` (not
imported here, so importing the package never loads matplotlib) holds the figure style.
"""

from cfgzero_theory import guidance, guidance_family, metrics, mixtures, presets, sampling, schedules, unipc
from cfgzero_theory.guidance import CFG, KINDS, CFGStar, CFGZeroStar, ZeroInit, make_rule
from cfgzero_theory.mixture import NULL_LABEL, GaussianMixture

__version__ = "0.1.0"
__all__ = [
    "CFG",
    "CFGStar",
    "CFGZeroStar",
    "GaussianMixture",
    "KINDS",
    "NULL_LABEL",
    "ZeroInit",
    "__version__",
    "guidance",
    "guidance_family",
    "make_rule",
    "metrics",
    "mixtures",
    "presets",
    "sampling",
    "schedules",
    "unipc",
]
