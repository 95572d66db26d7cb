"""Multi-task losses cut at the shared representation: each task's own part is differentiated
once, only the shared part is batched over the tasks.

With ``m`` losses, a batched backward pass (one vector-Jacobian product per loss, vectorised)
runs every node of the graph ``m`` times. For a multi-task model whose heads all read the same
features, that is ``m × m`` head passes, almost all of them on zero gradients. `split` instead
finds where the graph enters the shared part and runs, in this order:

1. one batched pass from the losses to the *consumers* of the shared part (the nodes that read
   it, such as each head's first layer), which costs ``m`` times what lies above the consumers
   (usually the loss functions alone);
2. each consumer's own backward function, called once, on the rows (losses) whose gradient
   reaches it; for a head, one row;
3. one ordinary backward pass of the sum of the losses to the parameters outside the shared
   part (the heads), which receive that ordinary gradient.

When the losses are scalars stacked with ``torch.stack`` and each consumer is reached by one
loss only (one head per task, the usual case), the three steps are one: an ordinary backward
pass of the sum of the losses, in which a hook on each consumer's node sees what the consumer
sends into the shared part, which is then its loss's gradient alone.

The gradients at the *boundary* (the outputs of the shared part) then feed `through_shared`:
one batched pass through the shared part alone.

A node belongs to the shared part when it leads to a shared parameter and to no other parameter
that needs a gradient; every path from the losses to a shared parameter enters the shared part
through exactly one edge of the boundary, so the gradients there, summed over the consumers,
determine every gradient below.

Hooks run as in ordinary backward passes: autograd's engine runs every node but the consumers,
with the hooks of the tensors they produce and of the nodes themselves, and the gradients at the
consumers are taken after the hooks of the tensors the consumers produce (``Tensor.register_hook``
on a head's first output). Only the hooks registered on a consumer's autograd node itself
(``grad_fn.register_hook`` or ``register_prehook``) cannot run, since the consumer's backward
function is called directly (the single ordinary pass runs them); a module's full backward hooks
are such node hooks, so a consumer that is a module's hook node (a hooked module whose inputs
come from both the shared part and elsewhere) makes `split` differentiate the whole graph per
row instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from jdoptim.distributed import dtensor_class

Target = Tensor | GradientEdge
"""What a batched backward pass differentiates with respect to: a tensor, or an edge of the
graph (the gradient flowing into one output of a node)."""

_ACCUMULATE_GRAD = type(torch.zeros(1, requires_grad=True).expand(1).grad_fn.next_functions[0][0])
_MODULE_HOOK_NODE = "BackwardHookFunctionBackward"
"""The autograd node through which a module's full backward hooks run (on its inputs and
outputs), as hooks of the node itself."""
CONVOLUTION_NODES = frozenset({"ConvolutionBackward0", "ConvolutionBackward1"})
"""The autograd nodes of convolutions, whose vectorised backward pass torch runs one row at a
time, with copies: through them, a loop of ordinary backward passes over the rows is faster."""


def _chunks(
    outputs: Sequence[Target],
    inputs: Sequence[Target],
    rows: Sequence[Tensor],
    retain_graph: bool,
    batched: bool,
    chunk_size: int | None,
) -> Iterator[tuple[int, int, Sequence[Tensor | None]]]:
    """The vector-Jacobian products of ``rows`` in chunks: ``(start, stop, grads)``, with
    ``grads[i]`` of shape ``[stop - start, *inputs[i].shape]`` or ``None``."""
    r = rows[0].shape[0]
    step = 1 if not batched else r if chunk_size is None else chunk_size
    for start in range(0, r, step):
        stop = min(start + step, r)
        keep = retain_graph or stop < r
        if step == 1:
            grads = torch.autograd.grad(
                list(outputs),
                list(inputs),
                [row[start] for row in rows],
                retain_graph=keep,
                allow_unused=True,
            )
            grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        else:
            grads = torch.autograd.grad(
                list(outputs),
                list(inputs),
                [row[start:stop] for row in rows],
                retain_graph=keep,
                allow_unused=True,
                is_grads_batched=True,
            )
        yield start, stop, grads


def vjp_rows(
    outputs: Sequence[Target],
    inputs: Sequence[Target],
    rows: list[Tensor],
    *,
    retain_graph: bool,
    batched: bool = True,
    chunk_size: int | None = None,
    release: bool = False,
) -> list[Tensor | None]:
    """Vector-Jacobian products for several rows of cotangents at once.

    The passes' parts are joined one input at a time, each part let go once joined, so that
    joining holds at most one input's gradients twice.

    Args:
        outputs: What is differentiated (tensors or graph edges).
        inputs: What it is differentiated with respect to.
        rows: For each output, its cotangents ``[r, *shape]``, one per row.
        retain_graph: Keep the graph after the last pass.
        batched: Vectorise the rows (``is_grads_batched``); otherwise one pass per row.
        chunk_size: Rows per batched pass; ``None`` for all at once.
        release: Empty ``rows`` once the passes are done, before their parts are joined, so
            that the cotangents can be let go.

    Returns:
        For each input, its gradients ``[r, *shape]``, or ``None`` if no output reaches it.
    """
    chunks = [
        list(grads)
        for _, _, grads in _chunks(outputs, inputs, rows, retain_graph, batched, chunk_size)
    ]
    if release:
        rows.clear()
    joined: list[Tensor | None] = []
    for i in range(len(inputs)):
        parts = [chunk[i] for chunk in chunks]
        for chunk in chunks:
            chunk[i] = None
        joined.append(
            None if parts[0] is None else parts[0] if len(parts) == 1 else torch.cat(parts)  # type: ignore[arg-type]
        )
    return joined


PASS_ENTRIES = 2**23
"""By default, `jacobian_matrix` computes as many rows per batched pass as fit in this many
entries of the Jacobian (32 MiB in float32): at least one, at most all. What a pass holds besides
the matrix is then bounded, and so is the size of the vectorised weight gradients, which on CPUs
run slower once they outgrow the caches than a few smaller passes."""


def jacobian_matrix(
    outputs: Sequence[Target],
    inputs: Sequence[Tensor],
    rows: Sequence[Tensor],
    *,
    retain_graph: bool,
    batched: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor | None, list[bool]]:
    """The Jacobian ``[r, n]`` of ``outputs`` (as weighted by ``rows``) with respect to the
    ``inputs`` they reach, side by side, written chunk by chunk into one matrix.

    Concatenating per-input Jacobians would hold the Jacobian twice; here a pass holds its own
    rows only, ``chunk_size`` of them (by default as many as fit in `PASS_ENTRIES` entries).

    Returns:
        The matrix (``None`` if no input is reached), and whether each input is reached.
    """
    r = rows[0].shape[0]
    if batched and chunk_size is None:
        n = sum(p.numel() for p in inputs)
        chunk_size = max(1, min(r, PASS_ENTRIES // max(n, 1)))
    matrix: Tensor | None = None
    reached: list[bool] = []
    for start, stop, grads in _chunks(outputs, inputs, rows, retain_graph, batched, chunk_size):
        if matrix is None:
            reached = [g is not None for g in grads]
            present = [g for g in grads if g is not None]
            if not present:
                return None, reached
            dtype = present[0].dtype
            for g in present[1:]:
                dtype = torch.promote_types(dtype, g.dtype)
            n = sum(g[0].numel() for g in present)
            matrix = present[0].new_empty((r, n), dtype=dtype)
        offset = 0
        for g in grads:
            if g is not None:
                size = g[0].numel()
                matrix[start:stop, offset : offset + size].copy_(g.reshape(stop - start, size))
                offset += size
        del grads
    return matrix, reached


@dataclass
class Split:
    """The losses' graph cut at the boundary of the shared part.

    Attributes:
        boundary: The edges through which the graph enters the shared part.
        cotangents: For each boundary edge, the gradients of the rows ``[r, *shape]``.
        own: The ordinary gradient of the sum of the losses for each of the other parameters
            (outside the shared part) that the losses reach.
        captured: Gradients ``[r, *shape]`` at requested edges that lie outside the shared part.
        shared_nodes: The nodes of the shared part (``None``: the whole graph).
        convolutions: Whether the shared part holds convolutions (see `CONVOLUTION_NODES`).
    """

    boundary: list[Target] = field(default_factory=list)
    cotangents: list[Tensor] = field(default_factory=list)
    own: dict[Tensor, Tensor] = field(default_factory=dict)
    captured: dict[tuple[Any, int], Tensor] = field(default_factory=dict)
    shared_nodes: set[Any] | None = field(default_factory=set)
    convolutions: bool = False

    @classmethod
    def at(cls, losses: Tensor, rows: Tensor) -> Split:
        """The cut of losses whose whole graph is shared: at the losses themselves."""
        return cls(boundary=[losses], cotangents=[rows], shared_nodes=None)

    def is_shared(self, edge: GradientEdge) -> bool:
        """Whether ``edge`` lies in the shared part (below the boundary)."""
        return self.shared_nodes is None or edge.node in self.shared_nodes


class _Graph:
    """The nodes the losses reach, which of them lead to shared and to other parameters, and
    which outputs of each node are used."""

    def __init__(self, root: Any, root_nr: int, shared: set[int], others: set[int]) -> None:
        self.children: dict[Any, list[tuple[Any, int]]] = {}
        self.used: dict[Any, set[int]] = {root: {root_nr}}
        self.leaves: dict[Any, Tensor] = {}
        order: list[Any] = []
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in self.children:
                continue
            nexts = [(n, nr) for n, nr in node.next_functions if n is not None]
            self.children[node] = nexts
            stack.append((node, True))
            for child, nr in nexts:
                self.used.setdefault(child, set()).add(nr)
                if child not in self.children:
                    stack.append((child, False))
        self.order = order
        """Every node, children before parents."""
        self.to_shared: dict[Any, bool] = {}
        self.to_others: dict[Any, bool] = {}
        for node in order:
            if type(node) is _ACCUMULATE_GRAD:
                var = node.variable
                self.leaves[node] = var
                self.to_shared[node] = id(var) in shared
                self.to_others[node] = id(var) in others
                continue
            kids = self.children[node]
            self.to_shared[node] = any(self.to_shared[child] for child, _ in kids)
            self.to_others[node] = any(self.to_others[child] for child, _ in kids)

    def shared_part(self) -> set[Any]:
        return {n for n, s in self.to_shared.items() if s and not self.to_others[n]}


def _outputs(node: Any) -> int:
    return len(node._input_metadata)


def _call(node: Any, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
    """Run a node's backward function on the gradients of its outputs, and bring what it sends
    along each next edge to the shape and dtype that edge expects (summing broadcast
    dimensions), as the autograd engine does."""
    apply = node if callable(node) else node.apply
    result = apply(*grads)
    result = result if isinstance(result, tuple) else (result,)
    fitted: list[Tensor | None] = []
    for grad, (child, nr) in zip(result, node.next_functions, strict=False):
        if grad is not None and child is not None:
            expected = child._input_metadata[nr]
            if grad.shape != expected.shape:
                grad = grad.sum_to_size(expected.shape)
            if grad.dtype != expected.dtype:
                grad = grad.to(expected.dtype)
        fitted.append(grad)
    return tuple(fitted)


def _consumer_grads(
    node: Any, cotangents: list[Tensor | None], picks: list[int], rows: int
) -> list[Tensor | None]:
    """The gradients a node sends along its next edges ``picks``, for ``rows`` rows of
    cotangents ``[rows, *shape]`` (vectorised, or one row at a time where that fails)."""
    if rows == 1:
        out = _call(node, [None if c is None else c[0] for c in cotangents])
        return [None if out[i] is None else out[i].unsqueeze(0) for i in picks]
    present: list[bool] = []

    def selected(*grads: Tensor | None) -> tuple[Tensor, ...]:
        out = _call(node, grads)
        present[:] = [out[i] is not None for i in picks]
        return tuple(out[i] for i in picks if out[i] is not None)

    in_dims = tuple(None if c is None else 0 for c in cotangents)
    try:
        values = iter(torch.func.vmap(selected, in_dims=in_dims)(*cotangents))
        return [next(values) if here else None for here in present]
    except RuntimeError:
        per_row = [
            _consumer_grads(node, [c if c is None else c[k : k + 1] for c in cotangents], picks, 1)
            for k in range(rows)
        ]
        return [
            None if parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]
            for parts in zip(*per_row, strict=True)
        ]


def split(
    losses: Tensor,
    rows: Tensor,
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    *,
    capture: Sequence[GradientEdge] = (),
    own_weights: Tensor | None = None,
    retain_graph: bool = True,
    batched: bool = True,
    chunk_size: int | None = None,
) -> Split:
    """Cut the graph of ``losses`` at the shared part and compute the gradients at its boundary.

    Args:
        losses: The losses (any shape), attached to the graph.
        rows: The cotangents of the losses, ``[r, *losses.shape]``: the identity for one row per
            loss, or one row per task for per-sample losses.
        shared: The shared parameters.
        others: The parameters outside the shared part that receive their ordinary gradient.
        capture: Edges whose gradients ``[r, *shape]`` are wanted; those outside the shared
            part are captured here (``Split.captured``), the others are left to `through_shared`.
        own_weights: The weights of the losses in the other parameters' gradient (that of
            ``(own_weights * losses).sum()``, shaped like ``losses``); ``None`` for their sum.
        retain_graph: Keep the graph of the part outside the shared one after its last pass (the
            shared part is always kept for `through_shared`).
        batched: Vectorise the rows; otherwise one backward pass per row.
        chunk_size: Rows per batched pass; ``None`` for all at once.
    """
    _check_unsharded([*shared, *others])
    root = losses.grad_fn
    graph = _Graph(root, losses.output_nr, {id(p) for p in shared}, {id(p) for p in others})
    part = graph.shared_part()
    result = Split(
        shared_nodes=part, convolutions=any(type(n).__name__ in CONVOLUTION_NODES for n in part)
    )
    if not graph.to_shared.get(root, False):
        result.own = _own(losses, graph, retain_graph, own_weights)
        return result
    if root in part:  # no other parameter: the losses are the boundary
        result.boundary = [GradientEdge(root, losses.output_nr)]
        result.cotangents = [rows]
        return result
    consumers = [
        node
        for node, kids in graph.children.items()
        if node not in part and graph.to_shared[node] and any(child in part for child, _ in kids)
    ]
    if any(type(node).__name__ == _MODULE_HOOK_NODE for node in consumers):
        # A module's backward hook would be skipped: differentiate the whole graph per row.
        result.boundary = [GradientEdge(root, losses.output_nr)]
        result.cotangents = [rows]
        result.shared_nodes = None
        result.convolutions = any(type(n).__name__ in CONVOLUTION_NODES for n in graph.children)
        result.own = _own(losses, graph, retain_graph, own_weights)
        return result
    wanted: dict[tuple[Any, int], GradientEdge] = {}
    for node in consumers:
        for nr in sorted(graph.used[node]):
            wanted[(node, nr)] = GradientEdge(node, nr)
    captures = [(edge.node, edge.output_nr) for edge in capture if edge.node not in part]
    r = rows.shape[0]
    row_of = None if captures or own_weights is not None else _row_of(losses, rows, graph, part)
    if row_of is not None and all(node in row_of for node in consumers):
        inflow, result.own = _one_pass(losses, graph, part, consumers, row_of, r, retain_graph)
        result.boundary = [GradientEdge(node, nr) for node, nr in inflow]
        result.cotangents = list(inflow.values())
        return result
    wanted.update({key: GradientEdge(*key) for key in captures})
    keys = list(wanted)
    grads = vjp_rows(
        [losses],
        [wanted[key] for key in keys],
        [rows],
        retain_graph=True,
        batched=batched,
        chunk_size=chunk_size,
    )
    at = dict(zip(keys, grads, strict=True))
    result.captured = {key: at[key] for key in captures if at[key] is not None}
    inflow = _boundary_inflow(consumers, graph, part, at, r)
    result.boundary = [GradientEdge(node, nr) for node, nr in inflow]
    result.cotangents = list(inflow.values())
    result.own = _own(losses, graph, retain_graph, own_weights)
    return result


def _row_of(losses: Tensor, rows: Tensor, graph: _Graph, part: set[Any]) -> dict[Any, int] | None:
    """For losses stacked from scalars (``torch.stack``) with one row per loss (the identity),
    the one loss whose graph reaches each node outside the shared part, for the nodes that only
    one loss reaches; ``None`` for other losses or rows."""
    root = losses.grad_fn
    m = losses.shape[0] if losses.ndim == 1 else 0
    if (
        type(root).__name__ != "StackBackward0"
        or len(root.next_functions) != m
        or tuple(rows.shape) != (m, m)
        or not bool((rows.diagonal() == 1).all())
        or int(rows.count_nonzero()) != m
    ):
        return None
    several = -1
    row_of: dict[Any, int] = {}
    for k, (child, _) in enumerate(root.next_functions):
        if child is not None and child not in part:
            row_of[child] = k if row_of.get(child, k) == k else several
    for node in reversed(graph.order):  # parents before children
        row = row_of.get(node)
        if row is None or node is root:
            continue
        for child, _ in graph.children[node]:
            if child not in part:
                row_of[child] = row if row_of.get(child, row) == row else several
    return {node: row for node, row in row_of.items() if row != several}


def _one_pass(
    losses: Tensor,
    graph: _Graph,
    part: set[Any],
    consumers: list[Any],
    row_of: dict[Any, int],
    r: int,
    retain_graph: bool,
) -> tuple[dict[tuple[Any, int], Tensor], dict[Tensor, Tensor]]:
    """The gradients of the rows at the boundary ``[r, *shape]`` per edge, and the others'
    ordinary gradients, from one ordinary backward pass of the sum of the losses, when one loss
    (row) reaches each consumer: what a consumer sends into the shared part, seen by a hook on
    its node, is then that row's gradient."""
    sent: dict[tuple[Any, int], dict[int, Tensor]] = {}
    edges: dict[tuple[Any, int], GradientEdge] = {}

    def catch(node: Any, row: int, picks: list[int]) -> Any:
        def hook(grad_inputs: tuple[Tensor | None, ...], _: Any) -> None:
            for i in picks:
                grad = grad_inputs[i]
                if grad is not None:
                    by_row = sent.setdefault(node.next_functions[i], {})
                    by_row[row] = grad if row not in by_row else by_row[row] + grad

        return hook

    handles = []
    try:
        for node in consumers:
            picks = [i for i, (child, _) in enumerate(node.next_functions) if child in part]
            for i in picks:
                edges.setdefault(node.next_functions[i], GradientEdge(*node.next_functions[i]))
            handles.append(node.register_hook(catch(node, row_of[node], picks)))
        params = [var for node, var in graph.leaves.items() if graph.to_others[node]]
        # The boundary edges are differentiated too, so that every consumer runs.
        grads = torch.autograd.grad(
            losses,
            [*params, *edges.values()],
            torch.ones_like(losses),
            retain_graph=retain_graph,
            allow_unused=True,
        )
    finally:
        for handle in handles:
            handle.remove()
    own = {p: g for p, g in zip(params, grads, strict=False) if g is not None}
    inflow = {}
    for key, by_row in sent.items():
        some = next(iter(by_row.values()))
        zero = some.new_zeros(some.shape) if len(by_row) < r else some
        inflow[key] = torch.stack([by_row.get(k, zero) for k in range(r)])
    return inflow, own


def _check_unsharded(params: Sequence[Tensor]) -> None:
    """Raise if a parameter is sharded with ``fully_shard``: FSDP gathers a layer's parameters
    and reduces its gradients in hooks of the backward pass, which calling the graph's nodes
    directly, and differentiating with respect to the shards, would bypass."""
    dtensor = dtensor_class()
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        raise ValueError(
            "The parameters are sharded with fully_shard (DTensors): the graph of the losses "
            "cannot be cut at the shared part, since FSDP gathers each layer's parameters and "
            "reduces its gradients in hooks of the backward pass. Use JDOptimizer with "
            "shared_params, whose sharded modes run ordinary backward passes through FSDP."
        )


def _boundary_inflow(
    consumers: list[Any],
    graph: _Graph,
    part: set[Any],
    at: dict[tuple[Any, int], Tensor | None],
    r: int,
) -> dict[tuple[Any, int], Tensor]:
    """Run each consumer's backward function on the rows that reach it and sum what it sends
    into each boundary edge: ``[r, *shape]`` per edge."""
    cotangents = {node: [at.get((node, nr)) for nr in range(_outputs(node))] for node in consumers}
    present = [c for cots in cotangents.values() for c in cots if c is not None]
    if not present:
        return {}
    flags = iter(torch.stack([c.reshape(r, -1).any(dim=1) for c in present]).tolist())
    sent: dict[tuple[Any, int], list[tuple[list[int], Tensor]]] = {}
    for node, cots in cotangents.items():  # rows reaching each consumer: one synchronisation
        per_cot = [next(flags) for c in cots if c is not None]
        live = [k for k in range(r) if any(f[k] for f in per_cot)]
        if not live:
            continue
        picks = [i for i, (child, _) in enumerate(node.next_functions) if child in part]
        with torch.no_grad():
            if len(live) == 1:  # one task reaches the consumer, as a head
                out = _call(node, [None if c is None else c[live[0]] for c in cots])
                grads = [None if out[i] is None else out[i].unsqueeze(0) for i in picks]
            else:
                index = torch.tensor(live, device=present[0].device)
                rows = cots if len(live) == r else [c if c is None else c[index] for c in cots]
                grads = _consumer_grads(node, rows, picks, len(live))
        for i, grad in zip(picks, grads, strict=True):
            if grad is not None:
                sent.setdefault(node.next_functions[i], []).append((live, grad))
    return {key: _gather(parts, r) for key, parts in sent.items()}


def _gather(parts: list[tuple[list[int], Tensor]], r: int) -> Tensor:
    """Sum the gradients ``[len(rows), *shape]`` sent to the given rows into ``[r, *shape]``."""
    rows = [k for live, _ in parts for k in live]
    if len(set(rows)) == len(rows):  # each row from one consumer, as for heads: no sums
        first = parts[0][1]
        zero = first.new_zeros(first.shape[1:])
        by_row = {k: grad[j] for live, grad in parts for j, k in enumerate(live)}
        return torch.stack([by_row.get(k, zero) for k in range(r)])
    total = parts[0][1].new_zeros((r, *parts[0][1].shape[1:]))
    for live, grad in parts:
        if len(live) == r:
            total.add_(grad)
        else:
            total.index_add_(0, torch.tensor(live, device=grad.device), grad)
    return total


def _own(
    losses: Tensor, graph: _Graph, retain_graph: bool, weights: Tensor | None = None
) -> dict[Tensor, Tensor]:
    """The ordinary gradient of the sum of the losses (weighted by ``weights``) for the other
    parameters they reach."""
    params = [var for node, var in graph.leaves.items() if graph.to_others[node]]
    if not params:
        return {}
    cotangent = (
        torch.ones_like(losses) if weights is None else weights.to(losses).reshape(losses.shape)
    )
    grads = torch.autograd.grad(
        losses, params, cotangent, retain_graph=retain_graph, allow_unused=True
    )
    return {p: g for p, g in zip(params, grads, strict=True) if g is not None}


SHARED_PASSES = 3
"""Batched passes through the shared part, at least, when the gradients they return hold more than
`SHARED_PASS_MIN` entries (and more where they would exceed `PASS_ENTRIES` per pass): a pass holds
one layer's gradients of its rows besides what it returns, and more passes make that smaller."""

SHARED_PASS_MIN = 2**20
"""Entries (4 MiB in float32) of the returned gradients below which one pass takes every row: the
memory is small, and each pass costs a walk of the graph."""


def through_shared(
    cut: Split,
    inputs: Sequence[Target],
    *,
    retain_graph: bool,
    batched: bool = True,
    chunk_size: int | None = None,
    release: bool = False,
) -> list[Tensor | None]:
    """The gradients ``[r, *shape]`` of the rows at ``inputs`` inside the shared part: batched
    backward passes from the boundary.

    What is held besides the gradients returned is kept small: the rows go through in
    `SHARED_PASSES` passes or more when the gradients are large (see `SHARED_PASS_MIN` and
    `PASS_ENTRIES`), and with ``release`` the boundary's gradients (``cut.cotangents``, emptied)
    are let go before the passes' parts are joined (see `vjp_rows`).

    Args:
        cut: The result of `split`.
        inputs: Tensors or edges in the shared part.
        retain_graph: Keep the graph after the passes.
        batched: Vectorise the rows; otherwise one backward pass per row.
        chunk_size: Rows per batched pass; ``None`` to choose as above.
        release: Empty ``cut.cotangents`` once the passes are done.
    """
    if not cut.boundary or not inputs:
        return [None] * len(inputs)
    r = cut.cotangents[0].shape[0]
    if batched and chunk_size is None:
        entries = r * sum(_numel(target) for target in inputs)
        passes = -(-entries // PASS_ENTRIES)
        if entries > SHARED_PASS_MIN:
            passes = max(passes, SHARED_PASSES)
        chunk_size = -(-r // min(max(passes, 1), r))
    return vjp_rows(
        cut.boundary,
        inputs,
        cut.cotangents,
        retain_graph=retain_graph,
        batched=batched,
        chunk_size=chunk_size,
        release=release,
    )


def _numel(target: Target) -> int:
    """The number of entries of a tensor, or of the gradient flowing along an edge."""
    if isinstance(target, Tensor):
        return target.numel()
    return math.prod(target.node._input_metadata[target.output_nr].shape)
