"""The ways `jdoptim.JDOptimizer` turns a vector of losses into ``.grad``, one unit per way.

Every path has the interface of `Path`: ``pieces(losses)`` computes what the aggregation needs
(`Pieces`), ``aggregate(pieces)`` the `Update` to add into ``.grad``; neither writes anything.
The optimizer chooses the path, queues pieces, reduces them across ranks, applies the
non-finite policy and writes the update. The paths:

- `JacobianPath`: the Jacobian of the losses (with respect to the shared parameters in
  multi-task learning, the others getting their ordinary gradient), then the aggregator;
- `GramianPath`: the Gramian from the model's layers, the weighting, the weighted gradient;
- `MultiTaskGramianPath`: the same for the shared parameters of a multi-task model, the others
  (task heads) getting their ordinary gradient;
- `ScalarizedPath`: one ordinary backward pass of a scalarised loss;
- `RepresentationPath` (``rep_grad=True``): the Jacobian with respect to the shared
  representation (where the graph enters the shared part), aggregated, then sent through the
  shared part once;
- `ShardedJacobianPath`, `ShardedGramianPath`, `ShardedMultiTaskGramianPath` and
  `ShardedScalarizedPath`: the same for a model sharded with ``fully_shard``, each rank updating
  its shards of the parameters.

A new way is one more subclass of `Path`: it declares what the optimizer needs to know about it
(`Path.method_type`, `Path.mode`, `Path.queues`, `Path.reduces`, `Path.method_in_pieces`),
implements `Path.pieces` and `Path.aggregate` without writing anything (the optimizer keeps the
transaction: it puts the method's state back and calls `Path.discard` when a step does not
happen), and is chosen in `JDOptimizer._make_path`.

The package is private: its interface may change between releases.
"""

from jdoptim._paths.base import Losses, Path, Pieces, Update, check_combinable, combine
from jdoptim._paths.gramian import GramianPath
from jdoptim._paths.jacobian import JacobianPath
from jdoptim._paths.multitask import MultiTaskGramianPath, shared_modules
from jdoptim._paths.representation import RepresentationPath
from jdoptim._paths.scalarized import ScalarizedPath
from jdoptim._paths.sharded import (
    FsdpModel,
    ShardedGramianPath,
    ShardedJacobianPath,
    ShardedMultiTaskGramianPath,
    ShardedScalarizedPath,
)

__all__ = [
    "FsdpModel",
    "GramianPath",
    "JacobianPath",
    "Losses",
    "MultiTaskGramianPath",
    "Path",
    "Pieces",
    "RepresentationPath",
    "ScalarizedPath",
    "ShardedGramianPath",
    "ShardedJacobianPath",
    "ShardedMultiTaskGramianPath",
    "ShardedScalarizedPath",
    "Update",
    "check_combinable",
    "combine",
    "shared_modules",
]
