"""The paths for models sharded with ``torch.distributed.fsdp.fully_shard`` (FSDP2).

Each rank holds a shard of every parameter (a ``DTensor``); the losses are connected to the
parameters only through FSDP's hooks, which all-gather each layer's parameters before its forward
and backward passes and reduce-scatter its gradient into the shards' ``.grad`` after. These paths
therefore run ordinary backward passes and read ``.grad``:

- `ShardedJacobianPath`: one backward pass per loss gives, on each rank, its shard of every
  loss's gradient, reduced by FSDP across ranks as it reduces any gradient (averaged over the
  global batch). These shards are the rank's columns ``J_r`` of the Jacobian (``m × n / ranks``).
  The Gramian is the sum of the ranks' ``J_r J_rᵀ`` (one all-reduce of ``m × m``); every rank
  computes the same weights from it, and updates its own shard with ``J_rᵀ w``. Only
  Gramian-based aggregators can work this way, without gathering ``J``.
- `ShardedGramianPath`: the Gramian from every rank's gathered layer factors (`GramianEngine`
  with ``gather``), the weights, one backward pass of the weighted losses;
  `ShardedMultiTaskGramianPath` the same with the Gramian of the shared parameters, and one more
  backward pass, of the sum of the losses, for the others (the task heads).
- `ShardedScalarizedPath`: one backward pass of the scalarised loss.

They agree across ranks on everything that decides a step (the number of losses, finiteness),
so that every rank takes the same decisions and runs the same collectives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from jdoptim._paths.base import (
    Losses,
    Path,
    Pieces,
    Update,
    all_finite,
    non_finite_reason,
)
from jdoptim._paths.scalarized import ScalarizedPath
from jdoptim.aggregation import GramianWeightedAggregator
from jdoptim.diagnostics import diagnose_gramian
from jdoptim.distributed import Sharding, dtensor_class
from jdoptim.gramian import GramianEngine
from jdoptim.linalg._gramian import (
    fits_dtype,
    row_magnitudes,
    scaled_gramian,
    solve_dtype,
    weighted_sum,
)
from jdoptim.registry import get_spec, list_aggregators
from jdoptim.scalarization import Scalarizer


class FsdpModel:
    """The modules sharded with ``fully_shard`` in the model given as ``modules``.

    Args:
        modules: The model (or modules); may be empty, when the optimizer was not given it.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import FSDPModule

        self.roots: list[nn.Module] = []  # the outermost ones, on which FSDP's state is reset
        self.members: list[tuple[str, nn.Module]] = []

        def visit(module: nn.Module, name: str, inside: bool) -> None:
            sharded = isinstance(module, FSDPModule)
            if sharded:
                self.members.append((name or type(module).__name__, module))
                if not inside:
                    self.roots.append(module)
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name, inside or sharded)

        for module in modules:
            visit(module, "", False)

    def check_reduction(self) -> None:
        """Raise if FSDP's gradient reduction is turned off on some module: each backward pass
        needs it to give every rank its shard of the gradient of the global batch.

        FSDP has no public getter for it; where its state cannot be read, nothing is checked.
        """
        for name, module in self.members:
            groups = getattr(module._get_fsdp_state(), "_fsdp_param_groups", ())  # type: ignore[operator]
            for group in groups:
                if not (
                    getattr(group, "reduce_grads", True)
                    and getattr(group, "all_reduce_grads", True)
                ):
                    raise ValueError(
                        f"FSDP's gradient reduction is turned off on module {name!r} "
                        "(set_requires_gradient_sync(False) or set_requires_all_reduce(False)), "
                        "but JDOptimizer needs it in each of its backward passes to give every "
                        "rank its shard of each loss's gradient. Turn it back on; to accumulate "
                        "micro-batches, use optimizer.backward(losses, aggregate=False)."
                    )

    def reset(self) -> None:
        """Reset the per-iteration state of FSDP's roots, as FSDP asks after a failed backward
        pass, so that the next one runs normally."""
        for root in self.roots:
            reset = getattr(root, "reset_iter_state", None)  # in recent versions of torch
            if reset is not None:
                with suppress(RuntimeError):  # not the root of its FSDP tree: nothing to reset
                    reset()

    @contextmanager
    def reset_on_failure(self) -> Iterator[None]:
        """`reset` if the block (which runs backward passes through FSDP) fails."""
        try:
            yield
        except BaseException:
            self.reset()
            raise

    @contextmanager
    def backward_passes(self, params: Sequence[Tensor]) -> Iterator[None]:
        """Clear the ``.grad`` of ``params`` for the block's backward passes, then put it back,
        and reset FSDP if the block fails."""
        self.check_reduction()
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            with self.reset_on_failure():
                yield
        finally:
            for p, grad in zip(params, saved, strict=True):
                p.grad = grad


def _not_reached(params: Sequence[Tensor]) -> ValueError:
    return ValueError(
        f"None of the {len(params)} parameters of the optimizer receives a gradient from the "
        "losses through FSDP's backward passes; are the losses computed from this model, and is "
        "FSDP's gradient reduction on for it?"
    )


def _local(param: Tensor) -> Tensor:
    dtensor = dtensor_class()
    return param.to_local() if dtensor is not None and isinstance(param, dtensor) else param


def _as_param(local: Tensor, param: Tensor) -> Tensor:
    """A local shard as a ``DTensor`` sharded like ``param``."""
    return type(param).from_local(  # type: ignore[attr-defined]
        local.view(_local(param).shape).to(param.dtype),
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


class ShardedJacobianPath(Path):
    """Aggregate the Jacobian of the losses from its shards, through their summed Gramian.

    With ``accumulation="sum"`` the objectives are the losses, averaged over the ranks' batches
    as FSDP averages gradients (each rank computes the same losses on its own data). With
    ``"concat"`` every rank has objectives of its own (such as one loss per sample), and the rows
    of the ranks are stacked in the order of the mesh: that takes one backward pass per
    objective of every rank, in which the other ranks contribute zero.

    Args:
        method: A Gramian-based aggregator.
        sharding: How the parameters are sharded.
        shared_params: The parameters whose Jacobian is aggregated; ``None`` for all of them.
            The others get the gradient of the sum of the losses.
        model: The FSDP modules of the model, if the optimizer was given it.
    """

    method_type = GramianWeightedAggregator
    method: GramianWeightedAggregator
    reduces = "itself"

    def __init__(
        self,
        method: GramianWeightedAggregator,
        sharding: Sharding,
        shared_params: Sequence[Tensor] | None = None,
        model: FsdpModel | None = None,
    ) -> None:
        if not isinstance(method, GramianWeightedAggregator):
            gramian_based = [name for name in list_aggregators() if get_spec(name).gramian_based]
            raise ValueError(
                f"{method!r} needs the whole Jacobian, which no rank holds when the model is "
                "sharded with fully_shard (gathering it would cost every rank the memory of the "
                "unsharded Jacobian). Use a Gramian-based aggregator, whose weights need only "
                "the Gramian, which the ranks sum from their shards: "
                f"{', '.join(gramian_based)}."
            )
        refuse_columns(method)
        super().__init__(method)
        self.sharding = sharding
        self.shared_params = None if shared_params is None else list(shared_params)
        self.model = FsdpModel(()) if model is None else model

    def _passes(self, m: int, concat: bool) -> list[tuple[int, bool]]:
        """The backward passes: which loss, and whether this rank's loss counts (with
        ``concat``, only the owner's of the row does)."""
        if not concat:
            return [(k, True) for k in range(m)]
        me = torch.distributed.get_rank()
        return [(k, rank == me) for rank in self.sharding.ranks for k in range(m)]

    def pieces(self, losses: Losses) -> Pieces:
        vector, params = losses.vector, losses.params
        concat = losses.accumulation == "concat"
        self.sharding.check_same(vector.numel(), "numbers of losses", vector.device)
        # The global batch's losses, for the method and the heads' weights.
        values = global_values(self.sharding, vector, stacked=concat)
        heads = self.method.head_weights(values / losses.scale)
        shared_ids = None if self.shared_params is None else {id(p) for p in self.shared_params}
        shared = [p for p in params if shared_ids is None or id(p) in shared_ids]
        passes = self._passes(vector.numel(), concat)
        dtype = shared[0].dtype if shared else vector.dtype
        for p in shared[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        sizes = [_local(p).numel() for p in shared]
        # On the shards' device, which FSDP may offload to the CPU.
        device = _local(shared[0]).device if shared else vector.device
        matrix = torch.zeros(len(passes), sum(sizes), dtype=dtype, device=device)
        columns = dict(zip(map(id, shared), torch.split(matrix, sizes, dim=1), strict=True))
        reached: set[int] = set()
        own: dict[Tensor, Tensor] = {}
        with self.model.backward_passes(params):
            for row, (k, counts) in enumerate(passes):
                keep = losses.retain_graph or row + 1 < len(passes)
                loss = vector[k] if counts else vector[k] * 0.0
                torch.autograd.backward(loss, retain_graph=keep)
                for p in params:
                    grad, p.grad = p.grad, None
                    if grad is None:
                        continue
                    reached.add(id(p))
                    if id(p) in columns:
                        columns[id(p)][row].copy_(_local(grad).reshape(-1))
                    else:
                        grad = grad if heads is None else grad * heads[row].to(grad.dtype)
                        own[p] = grad if p not in own else own[p] + grad
        if not reached:
            raise _not_reached(params)
        if concat:
            # FSDP averages each row over the ranks, of which only the owner's counts.
            matrix.mul_(self.sharding.size)
            own = {p: g * self.sharding.size for p, g in own.items()}
        kept = [p for p in shared if id(p) in reached]
        if len(kept) < len(shared):
            matrix = torch.cat([columns[id(p)] for p in kept], dim=1)
        local_finite = all_finite([vector]) and all_finite([matrix, *map(_local, own.values())])
        finite = self.sharding.all_true(local_finite, vector.device)
        reason = "" if finite else non_finite_reason(vector, self.what)
        return Pieces(kept, matrix if kept else None, own, finite, reason, values)

    def aggregate(self, pieces: Pieces, *, scale: float, diagnostics: bool) -> Update:
        if pieces.matrix is None:
            return Update(dict(pieces.own))
        matrix = pieces.matrix if scale == 1.0 else pieces.matrix / scale
        local = matrix.to(solve_dtype(matrix.dtype))
        gramian = self._gramian(local)
        if self.sharding.replicas > 1:
            gramian /= self.sharding.replicas  # each shard is held by that many ranks
        gramian = self.sharding.all_reduce(gramian.to(self.sharding.device))
        weights = _weights(self.method, gramian, pieces.loss_values, scale)
        update = weighted_sum(weights.to(local.device), local)
        finite = self.sharding.all_true(
            all_finite([weights]) and all_finite([update]), self.sharding.device
        )
        if not finite:
            return Update(finite=False, reason=f"{self.method!r} returned a non-finite update")
        if scale != 1.0:
            update = update * scale
        updates = torch.split(update, [_local(p).numel() for p in pieces.shared])
        grads = {p: _as_param(u, p) for p, u in zip(pieces.shared, updates, strict=True)}
        grads.update(pieces.own)

        def diagnose_step():
            return diagnose_gramian(gramian, weights)

        return Update(grads, diagnose=diagnose_step if diagnostics else None)

    def _gramian(self, local: Tensor) -> Tensor:
        """This rank's part ``J_r J_rᵀ`` of the Gramian, as `jdoptim.linalg.gramian` forms it,
        but with one decision for every rank: in float32 where no rank's part left its range,
        else in float64 from rows scaled by powers of two (so that the parts add up)."""
        gramian = local @ local.T
        if local.dtype != torch.float32:
            return gramian
        if self.sharding.all_true(fits_dtype(local, gramian), self.sharding.device):
            return gramian
        return scaled_gramian(local, row_magnitudes(local))


@dataclass
class ShardedGramianPieces(Pieces):
    """The pieces of the sharded Gramian path: the Gramian of the unscaled objectives of every
    rank, this rank's losses and parameters, for the weighted backward pass."""

    gramian: Tensor | None = None
    losses: Losses | None = None
    head_weights: Tensor | None = None


class ShardedGramianPath(Path):
    """Weight the objectives from the Gramian of every rank's gathered factors, then
    backpropagate this rank's weighted losses through FSDP.

    Each rank's `GramianEngine` records its layers' inputs and output gradients; they are
    gathered from every rank (per layer, ``ranks × batch × (in + out)`` values for a linear
    layer), so that every rank computes the same Gramian, with the inner products between
    samples of different ranks, and the same weights. One backward pass of this rank's weighted
    losses then gives, through FSDP's reduction, each rank its shard of the weighted gradient.

    Per-sample losses are each rank's own objectives (the Gramian is ``[ranks·m, ranks·m]``);
    other losses are the same objectives on every rank, averaged over the ranks as FSDP
    averages gradients (the Gramian of their average is ``[m, m]``).

    Args:
        method: A Gramian-based aggregator.
        engine: The engine hooked on the model before the forward pass.
        sharding: How the parameters are sharded.
        model: The FSDP modules of the model.
    """

    mode = "gramian"
    what = "the Gramian"
    queues = False
    reduces = "itself"
    method_type = GramianWeightedAggregator
    method: GramianWeightedAggregator

    def __init__(
        self,
        method: GramianWeightedAggregator,
        engine: GramianEngine,
        sharding: Sharding,
        model: FsdpModel,
    ) -> None:
        super().__init__(method)
        self.engine = engine
        self.sharding = sharding
        self.model = model

    def pieces(self, losses: Losses) -> Pieces:
        vector = losses.vector
        self.sharding.check_same(vector.numel(), "numbers of losses", vector.device)
        # Agreed before the engine's backward pass, which every rank runs, or none.
        if not self.sharding.all_true(torch.isfinite(vector).all(), vector.device):
            return Pieces(finite=False, reason=non_finite_reason(vector, self.what))
        self.model.check_reduction()
        # Half-precision losses (under FSDP's MixedPrecisionPolicy) give float32 factors.
        tensor = losses.tensor.to(torch.promote_types(losses.tensor.dtype, torch.float32))
        with self.model.reset_on_failure():
            gramian = self.engine.gramian(
                tensor,
                retain_graph=True,
                gather=self.sharding.all_gather,
                reset=self.model.reset,
            )
        if losses.scale != 1.0:
            gramian = gramian / losses.scale**2
        # The same Gramian on every rank, so the same decision.
        if not all_finite([gramian]):
            self.engine.reset()
            return Pieces(finite=False, reason=non_finite_reason(vector, self.what))
        # Per-sample losses are every rank's own objectives: their values are stacked.
        stacked = gramian.shape[0] == vector.numel() * self.sharding.size > vector.numel()
        values = global_values(self.sharding, vector, stacked=stacked) / losses.scale
        heads = self.method.head_weights(values)  # before the weighting moves the state
        return ShardedGramianPieces(
            loss_values=values, gramian=gramian, losses=losses, head_weights=heads
        )

    def aggregate(self, pieces: Pieces, *, scale: float, diagnostics: bool) -> Update:
        assert isinstance(pieces, ShardedGramianPieces) and pieces.losses is not None
        gramian, losses = pieces.gramian, pieces.losses
        self.engine.reset()  # what it keeps for its own weighted gradient is not used here
        weights = _weights(self.method, gramian, pieces.loss_values, 1.0)
        if not all_finite([weights]):  # the same weights on every rank
            return Update(finite=False, reason=f"{self.method!r} returned non-finite weights")
        vector = losses.vector
        with self.model.backward_passes(losses.params):
            grads = self._gradients(losses, weights, pieces.head_weights)
        if not grads:
            raise _not_reached(losses.params)
        finite = self.sharding.all_true(
            all_finite([_local(g) for g in grads.values()]), vector.device
        )
        if not finite:
            return Update(finite=False, reason=f"{self.method!r} gave a non-finite update")

        def diagnose_step():
            return diagnose_gramian(gramian, weights)

        return Update(grads, diagnose=diagnose_step if diagnostics else None)

    def discard(self) -> None:
        self.engine.reset()

    def _per_rank(self, losses: Losses, weights: Tensor) -> bool:
        """Whether the objectives are each rank's own (per-sample losses), rather than the same
        on every rank."""
        return weights.numel() == losses.vector.numel() * self.sharding.size

    def _gradients(
        self, losses: Losses, weights: Tensor, heads: Tensor | None = None
    ) -> dict[Tensor, Tensor]:
        """The gradients that one backward pass of this rank's weighted losses through FSDP
        gives the parameters (each rank's shard, reduced over the ranks); ``heads`` are the
        weights of the losses for parameters outside the shared ones, where there are some."""
        vector = losses.vector
        if self._per_rank(losses, weights):
            # This rank's objectives; FSDP averages the weighted gradients over the ranks.
            own = weights.view(self.sharding.size, -1)[self.sharding.index] * self.sharding.size
        else:
            own = weights
        weighted = (own.to(vector.dtype) * vector).sum()
        torch.autograd.backward(weighted, retain_graph=losses.retain_graph)
        return {p: p.grad for p in losses.params if p.grad is not None}


class ShardedMultiTaskGramianPath(ShardedGramianPath):
    """`ShardedGramianPath` for a multi-task model: the Gramian of the shared parameters, their
    weighted gradient, and the ordinary gradient of the sum of the losses for the others (the
    task heads), each through FSDP.

    The engine hooks the modules that hold only shared parameters; the Gramian is that of their
    parameters, from every rank's gathered factors. Two backward passes through FSDP follow:
    one of the weighted losses, whose gradients the shared parameters keep, and one of the sum
    of the losses, whose gradients the others keep (the sum of every rank's objectives for
    per-sample losses, as one process on the global batch). The graph is not cut at the shared
    part as `MultiTaskGramianPath` cuts it: FSDP gathers each layer's parameters in hooks of
    the backward pass, which calling the graph's nodes directly would bypass.

    Args:
        method: A Gramian-based aggregator.
        engine: The engine hooked on the modules holding the shared parameters, before the
            forward pass.
        sharding: How the parameters are sharded.
        model: The FSDP modules of the model.
        shared_params: The shared parameters.
    """

    def __init__(
        self,
        method: GramianWeightedAggregator,
        engine: GramianEngine,
        sharding: Sharding,
        model: FsdpModel,
        shared_params: Sequence[Tensor],
    ) -> None:
        super().__init__(method, engine, sharding, model)
        self.shared_params = list(shared_params)

    def _gradients(
        self, losses: Losses, weights: Tensor, heads: Tensor | None = None
    ) -> dict[Tensor, Tensor]:
        shared_ids = {id(p) for p in self.shared_params}
        weighted = super()._gradients(replace(losses, retain_graph=True), weights)
        grads = {p: g for p, g in weighted.items() if id(p) in shared_ids}
        for p in losses.params:
            p.grad = None
        # FSDP averages over the ranks: per-sample losses are every rank's own, and summed.
        vector = losses.vector
        per_rank = self._per_rank(losses, weights)
        if heads is not None and per_rank:
            heads = heads.view(self.sharding.size, -1)[self.sharding.index]
        total = vector.sum() if heads is None else heads.to(vector) @ vector
        if per_rank:
            total = total * self.sharding.size
        torch.autograd.backward(total, retain_graph=losses.retain_graph)
        grads.update(
            {p: p.grad for p in losses.params if p.grad is not None and id(p) not in shared_ids}
        )
        return grads


class ShardedScalarizedPath(ScalarizedPath):
    """Backpropagate the scalarised loss through FSDP, which reduces its gradient.

    Args:
        method: The scalarizer.
        sharding: How the parameters are sharded.
        model: The FSDP modules of the model, if the optimizer was given it.
    """

    reduces = "itself"

    def __init__(
        self, method: Scalarizer, sharding: Sharding, model: FsdpModel | None = None
    ) -> None:
        super().__init__(method)
        self.sharding = sharding
        self.model = FsdpModel(()) if model is None else model

    def pieces(self, losses: Losses) -> Pieces:
        vector, scale, params = losses.vector, losses.scale, losses.params
        # Agreed before the scalarizer runs, so that it never sees non-finite losses and every
        # rank runs the backward pass, or none.
        if not self.sharding.all_true(torch.isfinite(vector).all(), vector.device):
            return Pieces(finite=False, reason=non_finite_reason(vector, "the losses"))
        loss = self.method(vector / scale) * scale if scale != 1.0 else self.method(vector)
        with self.model.backward_passes(params):
            torch.autograd.backward(loss, retain_graph=losses.retain_graph)
            own = {p: p.grad for p in params if p.grad is not None}
        if not own:
            raise _not_reached(params)
        finite = self.sharding.all_true(all_finite(list(map(_local, own.values()))), vector.device)
        return Pieces(own=own, finite=finite, reason="" if finite else f"{self.what} is not finite")


def refuse_columns(method: GramianWeightedAggregator) -> None:
    """Raise unless ``method`` can work from the Gramian of the whole Jacobian: a method that
    treats blocks of columns separately (GradVac per layer, GradNorm at one layer) would need
    each block's Gramian, which the sharded paths do not form."""
    if method.needs_columns:
        raise ValueError(
            f"{method!r} treats blocks of the Jacobian's columns separately, which the sharded "
            "paths do not form; on a model sharded with fully_shard, use it on the whole "
            "Jacobian (GradVac(granularity='all'), GradNorm(layer=None))."
        )


def global_values(sharding: Sharding, vector: Tensor, *, stacked: bool) -> Tensor:
    """The values of the global batch's losses, on every rank: every rank's losses stacked in
    the order of the mesh when each rank has objectives of its own, else their average over
    the ranks (as FSDP averages gradients)."""
    values = vector.detach().to(sharding.device)
    if stacked:
        return sharding.all_gather(values)
    return sharding.all_reduce(values.clone()) / sharding.size


def _weights(
    method: GramianWeightedAggregator, gramian: Tensor, values: Tensor | None, scale: float
) -> Tensor:
    """The weighting's weights, with the unscaled values of the losses when it needs them."""
    weighting = method.weighting
    if not weighting.needs_losses or values is None:
        return weighting(gramian)
    return weighting(gramian, losses=values if scale == 1.0 else values / scale)
