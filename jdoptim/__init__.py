"""jdoptim: Jacobian descent for PyTorch, inside any ``torch.optim`` optimizer.

Every aggregator and weighting of `jdoptim.aggregation` is available here too.
"""

from jdoptim import aggregation, diagnostics, functional, gramian, linalg, scalarization
from jdoptim.aggregation import *  # noqa: F403 - the aggregators are the package's main API
from jdoptim.optimizer import JDOptimizer, NonFiniteError
from jdoptim.registry import (
    Spec,
    build,
    get_spec,
    list_aggregators,
    list_scalarizers,
    list_weightings,
    register,
    to_config,
    unregister,
)

__version__ = "0.1.0"

__all__ = [
    *aggregation.__all__,
    "JDOptimizer",
    "NonFiniteError",
    "Spec",
    "__version__",
    "aggregation",
    "build",
    "diagnostics",
    "functional",
    "get_spec",
    "gramian",
    "linalg",
    "list_aggregators",
    "list_scalarizers",
    "list_weightings",
    "register",
    "scalarization",
    "to_config",
    "unregister",
]
