"""The paper's sampler configurations as data: steps, schedule, solver and default guidance.

A :class:`SamplerPreset` is a small frozen record; :meth:`~SamplerPreset.schedule`,
:meth:`~SamplerPreset.solver` and :meth:`~SamplerPreset.rule` turn it into the three
arguments :func:`~cfgzero_theory.sampling.sample_flow` needs.  Guidance kinds are the one
vocabulary of :func:`cfgzero_theory.guidance.make_rule` (:data:`~cfgzero_theory.guidance.KINDS`):

* ``"cfg"``            CFG with the preset's scale (Lumina: on its first three channels);
* ``"cfg-star"``       the optimized scale, no zero-init;
* ``"zero-init"``      CFG whose first ``K`` steps are zeroed;
* ``"cfg-zero-star"``  CFG-Zero* (optimized scale + zero-init of ``K`` steps);
* ``"conditional"``    the conditional prediction only (``w = 1``), e.g. guidance-distilled
  Flux-dev, whose guidance is an input of the network; ``zero_init_steps > 0`` makes it
  Flux-dev's "zero-init only" variant.

A preset is the one place a model's sampler defaults are declared: the pipelines and the
command lines read their default step count, scale and ``K`` from it.

Sources: the paper's settings (docs/design.md §5: SD3.5-large 28 steps, scale 3.5, zero-init 1;
Wan2.1 T2V 50 UniPC steps, ``flow_shift`` 3.0 at 480p / 5.0 at 720p, scale 5.0, zero-init 2;
Flux-dev 50 steps, distilled guidance 3.5) and otherwise the defaults of the corresponding
diffusers pipelines and scheduler configurations (SD3: 28 steps, shift 3.0, scale 7.0; Flux:
dynamic shift with ``mu`` from the image's token count, sigmas ``linspace(1, 1/N, N)``;
Wan2.1 I2V: 40 steps, shift 5.0; Lumina-Next: 30 steps, scale 4.0, CFG on three channels).
"""

from __future__ import annotations

import dataclasses

from cfgzero_theory.guidance import KINDS, GuidanceRule, make_rule
from cfgzero_theory.sampling import FlowSampleResult, sample_flow
from cfgzero_theory.schedules import FlowMatchEuler, FlowSchedule, flow_match_euler_schedule, flux_mu, flux_sigmas
from cfgzero_theory.unipc import UniPC, unipc_flow_schedule
from cfgzero_theory.validation import check_choice, check_int, check_real

#: The guidance kinds (the same tuple as :data:`cfgzero_theory.guidance.KINDS`).
GUIDANCE_KINDS = KINDS
SOLVERS = ("flow_match_euler", "unipc")


@dataclasses.dataclass(frozen=True)
class SamplerPreset:
    """One sampler configuration.

    ``shift`` is the static shift of the Euler schedule or UniPC's ``flow_shift``;
    ``resolution_shift`` switches on Flux's dynamic shift (``mu`` from the latent token
    count, exponential time shift, the pipeline's custom sigmas); ``guidance_channels``
    restricts guidance to the first channels (Lumina-Next: 3; ``None``: all).
    """

    name: str
    num_steps: int
    solver_name: str
    shift: float
    guidance: str
    scale: float
    zero_init_steps: int
    resolution_shift: bool = False
    guidance_channels: int | None = None
    notes: str = ""

    def __post_init__(self):
        check_choice("solver_name", self.solver_name, SOLVERS)
        check_choice("guidance", self.guidance, GUIDANCE_KINDS)
        numbers = {
            "num_steps": check_int("num_steps", self.num_steps, minimum=1),
            "shift": check_real("shift", self.shift, positive=True),
            "scale": check_real("scale", self.scale),
            "zero_init_steps": check_int("zero_init_steps", self.zero_init_steps, minimum=0),
        }
        if self.guidance_channels is not None:
            numbers["guidance_channels"] = check_int("guidance_channels", self.guidance_channels, minimum=1)
        for name, value in numbers.items():  # stored as Python numbers (np.int64(28) -> 28)
            object.__setattr__(self, name, value)

    def schedule(self, num_steps: int | None = None, *, image_seq_len: int | None = None) -> FlowSchedule:
        """The σ schedule; Flux-style presets need ``image_seq_len`` (latent tokens, e.g. 4096 at 1024²),
        an integer ``>= 1`` (:func:`~cfgzero_theory.schedules.flux_mu`); the time shift stays
        finite however large it is."""
        n = self.num_steps if num_steps is None else num_steps
        if self.solver_name == "unipc":
            return unipc_flow_schedule(n, flow_shift=self.shift)
        if self.resolution_shift:
            if image_seq_len is None:
                raise ValueError(f"image_seq_len is required by the {self.name!r} preset (resolution-dependent shift)")
            return flow_match_euler_schedule(n, use_dynamic_shifting=True, mu=flux_mu(image_seq_len), sigmas=flux_sigmas(n))
        return flow_match_euler_schedule(n, shift=self.shift)

    def solver(self):
        """The solver object (Euler or UniPC order 2, bh2)."""
        return UniPC() if self.solver_name == "unipc" else FlowMatchEuler()

    def rule(self, guidance: str | None = None, *, scale: float | None = None,
             zero_init_steps: int | None = None) -> GuidanceRule:
        """The guidance rule of kind ``guidance`` (default: the preset's) with the preset's numbers."""
        kind = self.guidance if guidance is None else guidance
        check_choice("guidance", kind, GUIDANCE_KINDS)
        w = self.scale if scale is None else scale
        k = zero_init_steps
        if k is None and kind != "cfg" and kind != "cfg-star":
            k = self.zero_init_steps
        return make_rule(kind, None if kind == "conditional" else w, k, channels=self.guidance_channels)

    def sample(self, model_fn, params, latents, context, uncond_context, guidance: str | None = None, *,
               image_seq_len: int | None = None, return_trajectory: bool = False, **rule_options) -> FlowSampleResult:
        """:func:`~cfgzero_theory.sampling.sample_flow` with this preset's schedule, solver and rule.

        ``guidance`` and ``rule_options`` (``scale``, ``zero_init_steps``) go to :meth:`rule`.
        """
        return sample_flow(model_fn, params, latents, self.schedule(image_seq_len=image_seq_len), context,
                           uncond_context, self.rule(guidance, **rule_options), solver=self.solver(),
                           return_trajectory=return_trajectory)


PRESETS: dict[str, SamplerPreset] = {
    p.name: p
    for p in (
        SamplerPreset("sd3", 28, "flow_match_euler", 3.0, "cfg-zero-star", 7.0, 1,
                      notes="SD3-medium: diffusers' default scale 7.0"),
        SamplerPreset("sd3.5-large", 28, "flow_match_euler", 3.0, "cfg-zero-star", 3.5, 1,
                      notes="the paper's SD3.5 setting"),
        SamplerPreset("flux-dev", 50, "flow_match_euler", 1.0, "conditional", 1.0, 1, resolution_shift=True,
                      notes="guidance-distilled: pass guidance 3.5 to the network; zero-init only"),
        SamplerPreset("flux-schnell", 4, "flow_match_euler", 1.0, "conditional", 1.0, 0,
                      notes="timestep-distilled, no guidance embedding; not in the paper: no zero-init by default"),
        SamplerPreset("flux-dev-true-cfg", 50, "flow_match_euler", 1.0, "cfg-zero-star", 4.0, 1,
                      resolution_shift=True,
                      notes="true CFG with a negative prompt (scale 4.0 is our choice, not the paper's)"),
        SamplerPreset("wan2.1-t2v-480p", 50, "unipc", 3.0, "cfg-zero-star", 5.0, 2),
        SamplerPreset("wan2.1-t2v-720p", 50, "unipc", 5.0, "cfg-zero-star", 5.0, 2),
        SamplerPreset("wan2.1-i2v", 40, "unipc", 5.0, "cfg-zero-star", 5.0, 2),
        SamplerPreset("lumina-next", 30, "flow_match_euler", 1.0, "cfg-zero-star", 4.0, 1, guidance_channels=3,
                      notes="lumina.pipeline wraps the network with lumina.convention; the shift comes from the checkpoint"),
    )
}


def get(name: str) -> SamplerPreset:
    """The preset called ``name`` (one of :data:`PRESETS`)."""
    return PRESETS[check_choice("preset", name, sorted(PRESETS))]
