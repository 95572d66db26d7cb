"""The multi-task Gramian path: the Gramian of the shared parameters, the aggregator's weighting,
the weighted gradient for the shared parameters and the ordinary gradient for the others (the
task heads), without the Jacobian.

The engine cuts the graph of the losses where it enters the shared part (``jdoptim._split``):
each task's head is differentiated once, only the shared part is batched over the tasks, and the
Gramian comes from the shared layers' factors (see `jdoptim.gramian.GramianEngine`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from jdoptim._paths.base import Losses
from jdoptim._paths.gramian import GramianPath
from jdoptim.aggregation import GramianWeightedAggregator
from jdoptim.gramian import GramianEngine


class MultiTaskGramianPath(GramianPath):
    """Weight the losses from the Gramian of the shared parameters; add their weighted gradient
    into the shared parameters and the ordinary gradient of their sum into the others.

    Args:
        method: A Gramian-based aggregator, whose weighting maps the Gramian to weights.
        engine: The engine hooked on the modules holding the shared parameters, before the
            forward pass.
        shared_params: The shared parameters.
    """

    def __init__(
        self,
        method: GramianWeightedAggregator,
        engine: GramianEngine,
        shared_params: Sequence[Tensor],
    ) -> None:
        super().__init__(method, engine)
        self.shared_params = list(shared_params)

    def _gramian(self, losses: Losses) -> tuple[Tensor, dict[Tensor, Tensor], list[Tensor]]:
        shared_ids = {id(p) for p in self.shared_params}
        shared = [p for p in losses.params if id(p) in shared_ids]
        others = [p for p in losses.params if id(p) not in shared_ids]
        heads = self.method.head_weights(losses.vector.detach() / losses.scale)
        gramian, own = self.engine.task_gramian(
            losses.tensor,
            shared=shared,
            others=others,
            retain_graph=losses.retain_graph,
            own_weights=heads,
        )
        return gramian, own, shared


def shared_modules(
    modules: Sequence[nn.Module], shared_params: Sequence[Tensor]
) -> tuple[list[nn.Module], bool]:
    """The largest submodules of ``modules`` whose trainable parameters are all shared (those
    the engine hooks), and whether they hold every trainable shared parameter.

    Raises:
        ValueError: If a module holds shared parameters of its own and task-specific ones in its
            submodules: it can be hooked neither whole nor in parts.
    """
    shared_ids = {id(p) for p in shared_params}
    found: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        ids = {id(p) for p in module.parameters() if p.requires_grad}
        if not ids & shared_ids:
            return
        if ids <= shared_ids:
            found.append(module)
            return
        own = [n for n, p in module.named_parameters(recurse=False) if id(p) in shared_ids]
        if own:
            raise ValueError(
                f"Module {name or '(root)'} ({type(module).__name__}) holds shared parameters "
                f"of its own ({', '.join(own)}) and task-specific ones in its submodules, so "
                "gramian mode can hook it neither whole nor in parts; move those parameters "
                "into a submodule, or pass modules= the modules that hold only shared parameters."
            )
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    for i, module in enumerate(modules):
        visit(module, f"modules[{i}]" if len(modules) > 1 else "")
    covered = {id(p) for module in found for p in module.parameters()}
    trainable = {id(p) for p in shared_params if p.requires_grad}
    return found, trainable <= covered
