"""The ways `jdoptim.JDOptimizer` turns a vector of losses into ``.grad``, one unit per way.

Every path has the interface of `Path`: ``pieces(losses)`` computes what the aggregation needs
(`Pieces`), ``aggregate(pieces)`` the `Update` to add into ``.grad``; neither writes anything.
The optimizer chooses the path, queues pieces, reduces them across ranks, applies the
non-finite policy and writes the update. The paths:

- `JacobianPath`: the Jacobian of the losses (of the shared parameters' losses in multi-task
  learning, the other parameters getting their ordinary gradient), then the aggregator;
- `GramianPath`: the Gramian from the model's layers, the weighting, the weighted gradient;
- `MultiTaskGramianPath`: the same for the shared parameters of a multi-task model, the others
  (task heads) getting their ordinary gradient;
- `ScalarizedPath`: one ordinary backward pass of a scalarised loss.

The package is private: its interface may change between releases.
"""

from jdoptim._paths.base import Losses, Path, Pieces, Update, combine
from jdoptim._paths.gramian import GramianPath
from jdoptim._paths.jacobian import JacobianPath
from jdoptim._paths.multitask import MultiTaskGramianPath, shared_modules
from jdoptim._paths.scalarized import ScalarizedPath

__all__ = [
    "GramianPath",
    "JacobianPath",
    "Losses",
    "MultiTaskGramianPath",
    "Path",
    "Pieces",
    "ScalarizedPath",
    "Update",
    "combine",
    "shared_modules",
]
