"""`GramianEngine`: the Gramian of many losses, and their weighted gradient, without the
Jacobian."""

from __future__ import annotations

import itertools
import math
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.utils.hooks import RemovableHandle

from jdoptim._split import CONVOLUTION_NODES, Split, split, through_shared
from jdoptim.gramian._modules import Call, Handler, Layout, make_handler, module_problem
from jdoptim.gramian._terms import DenseTerm, Gather, Term, combine
from jdoptim.linalg._gramian import kept, solve_dtype

_KEYS = itertools.count()
_ACCUMULATE_GRAD = type(torch.zeros(1, requires_grad=True).expand(1).grad_fn.next_functions[0][0])

Modules = nn.Module | Iterable[nn.Module]
_Slot = tuple[Call, int, GradientEdge]  # a recorded call, one of its outputs, its graph edge


def _roots(modules: Modules) -> list[nn.Module]:
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)  # type: ignore[arg-type]
    if not roots:
        raise ValueError("modules is empty; pass the model, or the modules to hook.")
    for module in roots:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"modules must be an nn.Module or an iterable of nn.Modules, got an element of "
                f"type {type(module).__name__}."
            )
    return roots


def _check_batch_dim(batch_dim: int | None) -> int | None:
    if batch_dim is not None and (
        isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0
    ):
        raise ValueError(
            f"Invalid batch_dim value: {batch_dim!r}; expected an integer >= 0 or None."
        )
    return batch_dim


def _walk_modules(roots: list[nn.Module], batch_dim: int | None) -> tuple[list[Handler], list[str]]:
    """The handlers of ``roots``' modules, and the problems that prevent hooking them."""
    handlers: list[Handler] = []
    problems: list[str] = []
    seen: set[int] = set()
    several = len(roots) > 1

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        shown = repr(name) if name else "(root)"
        problem = module_problem(module, shown, batch_dim)
        if problem is not None:
            problems.append(problem)
            return
        handler = make_handler(module, shown, batch_dim)
        if handler is not None:
            handlers.append(handler)
            if handler.jump:
                return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    for i, root in enumerate(roots):
        visit(root, f"modules[{i}]" if several else "")
    return handlers, problems


def find_problems(modules: Modules, *, batch_dim: int | None = 0) -> list[str]:
    """The reasons why `GramianEngine` would refuse these modules (empty if it accepts them).

    Args:
        modules: A module or an iterable of modules.
        batch_dim: As in `GramianEngine`.

    Examples:
        >>> from torch import nn
        >>> from jdoptim.gramian import find_problems
        >>> find_problems(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))  # doctest: +ELLIPSIS
        ["Module '1' (BatchNorm1d) normalises with statistics of the whole batch ..."]
    """
    return _walk_modules(_roots(modules), _check_batch_dim(batch_dim))[1]


def is_supported(modules: Modules, *, batch_dim: int | None = 0) -> bool:
    """Whether `GramianEngine` accepts ``modules`` and has a closed form for every module with
    parameters (no ``torch.func`` fallback), so that gramian mode is the fast choice.

    Examples:
        >>> from torch import nn
        >>> from jdoptim.gramian import is_supported
        >>> is_supported(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        True
        >>> is_supported(nn.LSTM(2, 3, batch_first=True))
        False
    """
    handlers, problems = _walk_modules(_roots(modules), _check_batch_dim(batch_dim))
    return not problems and all(handler.closed_form for handler in handlers)


def _remove_hooks(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class _Pending:
    """What `GramianEngine.gramian` leaves for `GramianEngine.backward`."""

    __slots__ = ("dtype", "leaves", "losses", "m", "retain_graph", "terms")

    def __init__(
        self,
        losses: Tensor,
        terms: list[Term],
        leaves: list[Tensor],
        dtype: torch.dtype,
        retain_graph: bool,
    ) -> None:
        self.losses = losses
        self.terms = terms
        self.leaves = leaves
        self.m = losses.numel()
        self.dtype = dtype
        self.retain_graph = retain_graph


class GramianEngine:
    r"""Gramian of many losses with respect to a model's parameters, and their weighted
    gradient, computed without the Jacobian.

    The engine hooks the modules once; every forward pass with grad enabled then records what
    the closed forms need (inputs of the layers, and where their outputs sit in the graph). For
    losses $L_1, \dots, L_m$ (flattened row-major from the loss tensor):

    1. `gramian` runs one backward pass to the outputs of the hooked layers (no parameter
       gradients) and returns $G_{kl} = \langle \nabla L_k, \nabla L_l\rangle$, summed over the
       hooked parameters;
    2. `backward` adds $\sum_k w_k \nabla L_k$ into the ``.grad`` of every parameter the losses
       reach, from the same recorded quantities (plus one weighted backward pass for parameters
       outside the hooked modules, if any).

    For a linear layer, sample $i$'s gradient is $\sum_p \delta_{ip} a_{ip}^\top$ (output
    gradients $\delta$, inputs $a$, positions $p$), so

    $$ \langle \nabla_i W, \nabla_j W\rangle = \sum_{p,q} (a_{ip}\cdot a_{jq})\,
    (\delta_{ip}\cdot\delta_{jq}), $$

    computed from the Gramians of inputs and output gradients ("ghost" inner products, as for
    per-sample gradient norms in [Goodfellow, arXiv 1510.01799](https://arxiv.org/abs/1510.01799)
    and [Li et al., arXiv 2110.05679](https://arxiv.org/abs/2110.05679)), or from materialised
    per-sample gradients, whichever costs fewer operations for that layer. The weighted
    gradient of a linear layer is $\sum_{i,p} w_i\, \delta_{ip} a_{ip}^\top$, one more
    product of the same factors, so no second backward pass through the hooked layers is needed
    (the book-keeping idea of [Bu et al., arXiv 2210.00038](https://arxiv.org/abs/2210.00038)).
    Closed forms cover ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, and the
    affine parts of ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and eval-mode
    ``nn.BatchNorm``; any other module with parameters gets per-sample gradients from
    ``torch.func`` (``vjp`` and ``vmap`` of its functional forward). A layer called several
    times (or a parameter shared by several layers) gets the sum of its per-call gradients
    before inner products are taken.

    Losses of shape:

    - ``[B]`` (instance-wise risk minimisation, as in
      [Quinton & Rey, arXiv 2406.16232](https://arxiv.org/abs/2406.16232)) or ``[B, T, ...]``
      (one loss per sample and task) when ``B`` is the batch size the hooked modules saw
      along ``batch_dim``: the loss of sample $i$ must depend on sample $i$ only;
    - anything else (for example ``[T]`` task losses averaged over the batch), or any shape when
      ``batch_dim=None``: one backward pass per loss (batched), no per-sample assumption.

    Args:
        modules: The model, or the modules whose parameters define the Gramian (partial Jacobian
            descent: for example the last layers). Every parameter the losses reach is still
            updated by `backward`.
        batch_dim: The batch dimension of the hooked modules' inputs and outputs, or ``None``
            when losses never decompose per sample (then modules that mix samples, such as
            ``BatchNorm`` in training mode, are allowed).

    Raises:
        ValueError: If a module cannot work per sample: ``BatchNorm`` in training mode, modules
            whose ``batch_first`` disagrees with ``batch_dim``, sparse embeddings.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from jdoptim import UPGradWeighting
        >>> from jdoptim.gramian import GramianEngine
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> engine = GramianEngine(model, batch_dim=0)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 1)
        >>> losses = ((model(x) - y) ** 2).squeeze(1)  # one loss per sample
        >>> G = engine.gramian(losses)
        >>> G.shape
        torch.Size([5, 5])
        >>> engine.backward(UPGradWeighting()(G))
        >>> model[0].weight.grad.shape
        torch.Size([4, 3])
        >>> engine.close()
    """

    def __init__(self, modules: Modules, *, batch_dim: int | None = 0) -> None:
        self.batch_dim = _check_batch_dim(batch_dim)
        roots = _roots(modules)
        handlers, problems = _walk_modules(roots, self.batch_dim)
        if problems:
            raise ValueError(" ".join(problems))
        self.modules: tuple[nn.Module, ...] = tuple(roots)
        self._handlers = handlers
        self._key = f"jdoptim.gramian.{next(_KEYS)}"
        self._index = 0
        self._recording = True
        self._pending: _Pending | None = None
        self._batched_backward = True
        self._skipped: dict[int, Handler] = {}
        self._internal: set[int] = set()
        for handler in handlers:
            target = self._skipped if handler.jump else self._internal
            for param in handler.covered():
                if handler.jump:
                    self._skipped[id(param)] = handler
                else:
                    target.add(id(param))  # type: ignore[union-attr]
        ref = weakref.ref(self)
        self._handles: list[RemovableHandle] = [
            handler.module.register_forward_hook(_make_hook(ref, handler), with_kwargs=True)
            for handler in handlers
        ]
        self._finalizer = weakref.finalize(self, _remove_hooks, self._handles)

    @property
    def supports(self) -> bool:
        """Whether every hooked module with parameters has a closed form (no ``torch.func``
        fallback)."""
        return all(handler.closed_form for handler in self._handlers)

    @property
    def fallback_modules(self) -> list[str]:
        """Names of the hooked modules whose per-sample gradients come from ``torch.func``."""
        return [handler.name for handler in self._handlers if not handler.closed_form]

    def close(self) -> None:
        """Remove the hooks and forget any pending Gramian. The engine cannot be used after."""
        self._finalizer()
        self._pending = None

    def __enter__(self) -> GramianEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self._handlers)} hooked modules, "
            f"batch_dim={self.batch_dim!r}, supports={self.supports})"
        )

    def _record(self, handler: Handler, args: tuple, kwargs: dict, output: Any) -> None:
        call = handler.capture(args, kwargs, output, self._index)
        if call is None:
            return
        self._index += 1
        for j, out in enumerate(call.outputs):  # type: ignore[arg-type]
            out.grad_fn.metadata.setdefault(self._key, []).append((call, j))
        call.outputs = None

    def _walk(self, losses: Tensor) -> tuple[list[Call], list[_Slot], list[Tensor], bool]:
        """Find the recorded calls that the losses reach (in forward order), the graph edges of
        their outputs, the leaves the losses reach outside hooked modules, and whether the
        graph holds convolutions."""
        key = self._key
        calls: dict[int, Call] = {}
        slots: list[_Slot] = []
        leaves: dict[int, Tensor] = {}
        unseen: list[Tensor] = []
        seen: set[Any] = set()
        convolutions = False
        stack = [losses.grad_fn]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            convolutions = convolutions or type(node).__name__ in CONVOLUTION_NODES
            entries = node.metadata.get(key)
            if entries:
                jump = False
                for call, j in entries:
                    slots.append((call, j, GradientEdge(node, call.out_nrs[j])))
                    calls[id(call)] = call
                    if call.handler.jump:
                        jump = True
                        stack.extend(edge.node for edge in call.input_edges)
                if jump:
                    continue
            if type(node) is _ACCUMULATE_GRAD:
                var = node.variable
                if id(var) in self._skipped:
                    unseen.append(var)
                elif id(var) not in self._internal:
                    leaves[id(var)] = var
                continue
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        if not calls:
            raise ValueError(
                "The losses reach none of the hooked modules' recorded calls; run the forward "
                "pass after building the engine, with grad enabled, through the hooked modules."
            )
        if unseen:
            handler = self._skipped[id(unseen[0])]
            raise ValueError(
                f"A parameter of module {handler.name} ({type(handler.module).__name__}, shape "
                f"{tuple(unseen[0].shape)}) reaches the losses other than through a recorded "
                "call of that module: it is used outside the module's forward, or the module ran "
                "before the engine was built or while grad was disabled. Use the parameter only "
                "through its module, or leave the module out of the hooked modules."
            )
        ordered = sorted(calls.values(), key=lambda call: call.index)
        slots.sort(key=lambda slot: (slot[0].index, slot[1]))
        return ordered, slots, list(leaves.values()), convolutions

    def _layout(self, losses: Tensor, slots: list[_Slot], batched: bool | None) -> Layout:
        m = losses.numel()
        B = losses.shape[0]
        if self.batch_dim is None or batched is False:
            return Layout(False, self.batch_dim, 1, m, losses.dtype)
        sizes = [(call, call.out_batch[j]) for call, j, _ in slots]
        off = [call for call, size in sizes if size != B]
        if off and (batched or len(off) < len(sizes)):
            call = off[0]
            raise ValueError(
                f"The losses have shape {tuple(losses.shape)}, so a batch of {B}, but module "
                f"{call.handler.name} returned an output without that size along "
                f"batch_dim={self.batch_dim}; per-sample Gramians need every hooked module to "
                "process the batch (expand shared inputs such as position indices to the "
                "batch). For losses that are not per-sample, pass batched=False."
            )
        if off:
            return Layout(False, self.batch_dim, 1, m, losses.dtype)
        return Layout(True, self.batch_dim, B, m // B, losses.dtype)

    def gramian(
        self,
        losses: Tensor,
        *,
        batched: bool | None = None,
        retain_graph: bool = False,
        gather: Gather | None = None,
        reset: Callable[[], None] | None = None,
    ) -> Tensor:
        r"""Compute the Gramian $G_{kl} = \langle\nabla L_k, \nabla L_l\rangle$ of the losses
        with respect to the hooked modules' parameters.

        The losses must come from a forward pass of the hooked modules run after the engine was
        built, with grad enabled. What `backward` needs is kept until it runs (or until the next
        call of `gramian`).

        Args:
            losses: A loss tensor of any shape with at least one dimension; its ``m`` entries,
                in row-major order, are the objectives.
            batched: Whether the losses are per-sample (their first dimension is the batch the
                hooked modules saw along ``batch_dim``, and loss ``[i, ...]`` depends on sample
                ``i`` only). ``None`` (default): per-sample exactly when that first dimension is
                the batch size.
            retain_graph: Keep the autograd graph of the losses after `backward` (as
                ``Tensor.backward(retain_graph=True)`` does). Otherwise its buffers are freed
                as soon as they are no longer needed.
            gather: For a model sharded over ranks, each with the losses of its own data:
                concatenates every rank's tensor along the first dimension, in rank order (a
                collective). Each layer's factors (inputs and output gradients of every
                sample) are gathered before inner products are taken. Per-sample losses are
                each rank's own objectives: the result is the Gramian of the losses of every
                rank, rank ``r``'s ``m`` losses being rows ``r·m`` to ``(r+1)·m``. Other
                losses are the same objectives on every rank, averaged over the ranks (as data
                parallelism averages gradients): the result is the ``[m, m]`` Gramian of their
                average. `backward` still weights this rank's losses only.
            reset: Called when the batched backward pass fails midway, before the engine goes
                on with one backward pass per loss: for a model whose hooks keep state across
                a backward pass (FSDP's), which must be reset after a failed one.

        Returns:
            The ``[m, m]`` Gramian (``[ranks·m, ranks·m]`` with ``gather`` and per-sample
            losses), in the losses' dtype and on their device.

        Raises:
            ValueError: If the losses reach no hooked module, a module's batch size differs
                from the losses', an input of a hooked module was modified in place, or a
                hooked parameter is also used outside its module.
        """
        return self._gramian(losses, batched, retain_graph, None, (), gather, reset)[0]

    def task_gramian(
        self,
        losses: Tensor,
        *,
        shared: Sequence[Tensor] | None = None,
        others: Sequence[Tensor] = (),
        batched: bool | None = None,
        retain_graph: bool = False,
        own_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[Tensor, Tensor]]:
        r"""The Gramian of the losses with respect to the hooked parameters in ``shared``, and
        the ordinary gradients of the ``others`` (multi-task learning).

        With ``shared``, the graph of the losses is cut where it enters the part that leads only
        to shared parameters (the trunk's output, for a model with task heads): each task's own
        part (its head) is differentiated once, by one ordinary backward pass of the sum of the
        losses, which gives every parameter in ``others`` its gradient; only the shared part is
        batched over the tasks. `backward` then writes $\sum_k w_k \nabla L_k$ into the shared
        parameters (pass them as its ``params``). Without ``shared``, this is `gramian`.

        Args:
            losses: As in `gramian`.
            shared: The parameters shared by the losses (the trunk's); the hooked modules
                should hold no other trainable parameter.
            others: The parameters outside ``shared`` that receive the ordinary gradient of the
                sum of the losses that reach them (the task heads').
            batched: As in `gramian`.
            retain_graph: As in `gramian`.
            own_weights: Weights of the losses (shaped like them) in the gradients of the
                ``others``, which then receive that of the weighted sum; ``None`` for the sum.

        Returns:
            The ``[m, m]`` Gramian and, for each parameter of ``others`` that the losses reach,
            its gradient.

        Raises:
            ValueError: As `gramian`.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from jdoptim import UPGradWeighting
            >>> from jdoptim.gramian import GramianEngine
            >>> _ = torch.manual_seed(0)
            >>> trunk, heads = nn.Linear(3, 4), nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
            >>> engine = GramianEngine(trunk)
            >>> features = trunk(torch.randn(5, 3))
            >>> losses = torch.stack([head(features).pow(2).mean() for head in heads])  # [2]
            >>> G, own = engine.task_gramian(
            ...     losses, shared=list(trunk.parameters()), others=list(heads.parameters())
            ... )
            >>> G.shape, len(own)  # the trunk's Gramian; the heads' ordinary gradients
            (torch.Size([2, 2]), 4)
            >>> engine.backward(UPGradWeighting()(G), params=trunk.parameters())
            >>> trunk.weight.grad.shape
            torch.Size([4, 3])
        """
        return self._gramian(losses, batched, retain_graph, shared, others, None, None, own_weights)

    def _gramian(
        self,
        losses: Tensor,
        batched: bool | None,
        retain_graph: bool,
        shared: Sequence[Tensor] | None,
        others: Sequence[Tensor],
        gather: Gather | None,
        reset: Callable[[], None] | None,
        own_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[Tensor, Tensor]]:
        """`task_gramian`, with `gramian`'s ``gather`` and ``reset``."""
        if not isinstance(losses, Tensor):
            raise TypeError(f"losses must be a tensor, got {type(losses).__name__}.")
        if losses.ndim == 0 or losses.numel() == 0:
            raise ValueError(
                f"losses must have at least one dimension and one entry, got shape "
                f"{tuple(losses.shape)}."
            )
        if not losses.is_floating_point():
            raise TypeError(f"losses must have a floating dtype, got {losses.dtype}.")
        if losses.grad_fn is None:
            raise ValueError(
                "The losses are not connected to any hooked module (they have no grad_fn); "
                "compute them from the model's outputs with grad enabled."
            )
        self._pending = None
        calls, slots, leaves, convolutions = self._walk(losses)
        for call in calls:
            call.check_unmodified()
        layout = self._layout(losses, slots, batched)
        if shared is not None:
            shared_ids = {id(p) for p in shared}
            leaves = [leaf for leaf in leaves if id(leaf) in shared_ids]
        keep = retain_graph or bool(leaves)  # `backward` needs the graph for the leaves
        owners = Counter(id(p) for call in calls for p in call.params if p is not None)
        looped = convolutions or not self._batched_backward
        grads, direct, own = self._cotangents(
            losses, calls, slots, layout, keep, owners, shared, others, looped, reset, own_weights
        )
        cotangents: dict[int, list[Tensor | None]] = {
            id(call): [None] * len(call.out_nrs) for call in calls
        }
        for (call, j, _), grad in zip(slots, grads, strict=True):
            cotangents[id(call)][j] = grad
        del slots, grads  # each call's output gradients are released once it is processed
        m = losses.numel()
        terms: list[Term] = []
        shared_terms: list[Term] = []
        self._recording = False
        try:
            with torch.no_grad():
                size = m if gather is None else gather(losses.new_zeros(m)).numel()
                G = torch.zeros(size, size, dtype=solve_dtype(losses.dtype), device=losses.device)
                magnitudes: list[Tensor] = []
                for call in calls:
                    outputs = cotangents.pop(id(call))
                    if id(call) in direct:
                        call_terms = direct.pop(id(call))
                    elif all(g is None for g in outputs):
                        continue
                    else:
                        call_terms = call.handler.terms(call, outputs, layout)
                    for term in call_terms:
                        if all(owners[id(p)] == 1 for p in term.params):
                            _add_gramian(term, G, gather, magnitudes)
                            terms.append(term)
                        else:
                            shared_terms.append(term)
                for term in combine(shared_terms):
                    _add_gramian(term, G, gather, magnitudes)
                    terms.append(term)
                if magnitudes and not bool(kept(G, torch.cat(magnitudes))):
                    # Some products left the range of G's dtype: again, in float64 (where those
                    # of float32 factors cannot), the same on every rank.
                    G = torch.zeros_like(G, dtype=torch.float64)
                    for term in terms:
                        gathered = term if gather is None else term.gathered(gather)
                        gathered.widened(torch.float64).add_gramian(G)
                if size != m and not layout.per_sample:  # the Gramian of the ranks' average
                    ranks = size // m
                    G = G.view(ranks, m, ranks, m).sum(dim=(0, 2)) / ranks**2
        finally:
            self._recording = True
        self._pending = _Pending(losses, terms, leaves, losses.dtype, retain_graph)
        return G, own

    def _rows(self, losses: Tensor, layout: Layout) -> Tensor:
        """The cotangents of the losses, one row per objective (or per task, per sample)."""
        if layout.per_sample and layout.T == 1:
            return torch.ones_like(losses).unsqueeze(0)
        n = layout.T if layout.per_sample else layout.S * layout.T
        eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
        if layout.per_sample:
            return eye.view(n, 1, *losses.shape[1:]).expand(n, *losses.shape)
        return eye.view(n, *losses.shape)

    def _cotangents(
        self,
        losses: Tensor,
        calls: list[Call],
        slots: list[_Slot],
        layout: Layout,
        keep: bool,
        owners: Counter,
        shared: Sequence[Tensor] | None,
        others: Sequence[Tensor],
        looped: bool,
        reset: Callable[[], None] | None,
        own_weights: Tensor | None = None,
    ) -> tuple[list[Tensor | None], dict[int, list[Term]], dict[Tensor, Tensor]]:
        """The gradients of the rows at the hooked calls' outputs (one per slot), the terms of
        the calls whose parameters' gradients are taken directly from the backward pass, and
        the others' ordinary gradients (with ``shared``, the graph is cut at the shared part:
        see `jdoptim._split`).

        The rows are vectorised, except through convolutions, whose vectorised backward pass
        torch runs one row at a time with copies: a loop over the rows is then faster, and gives
        each objective's parameter gradients at the cost of an ordinary backward pass. If the
        vectorised pass fails, ``reset`` (if given) is called before the loop.
        """
        rows = self._rows(losses, layout)
        edges = [edge for _, _, edge in slots]
        batched = self._batched_backward
        # A vectorised pass keeps the graph in case it fails midway and is replayed.
        retain = keep or (not looped and rows.shape[0] > 1)
        try:
            if shared is None:
                cut = Split.at(losses, rows)
            else:
                cut = split(
                    losses,
                    rows,
                    shared,
                    others,
                    capture=edges,
                    own_weights=own_weights,
                    retain_graph=retain,
                    batched=batched,
                )
            m = losses.numel()
            direct = [
                call
                for call in calls
                if not layout.per_sample
                and all(owners[id(p)] == 1 for p in call.params if p is not None)
                and all(cut.is_shared(edge) for c, _, edge in slots if c is call)
                and call.handler.prefers_direct(call, m, looped)
            ]
            skipped = {id(call) for call in direct}
            params = [p for call in direct for p in call.params if p is not None]
            inside = [
                edge for call, _, edge in slots if id(call) not in skipped and cut.is_shared(edge)
            ]
            found = through_shared(
                cut, [*inside, *params], retain_graph=retain, batched=not looped, release=True
            )
        except RuntimeError as error:
            if looped:
                raise
            warnings.warn(
                f"The batched backward pass failed ({error}); the engine computes one "
                "backward pass per loss from now on.",
                stacklevel=4,
            )
            self._batched_backward = False
            if reset is not None:
                reset()
            return self._cotangents(
                losses, calls, slots, layout, keep, owners, shared, others, True, reset, own_weights
            )
        by_edge = {
            (e.node, e.output_nr): g for e, g in zip(inside, found[: len(inside)], strict=True)
        }
        by_param = dict(zip(map(id, params), found[len(inside) :], strict=True))
        grads: list[Tensor | None] = []
        for _, _, edge in slots:
            key = (edge.node, edge.output_nr)
            grad = by_edge.get(key) if cut.is_shared(edge) else cut.captured.get(key)
            if grad is not None and layout.per_sample and layout.T == 1:
                grad = grad[0]
            grads.append(grad)
        terms = {}
        for call in direct:
            reached = [(p, by_param[id(p)]) for p in call.params if p is not None]
            reached = [(p, g) for p, g in reached if g is not None]
            if reached:
                values = [g.reshape(m, -1).to(layout.dtype) for _, g in reached]
                terms[id(call)] = [DenseTerm([p for p, _ in reached], values)]
        return grads, terms, cut.own

    def backward(
        self,
        weights: Tensor,
        *,
        params: Iterable[Tensor] | None = None,
    ) -> None:
        r"""Add $\sum_k w_k \nabla L_k$ into ``.grad``, for the losses of the last `gramian`.

        Like autograd, a ``.grad`` that exists is added to and a missing one is created;
        parameters that no loss reaches keep ``.grad is None``. Parameters of hooked modules get
        it from the recorded quantities; any other leaf the losses reach, from one weighted
        backward pass.

        Args:
            weights: One weight per loss, shape ``[m]``.
            params: Only write into these tensors (for example an optimizer's parameters);
                ``None`` for every leaf the losses reach.

        Raises:
            RuntimeError: If `gramian` was not called since the last `backward`.
            ValueError: If ``weights`` does not hold one entry per loss.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError("Call gramian(losses) before backward(weights).")
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a tensor, got {type(weights).__name__}.")
        if weights.ndim != 1 or weights.shape[0] != pending.m:
            raise ValueError(
                f"weights must have shape ({pending.m},), one per loss, got {tuple(weights.shape)}."
            )
        w = weights.to(dtype=pending.dtype, device=pending.losses.device)
        # Exact weights can leave the losses' dtype where some gradients are tiny (a weight
        # near 1e38 on a gradient near 1e-39 contributes O(1) to the update): the recorded
        # factors then take the weights in float64, and the other leaves' backward pass takes
        # them divided by a power of two, its result multiplied back.
        wide = weights.dtype == torch.float64 and not bool(torch.isfinite(w).all())
        if wide:
            w = weights.to(device=pending.losses.device)
        allowed = None if params is None else {id(p) for p in params}
        leaves = [leaf for leaf in pending.leaves if allowed is None or id(leaf) in allowed]
        leaf_grads: Sequence[Tensor | None] = ()
        if leaves:
            losses = pending.losses
            outputs, unscale = w, 1.0
            if wide:
                exponent = math.frexp(float(w.abs().max()))[1] - 100
                unscale = 2.0**exponent
                outputs = (w / unscale).to(pending.dtype)
            leaf_grads = torch.autograd.grad(
                losses,
                leaves,
                outputs.view(losses.shape),
                retain_graph=pending.retain_graph,
                allow_unused=True,
            )
            if wide:
                leaf_grads = [g if g is None else g.double() * unscale for g in leaf_grads]
        write = _writer(allowed)
        with torch.no_grad():
            for term in pending.terms:
                (term.widened(torch.float64) if wide else term).accumulate(w, write)
            for leaf, grad in zip(leaves, leaf_grads, strict=True):
                if grad is not None:
                    write(leaf, grad)
        self._pending = None

    def reset(self) -> None:
        """Forget the pending Gramian's intermediate results (they are also dropped by
        `backward` and by the next `gramian`)."""
        self._pending = None


def _add_gramian(term: Term, G: Tensor, gather: Gather | None, magnitudes: list[Tensor]) -> None:
    """Add ``term``'s Gramian (of every rank's objectives, with ``gather``) into ``G``, in
    ``G``'s dtype, and append the magnitudes of its factors to ``magnitudes``."""
    gathered = term if gather is None else term.gathered(gather)
    magnitudes.append(gathered.magnitudes())
    (gathered if gathered.dtype == G.dtype else gathered.widened(G.dtype)).add_gramian(G)


def _writer(allowed: set[int] | None) -> Callable[[Tensor, Tensor], None]:
    def write(param: Tensor, grad: Tensor) -> None:
        if (allowed is not None and id(param) not in allowed) or not param.requires_grad:
            return
        if grad.dtype != param.dtype:
            grad = grad.to(param.dtype)
        if param.grad is None:
            param.grad = grad if grad.is_contiguous() else grad.contiguous()
        else:
            param.grad.add_(grad)

    return write


def _make_hook(ref: weakref.ref, handler: Handler) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        engine = ref()
        if engine is None or not engine._recording:
            return
        handler.check()
        if torch.is_grad_enabled():
            engine._record(handler, args, kwargs, output)

    return hook


def gramian_backward(
    losses: Tensor,
    engine: GramianEngine,
    weighting: Callable[[Tensor], Tensor],
    *,
    params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    batched: bool | None = None,
) -> Tensor:
    r"""Jacobian descent's backward pass in gramian mode: Gramian, weights, weighted gradient.

    Computes $G$ with ``engine.gramian(losses)``, the weights $w$ = ``weighting(G)``, and adds
    $\sum_k w_k \nabla L_k$ into ``.grad`` with ``engine.backward(w)``.

    Args:
        losses: The losses, as in `GramianEngine.gramian`.
        engine: A `GramianEngine` hooked on the model before the forward pass.
        weighting: Maps the ``[m, m]`` Gramian to ``m`` weights, for example
            ``jdoptim.UPGradWeighting()`` or ``jdoptim.UPGrad().weighting``.
        params: As in `GramianEngine.backward`.
        retain_graph: As in `GramianEngine.gramian`.
        batched: As in `GramianEngine.gramian`.

    Returns:
        The weights.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from jdoptim import UPGrad
        >>> from jdoptim.gramian import GramianEngine, gramian_backward
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 1)
        >>> with GramianEngine(model) as engine:
        ...     losses = (model(torch.randn(4, 3)) ** 2).squeeze(1)
        ...     weights = gramian_backward(losses, engine, UPGrad().weighting)
        >>> weights.shape, model.weight.grad.shape
        (torch.Size([4]), torch.Size([1, 3]))
    """
    G = engine.gramian(losses, batched=batched, retain_graph=retain_graph)
    weights = weighting(G)
    engine.backward(weights, params=params)
    return weights
