"""Numerical kernels: dual-cone projection, simplex projection, min-norm point, the polyhedral
projection and fair-share system behind PCD, CAGrad, FairGrad and Nash-MTL, the safe formation
of Gramians and helpers on them.

These are plain functions with no optimizer state; the aggregators import them.
"""

from jdoptim.linalg._dual_cone import SOLVERS, project_weights
from jdoptim.linalg._gramian import gramian, normalize_gramian, regularize_gramian
from jdoptim.linalg._min_norm import min_norm_frank_wolfe, min_norm_weights
from jdoptim.linalg._simplex import project_onto_simplex

__all__ = [
    "SOLVERS",
    "gramian",
    "min_norm_frank_wolfe",
    "min_norm_weights",
    "normalize_gramian",
    "project_onto_simplex",
    "project_weights",
    "regularize_gramian",
]
