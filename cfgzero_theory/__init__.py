"""cfgzero_theory: classifier-free guidance in flow matching, exact and measurable, in JAX.

Layers (data flows one way): ``mixture`` (exact Gaussian-mixture fields) → ``guidance``
(rules and the exact guided field) → ``sampling`` (jitted ODE solvers) → ``metrics`` (exact
sample quality).  ``mixtures`` is the catalog of ready-made mixtures; ``plotting`` (not
imported here, so importing the package never loads matplotlib) holds the figure style.
"""

from cfgzero_theory import guidance, metrics, mixtures, sampling
from cfgzero_theory.guidance import CFG, CFGStar, CFGZeroStar, ZeroInit
from cfgzero_theory.mixture import NULL_LABEL, GaussianMixture

__version__ = "0.1.0"
__all__ = [
    "CFG",
    "CFGStar",
    "CFGZeroStar",
    "GaussianMixture",
    "NULL_LABEL",
    "ZeroInit",
    "__version__",
    "guidance",
    "metrics",
    "mixtures",
    "sampling",
]
