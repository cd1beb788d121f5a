"""Ready-made Gaussian mixtures for teaching and experiments.

Every function here returns a :class:`~cfgzero_theory.mixture.GaussianMixture`.  The
parameters are built with NumPy in float64 and handed to the constructor, which stores them
in float32 (or float64 when ``jax_enable_x64`` is on).  The 2-D presets are deterministic;
:func:`random_class_conditional` draws everything from a ``jax.random`` key.

==================================  ====  ===============================  ===================
preset                              d     components                       labels
==================================  ====  ===============================  ===================
:func:`class_conditional_2d`        2     classes × components per class   class index
:func:`guided_class_2d`             2     the same, placed by ``‖μ_c‖, ‖μ̄‖``  class index
:func:`ring`                        2     ``num_components``               component index
:func:`grid`                        2     ``side²``                        checkerboard parity
:func:`random_class_conditional`    any   classes × components per class   class index
:func:`fractal_tree`                2     ``2·(2^depth − 1)·per branch``   0 and 1 (two trees)
==================================  ====  ===============================  ===================
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cfgzero_theory.mixture import GaussianMixture
from cfgzero_theory.validation import check_int, check_real

__all__ = ["class_conditional_2d", "fractal_tree", "grid", "guided_class_2d", "random_class_conditional", "ring"]

#: Angle (radians) added to every class direction of :func:`class_conditional_2d`; an
#: irrational multiple of π, so no class centre lies on a coordinate axis.
CLASS_ANGLE_OFFSET = 0.3

#: Trunk directions (radians) of the two classes of :func:`fractal_tree`: class 0 grows
#: towards the upper right (40°), class 1 towards the upper left (140°), mirror images; at
#: 45° the innermost twigs of the two default trees would touch above the root.
TREE_TRUNK_ANGLES = (2 * math.pi / 9, 7 * math.pi / 9)

#: Along-branch standard deviation of a tree component, as a fraction of its share of the
#: segment (``segment_length / components_per_branch``): neighbours overlap into a smooth line.
TREE_ALONG_FRACTION = 0.6


# --------------------------------------------------------------------------- presets
def class_conditional_2d(
    num_classes: int = 3,
    components_per_class: int = 4,
    radius: float = 5.0,
    cluster_radius: float = 1.2,
    std: float = 0.35,
    center: tuple[float, float] = (0.0, 0.0),
) -> GaussianMixture:
    """Well-separated 2-D classes of elongated Gaussians, in the spirit of CFG-Zero*'s 2-D toy.

    Geometry: class ``c`` is centred at distance ``radius`` from the origin, at angle
    ``θ_c = 2πc / num_classes + CLASS_ANGLE_OFFSET``.  Its ``components_per_class``
    components sit on a circle of radius ``cluster_radius`` around that centre, at angles
    ``θ_c + 2πj / components_per_class`` (a single component sits at the centre itself).
    Each component is anisotropic: standard deviation ``std`` along the tangent of the small
    circle and ``std / 2`` along its radius, so a class looks like a small ring of dashes.
    Neighbouring class centres are ``2·radius·sin(π / num_classes)`` apart.

    The whole picture is translated by ``center`` (the data mean ``μ̄``; the noise mean is
    the origin).  Away from the origin, a class lying between the origin and ``μ̄`` has an
    exact CFG target ``μ̄ + w(μ_c − μ̄)`` shorter than ``w‖μ_c − μ̄‖``, the first-step error of
    a model that has learned the unconditional field but not yet the class: zero then beats
    early CFG (the crossover study uses this).

    Labels: the class index ``c``; weights are equal (so classes are equally likely too).
    """
    center = np.asarray(center, dtype=np.float64)
    if center.shape != (2,) or not np.all(np.isfinite(center)):
        raise ValueError(f"center must be a finite pair (x, y), got {center.tolist()}")
    num_classes = check_int("num_classes", num_classes, minimum=1)
    components_per_class = check_int("components_per_class", components_per_class, minimum=1)
    radius = check_real("radius", radius, minimum=0.0)
    cluster_radius = check_real("cluster_radius", cluster_radius, minimum=0.0)
    std = check_real("std", std, positive=True)

    class_angles = 2 * np.pi * np.arange(num_classes) / num_classes + CLASS_ANGLE_OFFSET
    centres = center + radius * _unit(class_angles)  # (C, 2)
    spin = 2 * np.pi * np.arange(components_per_class) / components_per_class
    angles = class_angles[:, None] + spin[None, :]  # (C, M)
    offset = 0.0 if components_per_class == 1 else cluster_radius
    means = centres[:, None, :] + offset * _unit(angles)  # (C, M, 2)
    tangents = angles + np.pi / 2
    covs = _oriented_covs(tangents.ravel(), std, std / 2)
    labels = np.repeat(np.arange(num_classes), components_per_class)
    return GaussianMixture(np.ones(labels.size), means.reshape(-1, 2), covs, labels)


def class_axis(label: int, num_classes: int = 3) -> np.ndarray:
    """Unit vector from the centre of :func:`class_conditional_2d` towards class ``label``.

    ``class_conditional_2d(center=-D * class_axis(c))`` puts class ``c`` on the segment
    between the noise mean (the origin) and the data mean, at distance ``|D − radius|`` from
    the origin: the geometry in which a zero first step beats early CFG.
    """
    num_classes = check_int("num_classes", num_classes, minimum=1)
    label = check_int("label", label, minimum=0, maximum=num_classes - 1)
    return _unit(np.float64(2 * np.pi * label / num_classes + CLASS_ANGLE_OFFSET))


def guided_class_2d(distance: float, data_offset: float = 0.0, label: int = 1, **kwargs) -> GaussianMixture:
    """:func:`class_conditional_2d` placed by the two lengths that decide the first guided step.

    Class ``label``'s mean is at ``μ_c = distance·a`` and the data mean at
    ``μ̄ = data_offset·a``, where ``a = class_axis(label)`` and the noise mean is the origin;
    the classes sit at ``radius = distance − data_offset`` around ``μ̄`` (so
    ``0 ≤ data_offset < distance``).  At ``t = 0`` the true conditional velocity is
    ``v* = μ_c − x0`` (the zero velocity's error ``E‖v*‖ ≈ √(distance² + 2)``) and exact CFG
    misses it by the guidance bias ``(w − 1)·radius``: a learned CFG can end below the
    zero velocity's error only where that bias is the smaller.  ``kwargs`` go to
    :func:`class_conditional_2d` (not ``radius`` or ``center``).
    """
    for name in ("radius", "center"):
        if name in kwargs:
            raise ValueError(f"{name} is set by distance and data_offset; do not pass it")
    distance = check_real("distance", distance, positive=True)
    data_offset = check_real("data_offset", data_offset, minimum=0.0)
    if not data_offset < distance:
        raise ValueError(f"data_offset must be < distance, got data_offset={data_offset!r}, distance={distance!r}")
    num_classes = kwargs.get("num_classes", 3)
    axis = class_axis(label, num_classes)
    return class_conditional_2d(radius=distance - data_offset, center=tuple((data_offset * axis).tolist()), **kwargs)


def ring(num_components: int = 8, radius: float = 4.0, std: float = 0.3) -> GaussianMixture:
    """The classic ring: ``num_components`` isotropic Gaussians evenly spaced on a circle.

    Geometry: component ``k`` is centred at ``radius·(cos 2πk/K, sin 2πk/K)`` (the first on
    the positive x-axis) with covariance ``std²·I``; equal weights.

    Labels: each component is its own class, ``label = k``.
    """
    num_components = check_int("num_components", num_components, minimum=1)
    radius = check_real("radius", radius, minimum=0.0)
    std = check_real("std", std, positive=True)

    angles = 2 * np.pi * np.arange(num_components) / num_components
    covs = np.broadcast_to(std**2 * np.eye(2), (num_components, 2, 2))
    means = radius * _unit(angles)
    return GaussianMixture(np.ones(num_components), means, covs, np.arange(num_components))


def grid(side: int = 5, spacing: float = 2.0, std: float = 0.3) -> GaussianMixture:
    """``side × side`` isotropic Gaussians on a square grid centred at the origin.

    Geometry: component ``(i, j)`` (``i`` indexes x, ``j`` indexes y, both in
    ``0 … side − 1``) is centred at ``spacing·(i − (side − 1)/2, j − (side − 1)/2)`` with
    covariance ``std²·I``; equal weights.  Components are ordered with ``i`` slowest.

    Labels: checkerboard parity ``(i + j) mod 2``; the corner ``(0, 0)`` is class 0, so class 0
    has ``⌈side² / 2⌉`` components and class 1 the rest (none when ``side = 1``).
    """
    side = check_int("side", side, minimum=1)
    spacing = check_real("spacing", spacing, positive=True)
    std = check_real("std", std, positive=True)

    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    means = spacing * (np.stack([i.ravel(), j.ravel()], axis=-1) - (side - 1) / 2)
    covs = np.broadcast_to(std**2 * np.eye(2), (side * side, 2, 2))
    labels = (i + j).ravel() % 2
    return GaussianMixture(np.ones(side * side), means, covs, labels)


def random_class_conditional(
    key: jax.Array,
    dim: int,
    num_classes: int = 4,
    components_per_class: int = 4,
    class_separation: float = 4.0,
    component_spread: float = 1.0,
    eig_range: tuple[float, float] = (0.1, 1.0),
) -> GaussianMixture:
    """A random class-conditional mixture in ``dim`` dimensions, with full covariances.

    Geometry (``K = num_classes · components_per_class`` components):

    * class centres ``c ~ N(0, class_separation² / (2·dim) · I)``, so two centres are about
      ``class_separation`` apart (``E‖c − c'‖² = class_separation²``) whatever ``dim`` is;
    * component means ``μ = c + N(0, component_spread² / (2·dim) · I)``, so two components of
      one class are about ``component_spread`` apart;
    * covariances ``Q diag(λ) Qᵀ`` with ``Q`` a Haar-random orthogonal matrix (QR of a Gaussian
      matrix, columns' signs fixed by ``diag(R) > 0``) and eigenvalues ``λ`` log-uniform in
      ``eig_range``;
    * weights uniform in ``[0.5, 1.5)`` before normalisation (no component is negligible).

    Labels: component ``k`` belongs to class ``k // components_per_class``.

    The draws are made in float32 from ``key`` whatever the x64 setting, so the same key gives
    the same mixture in both precisions.  Cost: one ``dim × dim`` QR per component plus the
    constructor's eigendecomposition, about 7 s on two CPU cores at ``dim = 1024`` with 16
    components (the eigendecomposition is half of it).
    """
    dim = check_int("dim", dim, minimum=1)
    num_classes = check_int("num_classes", num_classes, minimum=1)
    components_per_class = check_int("components_per_class", components_per_class, minimum=1)
    class_separation = check_real("class_separation", class_separation, minimum=0.0)
    component_spread = check_real("component_spread", component_spread, minimum=0.0)
    if isinstance(eig_range, (str, bytes)) or not (hasattr(eig_range, "__len__") and len(eig_range) == 2):
        raise ValueError(f"eig_range must be a pair (lo, hi) with 0 < lo <= hi, got {eig_range!r}")
    lo = check_real("eig_range lo", eig_range[0], positive=True)
    hi = check_real("eig_range hi", eig_range[1], minimum=lo)

    k = num_classes * components_per_class
    draws = (np.asarray(a, dtype=np.float64) for a in _standard_draws(key, num_classes, k, dim))
    centre_noise, offset_noise, gaussian_matrices, eig_u, weight_u = draws
    centres = class_separation / math.sqrt(2 * dim) * centre_noise
    offsets = component_spread / math.sqrt(2 * dim) * offset_noise
    means = np.repeat(centres, components_per_class, axis=0) + offsets
    rotations = _haar_orthogonal(gaussian_matrices)
    eigvals = lo * (hi / lo) ** eig_u  # log-uniform on [lo, hi)
    covs = (rotations * eigvals[:, None, :]) @ np.swapaxes(rotations, -1, -2)
    weights = 0.5 + weight_u
    labels = np.repeat(np.arange(num_classes), components_per_class)
    return GaussianMixture(weights, means, covs, labels)


def fractal_tree(
    depth: int = 6,
    components_per_branch: int = 4,
    branch_length: float = 1.0,
    length_decay: float = 0.75,
    branch_angle: float = 0.5,
    width: float = 0.06,
) -> GaussianMixture:
    """Two branching trees of thin Gaussians, after the 2-D toy of Karras et al. (2024).

    ("Guiding a diffusion model with a bad version of itself", the autoguidance paper.)  The
    density is concentrated on thin curves, so it has the low-dimensional, branching
    structure where guidance errors (samples between branches, lost outer twigs) are visible.

    Geometry: each class is a binary tree rooted at the origin.  Its trunk (level 0) has
    length ``branch_length`` and points along ``TREE_TRUNK_ANGLES[class]`` (class 0 towards
    the upper right, at 40°; class 1 towards the upper left, at 140°: mirror images).
    Every segment ends in a fork: two children start at its end, turned by
    ``+branch_angle`` and ``−branch_angle`` (radians) from its direction, with length and
    width multiplied by ``length_decay``.
    There are ``depth`` levels, so ``2^depth − 1`` segments per class.  A segment of length
    ``L`` and width ``W`` is covered by ``components_per_branch`` Gaussians centred at the
    midpoints of equal sub-segments, with standard deviation
    ``TREE_ALONG_FRACTION · L / components_per_branch`` along the segment and ``W`` across
    it (``W = width`` on the trunk).  Component weights are proportional to the segment
    length, so the density is roughly uniform along every branch of both trees.

    Labels: 0 and 1, one tree each.  Total components
    ``2·(2^depth − 1)·components_per_branch`` (504 with the defaults).  The trees share the
    root and diverge from it; with the default angles and decay they overlap only near
    the origin (the innermost twigs stay about 0.4 apart, ~30 widths).
    """
    depth = check_int("depth", depth, minimum=1)
    components_per_branch = check_int("components_per_branch", components_per_branch, minimum=1)
    branch_length = check_real("branch_length", branch_length, positive=True)
    length_decay = check_real("length_decay", length_decay, positive=True)
    branch_angle = check_real("branch_angle", branch_angle)
    width = check_real("width", width, positive=True)

    trees = [
        _cover_segments(
            *_tree_segments(trunk, depth, branch_length, length_decay, branch_angle, width),
            components_per_branch,
        )
        for trunk in TREE_TRUNK_ANGLES
    ]
    means, covs, weights = (np.concatenate(parts) for parts in zip(*trees, strict=True))
    labels = np.repeat(np.arange(len(trees)), [len(tree_weights) for _, _, tree_weights in trees])
    return GaussianMixture(weights, means, covs, labels)


# --------------------------------------------------------------------------- geometry helpers
def _unit(angles: np.ndarray) -> np.ndarray:
    """Unit vectors ``(cos a, sin a)``, shape ``angles.shape + (2,)``."""
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def _oriented_covs(angles: np.ndarray, std_along, std_across) -> np.ndarray:
    """2-D covariances with standard deviation ``std_along`` along the direction ``angles``
    and ``std_across`` perpendicular to it (both scalars or arrays like ``angles``)."""
    along = _unit(angles)
    across = _unit(angles + np.pi / 2)
    std_along = np.broadcast_to(std_along, angles.shape)[..., None, None]
    std_across = np.broadcast_to(std_across, angles.shape)[..., None, None]
    return (
        std_along**2 * along[..., :, None] * along[..., None, :]
        + std_across**2 * across[..., :, None] * across[..., None, :]
    )


def _tree_segments(trunk_angle, depth, length, decay, branch_angle, width):
    """All segments of one tree, level by level: ``(starts (S, 2), angles, lengths, widths)``."""
    starts, angles = np.zeros((1, 2)), np.array([trunk_angle], dtype=np.float64)
    levels = []
    for level in range(depth):
        scale = decay**level
        n = len(angles)
        levels.append((starts, angles, np.full(n, length * scale), np.full(n, width * scale)))
        ends = starts + length * scale * _unit(angles)
        starts = np.repeat(ends, 2, axis=0)
        angles = (angles[:, None] + np.array([branch_angle, -branch_angle])).ravel()
    return tuple(np.concatenate(parts) for parts in zip(*levels, strict=True))


def _cover_segments(starts, angles, lengths, widths, per_segment):
    """Gaussians covering segments: ``(means (S·m, 2), covs (S·m, 2, 2), weights (S·m,))``."""
    fractions = (np.arange(per_segment) + 0.5) / per_segment  # sub-segment midpoints
    direction = _unit(angles)
    means = starts[:, None, :] + (lengths[:, None] * fractions)[:, :, None] * direction[:, None, :]
    std_along = TREE_ALONG_FRACTION * lengths / per_segment
    covs = _oriented_covs(angles, std_along, widths)
    return means.reshape(-1, 2), np.repeat(covs, per_segment, axis=0), np.repeat(lengths, per_segment)


# --------------------------------------------------------------------------- random draws
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _standard_draws(key: jax.Array, num_classes: int, num_components: int, dim: int):
    """The float32 draws behind :func:`random_class_conditional`, in one compiled program.

    Returns standard normals for the class centres ``(C, d)``, the component offsets
    ``(K, d)`` and the rotations ``(K, d, d)``, and uniforms on ``[0, 1)`` for the
    eigenvalues ``(K, d)`` and the weights ``(K,)``.
    """
    keys = jax.random.split(key, 5)
    return (
        jax.random.normal(keys[0], (num_classes, dim), jnp.float32),
        jax.random.normal(keys[1], (num_components, dim), jnp.float32),
        jax.random.normal(keys[2], (num_components, dim, dim), jnp.float32),
        jax.random.uniform(keys[3], (num_components, dim), jnp.float32),
        jax.random.uniform(keys[4], (num_components,), jnp.float32),
    )


def _haar_orthogonal(gaussian: np.ndarray) -> np.ndarray:
    """Haar-distributed orthogonal matrices from a stack of Gaussian matrices ``(..., d, d)``.

    ``G = QR``; multiplying column ``i`` of ``Q`` by ``sign(R_ii)`` makes the factorisation
    unique, and then ``Q`` is uniformly distributed (Mezzadri, 2007).
    """
    q, r = np.linalg.qr(gaussian)
    signs = np.sign(np.diagonal(r, axis1=-2, axis2=-1))
    signs[signs == 0] = 1.0
    return q * signs[..., None, :]
