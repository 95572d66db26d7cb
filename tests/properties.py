"""What every registered method must do on one input, as lists of violations.

Shared by the fuzz tests (`tests/test_hypothesis.py`, a few hundred inputs per run) and the
larger run of `tests/benchmarks/bench_fuzz.py`, which counts violations instead of failing.

An aggregator, on a finite Jacobian at any scale and in any dtype, returns an update of the right
shape and dtype, finite, and satisfying the properties its registry entry declares (checked in
float64 and float32); on a Jacobian with a NaN or an infinite entry, it raises a ``ValueError`` or
returns a non-finite update. A weighting does the same with weights. A scalarizer, on finite
losses, returns a finite scalar with a finite gradient, and on non-finite losses a non-finite
scalar or a ``ValueError``.

Gramian-based methods only see ``J Jᵀ``; where forming it in the Jacobian's dtype overflows or
underflows (float32 entries beyond about 1e±19), the Gramian no longer describes the Jacobian,
and only the checks that do not depend on it (shape, dtype, non-finite input) apply
(`faithful_gramian`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from jdoptim import get_spec
from jdoptim.aggregation import GramianWeightedAggregator

NON_FINITE = (math.nan, math.inf, -math.inf)

CONFLICT_TOL = 128.0
"""A row conflicts with the update when ``g_iᵀ d < -CONFLICT_TOL · m · eps · |g_i| · S``, with
``S = Σ_j |w_j| |g_j|``: rounding ``d = Σ_j w_j g_j`` and the Gramian costs about ``eps`` times
that, and the methods that drop the directions of the Gramian below ``100 m eps``
(`jdoptim.linalg._constraints.correlation_spectrum`, for FairGrad, Nash-MTL, CAGrad) solve a
problem that far from the given one. (MGDA's own tests hold it to ``64 eps``.)"""

PERMUTATION_TOL = {torch.float64: 1e-9, torch.float32: 1e-3}
"""A permutation of the rows may change the update by this much, relative to ``Σ_j |w_j| |g_j|``
(or to the largest row norm for methods without weights)..."""

SCALAR_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
"""Largest difference of a scalarizer's output from the same computation in float64, relative to
the size of its terms."""

SENSITIVITY_FACTOR = 100.0
"""... or by up to this many times the change that random perturbations at the rounding level
cause (see `_perturbed_updates`): a method whose update is ill-conditioned (eigenvalues near a
cut-off, say) is as invariant as its conditioning allows, and an order-dependent one changes far
more."""


def _call(method, matrix: Tensor, seed: int) -> Tensor:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return method(matrix)


def faithful_gramian(method: GramianWeightedAggregator, J: Tensor) -> bool:
    """Whether the Gramian that ``method`` hands its weighting is finite and, up to a positive
    factor, within rounding of the exact ``J Jᵀ`` (forming it in a low precision can overflow or
    underflow)."""
    G = method._weighting_input(J).double()
    if not torch.isfinite(G).all():
        return False
    J64 = J.double()
    exact = J64 @ J64.T
    factor = G.trace() / exact.trace() if exact.trace() > 0 else torch.tensor(1.0)
    norms = J64.norm(dim=1)
    bound = 8 * J.shape[1] * torch.finfo(J.dtype).eps * factor * torch.outer(norms, norms)
    return bool(factor > 0) and bool(((G - factor * exact).abs() <= bound).all())


def _weights_scale(name: str, J: Tensor, seed: int) -> Tensor:
    """``Σ_j |w_j| |g_j|`` for the weights of a fresh instance, or the largest row norm."""
    method = get_spec(name).example(J.shape[0])
    J64 = J.double()
    norms = J64.norm(dim=1)
    if not isinstance(method, GramianWeightedAggregator):
        return norms.max()
    weights = _call(method.weighting, method._weighting_input(J), seed).double()
    return (weights.abs() * norms).sum()


def _perturbed_updates(name: str, J: Tensor, seed: int, generator: torch.Generator) -> list[Tensor]:
    """The updates after random perturbations at the rounding level. For a Gramian-based method:
    of ``2 eps |g_i| |g_j|`` on each entry of the Gramian (what forming it in J's dtype does),
    and of norm ``2 eps |G|`` (the backward error of a stable eigensolver or factorisation on
    it); otherwise of ``2 eps |g_i|`` on the entries of each row of ``J``, and of norm
    ``2 eps |J|``."""
    method = get_spec(name).example(J.shape[0])
    eps = torch.finfo(J.dtype).eps
    m = J.shape[0]
    J64 = J.double()
    norms = J64.norm(dim=1)
    if isinstance(method, GramianWeightedAggregator) and method.weighting.uses_matrix:
        G = method._weighting_input(J).double()
        E = torch.randn(m, m, generator=generator, dtype=torch.float64)
        E = (E + E.T) / 2
        entrywise = G + 2 * eps * E * torch.outer(norms, norms)
        normwise = G + 2 * eps * G.norm() * E / E.norm()
        return [_call(method.weighting, P.to(J.dtype), seed) @ J for P in (entrywise, normwise)]
    E = torch.randn(J.shape, generator=generator, dtype=torch.float64)
    rowwise = J64 + 2 * eps * norms[:, None] * E / J.shape[1] ** 0.5
    normwise = J64 + 2 * eps * J64.norm() * E / E.norm()
    return [_call(method, P.to(J.dtype), seed) for P in (rowwise, normwise)]


def _with_a_non_finite_entry(matrix: Tensor, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    broken = matrix.clone()
    flat = broken.view(-1)
    index = int(torch.randint(flat.numel(), (1,), generator=generator))
    flat[index] = NON_FINITE[int(torch.randint(3, (1,), generator=generator))]
    return broken


def aggregator_violations(name: str, J: Tensor, seed: int = 0) -> list[str]:
    """The contracts that aggregator ``name`` breaks on the Jacobian ``J``."""
    spec = get_spec(name)
    m, n = J.shape
    dtype = J.dtype
    try:
        update = _call(spec.example(m), J, seed)
    except Exception as error:
        return [f"raises {type(error).__name__} on finite input: {error}"]
    violations = []
    if update.shape != (n,) or update.dtype != dtype:
        violations.append(f"returns shape {tuple(update.shape)}, dtype {update.dtype}")
    method = spec.example(m)
    gramian_based = isinstance(method, GramianWeightedAggregator) and method.weighting.uses_matrix
    faithful = not gramian_based or faithful_gramian(method, J)
    if faithful and not torch.isfinite(update).all():
        violations.append("finite input, non-finite update")
    measured = faithful and dtype in (torch.float64, torch.float32) and torch.isfinite(update).all()
    if measured and (spec.non_conflicting or spec.permutation_invariant):
        J64, d = J.double(), update.double()
        norms = J64.norm(dim=1)
        scale = _weights_scale(name, J, seed)
        eps = torch.finfo(dtype).eps
        if spec.non_conflicting:
            worst = ((J64 @ d) / (norms * scale).clamp(min=torch.finfo(torch.float64).tiny)).min()
            if worst < -CONFLICT_TOL * m * eps:
                violations.append(f"conflicts with a row: g_i.d = {worst.item():.3g} |g_i| S")
        if spec.permutation_invariant and not spec.randomised:
            generator = torch.Generator().manual_seed(seed)
            permutation = torch.randperm(m, generator=generator)
            permuted = _call(spec.example(m), J[permutation], seed).double()
            change = ((permuted - d).norm() / scale.clamp(min=1e-300)).item()
            try:
                perturbed = _perturbed_updates(name, J, seed, generator)
                change_under_noise = max((p.double() - d).norm() for p in perturbed)
                sensitivity = (change_under_noise / scale.clamp(min=1e-300)).item()
            except Exception:
                sensitivity = math.inf
            if change > max(PERMUTATION_TOL[dtype], SENSITIVITY_FACTOR * sensitivity):
                violations.append(
                    f"changes by {change:.3g} S under a permutation of the rows (by "
                    f"{sensitivity:.3g} S under rounding-level noise)"
                )
    try:
        broken = _call(spec.example(m), _with_a_non_finite_entry(J, seed), seed)
    except ValueError:
        pass
    except Exception as error:
        violations.append(f"raises {type(error).__name__} on non-finite input: {error}")
    else:
        if torch.isfinite(broken).all():
            violations.append("non-finite input, finite update")
    return violations


def weighting_violations(name: str, J: Tensor, seed: int = 0) -> list[str]:
    """The contracts that weighting ``name`` breaks on the Jacobian ``J`` (or its Gramian,
    computed in float64 and cast to J's dtype)."""
    spec = get_spec(name)
    m = J.shape[0]
    weighting = spec.example(m)
    if weighting.needs_jacobian:
        matrix = J
    else:
        G = (J.double() @ J.double().T).to(J.dtype)
        if not torch.isfinite(G).all():
            return []  # not a finite Gramian in this dtype
        matrix = G
    try:
        weights = _call(weighting, matrix, seed)
    except Exception as error:
        return [f"raises {type(error).__name__} on finite input: {error}"]
    violations = []
    if weights.shape != (m,) or weights.dtype != J.dtype:
        violations.append(f"returns shape {tuple(weights.shape)}, dtype {weights.dtype}")
    if not torch.isfinite(weights).all():
        # Weights beyond the dtype's range (FairGrad's, near 0 in the hull) overflow rightly:
        # look at them before the cast to the input's dtype.
        with torch.no_grad():
            uncast = _call(spec.example(m)._weights, matrix, seed)
        if _representable(uncast, J.dtype):
            violations.append("finite input, non-finite weights")
    if weighting.uses_matrix:
        try:
            broken = _call(spec.example(m), _with_a_non_finite_entry(matrix, seed), seed)
        except ValueError:
            pass
        except Exception as error:
            violations.append(f"raises {type(error).__name__} on non-finite input: {error}")
        else:
            if torch.isfinite(broken).all():
                violations.append("non-finite input, finite weights")
    return violations


def _scalarize(name: str, losses: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    losses = losses.detach().requires_grad_()
    scalar = _call(get_spec(name).example(losses.shape[0]), losses, seed)
    (gradient,) = torch.autograd.grad(scalar, losses)
    return scalar.detach(), gradient


def _representable(values: Tensor, dtype: torch.dtype) -> bool:
    return bool((values.abs() <= torch.finfo(dtype).max).all())


def scalarizer_violations(name: str, losses: Tensor, seed: int = 0) -> list[str]:
    """The contracts that scalarizer ``name`` breaks on the losses.

    The scalar and its gradient must be finite where their exact values (computed in float64)
    are within the range of the losses' dtype: a sum of float16 losses may overflow, a
    log-sum-exp may not."""
    spec = get_spec(name)
    try:
        scalar, gradient = _scalarize(name, losses, seed)
    except ValueError:
        return []  # refused with a message (losses below a bound, for example)
    except Exception as error:
        return [f"raises {type(error).__name__} on finite losses: {error}"]
    violations = []
    if scalar.shape != () or scalar.dtype != losses.dtype:
        violations.append(f"returns shape {tuple(scalar.shape)}, dtype {scalar.dtype}")
    exact, exact_gradient = _scalarize(name, losses.double(), seed)
    if not torch.isfinite(scalar) and _representable(exact, losses.dtype):
        violations.append(f"finite losses, non-finite scalar {scalar.item()} (exact {exact})")
    if not torch.isfinite(gradient).all() and _representable(exact_gradient, losses.dtype):
        violations.append("finite losses, non-finite gradient")
    if losses.dtype in SCALAR_RTOL and torch.isfinite(scalar) and torch.isfinite(exact):
        # Relative to the size of the terms (to first order), so that cancellation is allowed.
        terms = exact.abs() + (exact_gradient * losses.double()).abs().sum()
        error = (scalar.double() - exact).abs() / terms.clamp(min=1e-300)
        if error > SCALAR_RTOL[losses.dtype]:
            violations.append(f"scalar {scalar.item():.6g} is {error.item():.3g} off {exact:.6g}")
    # NaN or +inf: a smooth maximum rightly ignores a loss of -inf.
    broken_losses = losses.detach().clone()
    broken_losses[seed % losses.shape[0]] = NON_FINITE[seed % 2]
    try:
        broken = _call(spec.example(losses.shape[0]), broken_losses, seed)
    except ValueError:
        pass
    except Exception as error:
        violations.append(f"raises {type(error).__name__} on non-finite losses: {error}")
    else:
        if torch.isfinite(broken):
            violations.append("non-finite losses, finite scalar")
    return violations
