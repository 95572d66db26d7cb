"""`JDOptimizer`: Jacobian descent inside any ``torch.optim`` optimizer.

A loss vector goes through :meth:`JDOptimizer.backward`: its Jacobian with respect to the
parameters (``jdoptim.functional.jacobian``), then the aggregator (``jdoptim.aggregation``, whose
numerical kernels live in ``jdoptim.linalg``), then the update is added into ``.grad``;
:meth:`JDOptimizer.step` then lets the inner optimizer step.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from jdoptim.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator
from jdoptim.diagnostics import StepDiagnostics, diagnose, diagnose_gramian
from jdoptim.distributed import default_process_group, disable_ddp_sync, synchronise
from jdoptim.functional import (
    accumulate_grads,
    as_loss_vector,
    jacobian,
    split_update,
    stack_jacobians,
)
from jdoptim.gramian import GramianEngine, is_supported
from jdoptim.registry import build, to_config
from jdoptim.scalarization import Scalarizer

Mode = Literal["jacobian", "gramian", "auto"]
NonFinite = Literal["raise", "skip"]
Accumulation = Literal["sum", "concat"]
MODES: tuple[str, ...] = ("jacobian", "gramian", "auto")
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip")
ACCUMULATIONS: tuple[str, ...] = ("sum", "concat")
LossesT = Tensor | Sequence[Tensor]
DiagnosticsHook = Callable[["JDOptimizer", StepDiagnostics], None]
_STATE_KEY = "jdoptim"
_CONFIG_OPTIONS = ("mode", "batch_dim", "chunk_size", "nonfinite", "accumulation", "diagnostics")


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one synchronisation.

    A sum is non-finite whenever a term is, so one pass of additions decides the common case;
    only a non-finite sum (which finite terms can also give, by overflow) is checked entry by
    entry.
    """
    if not tensors:
        return True
    sums = torch.stack([t.sum() for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _not_connected(params: list[Tensor]) -> ValueError:
    return ValueError(
        f"None of the {len(params)} parameters of the optimizer receives a gradient from the "
        "losses; are they computed from this model?"
    )


def _non_finite(vector: Tensor, otherwise: str) -> str:
    """Name the non-finite losses, or else ``otherwise`` (what was found not finite)."""
    bad = (~torch.isfinite(vector)).nonzero().flatten().tolist()
    return f"losses at indices {bad} are not finite" if bad else f"{otherwise} is not finite"


class NonFiniteError(ValueError):
    """Raised when a step meets non-finite losses, Jacobian or update under
    ``nonfinite="raise"``."""


@dataclass
class _Contribution:
    """What one backward pass contributes: the rows of the shared parameters' Jacobian, and the
    ordinary gradient (of the sum of the losses) of every other parameter."""

    shared: list[Tensor]
    matrix: Tensor | None
    own: dict[Tensor, Tensor] = field(default_factory=dict)
    finite: bool = True


class JDOptimizer(Optimizer):
    """Jacobian descent with any ``torch.optim`` optimizer.

    ``backward(losses)`` computes the Jacobian of a vector of losses with respect to the
    parameters of the inner optimizer, maps it to one update with ``aggregator`` and adds the
    update into the parameters' ``.grad``; ``step(losses)`` does that and then lets the inner
    optimizer step. The wrapper *is* an optimizer: it shares ``param_groups``, ``state`` and
    ``defaults`` with the inner one, so LR schedulers, ``GradScaler`` and checkpoint tools
    accept it.

    Args:
        optimizer: The inner optimizer, which owns the parameters and takes the steps.
        aggregator: Maps the Jacobian ``[m, n]`` to an update ``[n]``. A loss `Scalarizer`
            (from `jdoptim.scalarization`) is accepted too: the optimizer then does one ordinary
            backward pass of the scalarised loss, with no Jacobian.
        mode: How the update is obtained. ``"jacobian"``: the Jacobian from one batched
            vector-Jacobian product over all losses, then the aggregator. ``"gramian"``: the
            ``m × m`` Gramian from one backward pass through ``modules`` without the Jacobian
            (see `jdoptim.gramian.GramianEngine`), the aggregator's weighting, then the weighted
            gradient; it needs a Gramian-based aggregator (such as `UPGrad`) and ``modules``,
            and is much cheaper for one loss per sample. ``"auto"``: ``"gramian"`` when the
            aggregator is Gramian-based, ``modules`` are given, every layer in them has a closed
            form, ``shared_params`` is not used, and there is no data parallelism (or
            ``local_weighting=True``); else ``"jacobian"``. The mode chosen is `resolved_mode`.
        shared_params: For multi-task learning: the parameters (or a module holding them)
            whose Jacobian is aggregated. Every other parameter receives the ordinary gradient
            of the sum of the losses that reach it (a task head gets its own task's gradient).
            ``None`` aggregates over all parameters.
        chunk_size: Losses per batched backward pass (bounds memory); ``None`` for all at
            once, ``1`` for one backward pass per loss (no vmap).
        nonfinite: What to do with non-finite losses, Jacobian or update: ``"raise"`` a
            `NonFiniteError`, or ``"skip"`` the step with a warning, leaving everything
            unchanged.
        scaler: The ``torch.amp.GradScaler`` that scales the losses, if any. The aggregator then
            sees the unscaled Jacobian, and a non-finite Jacobian (an overflow) is written into
            ``.grad`` as infinities so that ``scaler.step`` skips the step, as in plain AMP.
        accumulation: How the Jacobians of several ``backward(losses, aggregate=False)`` calls
            combine before the one aggregation: ``"sum"`` (the same objectives on several
            micro-batches: with losses divided by the number of micro-batches, as usual, this
            equals one step on the whole batch) or ``"concat"`` (different objectives, such as
            one loss per sample: the rows are stacked).
        diagnostics: Compute `StepDiagnostics` at each aggregation (an extra ``m × m`` Gramian),
            available as ``last_diagnostics`` and passed to hooks added with
            `register_diagnostics_hook`.
        modules: The model (or modules) the losses come from. In gramian mode, the modules
            whose parameters define the Gramian (a subset gives partial Jacobian descent: every
            parameter is still updated); build the optimizer before the forward pass, which
            they record. A ``DistributedDataParallel`` model among them has its own gradient
            synchronisation turned off, since the optimizer reduces the Jacobian itself.
        batch_dim: Gramian mode: the batch dimension of the modules' inputs and outputs, or
            ``None`` when losses never decompose per sample.
        process_group: Under data parallelism, the ranks that step together; ``None`` uses the
            default group once ``torch.distributed`` is initialised with several ranks. Each
            aggregation then reduces the Jacobian across ranks (averaged with
            ``accumulation="sum"``, rows stacked in rank order with ``"concat"``) so that every
            rank applies the same update, equal to one process stepping on the global batch.
        local_weighting: Gramian mode under data parallelism, where the global Gramian is not
            available: each rank weights its own losses from its local Gramian, and the
            weighted gradients are averaged across ranks, as ``DistributedDataParallel``
            averages gradients. Every rank applies the same update, but it is not Jacobian
            descent on the global batch: conflicts between samples of different ranks are not
            seen (with `Mean` the two coincide). Without it, gramian mode refuses to run under
            data parallelism.

    Attributes:
        last_diagnostics: The `StepDiagnostics` of the latest aggregation, or ``None``.

    Examples:
        >>> import torch
        >>> from torch.optim import SGD
        >>> from jdoptim import JDOptimizer, UPGrad
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad())
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> losses = ((model(x) - y) ** 2).mean(dim=0)  # one loss per output
        >>> opt.zero_grad()
        >>> opt.step(losses)
        >>> new_losses = ((model(x) - y) ** 2).mean(dim=0)
        >>> bool((new_losses < losses).all())
        True
    """

    def __init__(
        self,
        optimizer: Optimizer,
        aggregator: Aggregator | Scalarizer,
        *,
        mode: Mode = "jacobian",
        shared_params: Iterable[Tensor] | nn.Module | None = None,
        chunk_size: int | None = None,
        nonfinite: NonFinite = "raise",
        scaler: torch.amp.GradScaler | None = None,
        accumulation: Accumulation = "sum",
        diagnostics: bool = False,
        modules: nn.Module | Sequence[nn.Module] | None = None,
        batch_dim: int | None = 0,
        process_group: ProcessGroup | None = None,
        local_weighting: bool = False,
    ) -> None:
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, JDOptimizer):
            raise TypeError(
                "Expected a torch.optim.Optimizer to wrap (not a JDOptimizer), got "
                f"{optimizer!r} of type {type(optimizer).__name__}."
            )
        if not isinstance(aggregator, (Aggregator, Scalarizer)):
            raise TypeError(
                "Expected a jdoptim Aggregator (e.g. jdoptim.UPGrad()) or Scalarizer, got "
                f"{aggregator!r} of type {type(aggregator).__name__}."
            )
        if mode not in MODES:
            raise ValueError(f"Invalid mode value: {mode!r}; valid modes: {MODES}.")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"Invalid chunk_size value: {chunk_size!r}; expected an integer >= 1.")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Invalid nonfinite value: {nonfinite!r}; valid policies: {NONFINITE_POLICIES}."
            )
        if accumulation not in ACCUMULATIONS:
            raise ValueError(
                f"Invalid accumulation value: {accumulation!r}; valid values: {ACCUMULATIONS}."
            )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"Expected a torch.amp.GradScaler as scaler, got {scaler!r}.")
        self.optimizer = optimizer
        self.aggregator = aggregator
        self.mode = mode
        self.shared_params = self._check_shared(shared_params)
        self.chunk_size = chunk_size
        self.nonfinite = nonfinite
        self.scaler = scaler
        self.accumulation = accumulation
        self.diagnostics = diagnostics
        self.modules = self._check_modules(modules)
        self.batch_dim = batch_dim
        self.process_group = process_group
        self.local_weighting = local_weighting
        self._engine = self._make_engine()
        self.last_diagnostics: StepDiagnostics | None = None
        self._diagnostics_hooks: OrderedDict[int, DiagnosticsHook] = OrderedDict()
        # None until the first batched backward pass tells whether vmap runs on this graph.
        self._batched: bool | None = None if chunk_size != 1 else False
        self._pending: list[_Contribution] = []
        self._skip_next_step = False
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()

    @staticmethod
    def _check_modules(modules: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
        listed = [] if modules is None else [modules] if isinstance(modules, nn.Module) else modules
        listed = list(listed)
        for module in listed:
            if not isinstance(module, nn.Module):
                raise TypeError(f"modules must hold nn.Module objects, got {module!r}.")
            disable_ddp_sync(module)
        return listed

    def _make_engine(self) -> GramianEngine | None:
        gramian_based = isinstance(self.aggregator, GramianWeightedAggregator)
        if self.mode == "gramian":
            if not gramian_based:
                raise ValueError(
                    f"mode='gramian' needs a Gramian-based aggregator (such as UPGrad), but "
                    f"{self.aggregator!r} needs the Jacobian; use mode='jacobian'."
                )
            if not self.modules:
                raise ValueError("mode='gramian' needs the model: pass modules=model.")
            if self.shared_params is not None:
                raise ValueError(
                    "mode='gramian' updates every parameter with the weighted gradient, so it "
                    "cannot give task heads their own gradients: drop shared_params, or use "
                    "mode='jacobian'."
                )
            return GramianEngine(self.modules, batch_dim=self.batch_dim)
        if (
            self.mode == "auto"
            and gramian_based
            and self.modules
            and self.shared_params is None
            and (
                self.local_weighting or (default_process_group() is None and not self.process_group)
            )
            and is_supported(self.modules, batch_dim=self.batch_dim)
        ):
            return GramianEngine(self.modules, batch_dim=self.batch_dim)
        return None

    @property
    def resolved_mode(self) -> Literal["jacobian", "gramian"]:
        """The mode in use: ``"gramian"`` or ``"jacobian"`` (what ``"auto"`` chose)."""
        return "jacobian" if self._engine is None else "gramian"

    def _check_shared(self, shared: Iterable[Tensor] | nn.Module | None) -> list[Tensor] | None:
        if shared is None:
            return None
        if isinstance(shared, Tensor):
            raise TypeError("shared_params must be an iterable of parameters or a module.")
        params = list(shared.parameters() if isinstance(shared, nn.Module) else shared)
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"shared_params must hold tensors, got {type(p).__name__}.")
            if id(p) not in owned:
                raise ValueError(
                    f"A shared parameter of shape {tuple(p.shape)} is not optimised by the inner "
                    "optimizer; pass the same parameters to both."
                )
        return params

    @classmethod
    def from_config(
        cls, optimizer: Optimizer, config: Mapping[str, Any], **objects: Any
    ) -> JDOptimizer:
        """Build a `JDOptimizer` from a dictionary.

        Args:
            optimizer: The inner optimizer.
            config: ``{"aggregator": <aggregator config>, **options}``, where the aggregator
                config is a registry name or ``{"name": ..., **arguments}``, and the options
                are ``mode``, ``batch_dim``, ``chunk_size``, ``nonfinite``, ``accumulation``
                and ``diagnostics``.
            **objects: The arguments that are objects rather than configuration:
                ``modules``, ``shared_params``, ``scaler``, ``process_group``.

        Examples:
            >>> import torch
            >>> from jdoptim import JDOptimizer
            >>> sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
            >>> JDOptimizer.from_config(sgd, {"aggregator": {"name": "mgda"}, "mode": "auto"})
            ... # doctest: +ELLIPSIS
            JDOptimizer(
              optimizer=SGD (...),
              aggregator=MGDA(solver='active_set', epsilon=0.001, max_iters=100),
              mode='auto', chunk_size=None, nonfinite='raise'
            )
        """
        valid = ("aggregator", *_CONFIG_OPTIONS)
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}.")
        unknown = [key for key in config if key not in valid]
        if unknown:
            raise ValueError(f"Unknown JDOptimizer config keys {unknown}; valid keys: {valid}.")
        if "aggregator" not in config:
            raise ValueError("A JDOptimizer config needs an 'aggregator' key.")
        options = {key: value for key, value in config.items() if key != "aggregator"}
        objects_allowed = ("modules", "shared_params", "scaler", "process_group")
        unknown = [key for key in objects if key not in objects_allowed]
        if unknown:
            raise TypeError(f"Unknown arguments {unknown}; valid ones: {objects_allowed}.")
        aggregator = build(config["aggregator"])
        if not isinstance(aggregator, (Aggregator, Scalarizer)):
            raise TypeError(
                f"config['aggregator'] built {aggregator!r}, which is not an Aggregator; wrap a "
                "weighting in jdoptim.GramianWeightedAggregator or name an aggregator."
            )
        return cls(optimizer, aggregator, **options, **objects)

    def to_config(self) -> dict[str, Any]:
        """Return the configuration that `from_config` turns back into this wrapper (the
        parameters, the scaler and shared parameters are not part of it)."""
        config = {"aggregator": to_config(self.aggregator)}
        config.update({key: getattr(self, key) for key in _CONFIG_OPTIONS})
        return config

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def register_diagnostics_hook(self, hook: DiagnosticsHook) -> RemovableHandle:
        """Call ``hook(optimizer, diagnostics)`` after each aggregation.

        Turns ``diagnostics`` on. Returns a handle whose ``remove()`` unregisters the hook.
        """
        self.diagnostics = True
        handle = RemovableHandle(self._diagnostics_hooks)
        self._diagnostics_hooks[handle.id] = hook
        return handle

    def _parameters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _jacobians(self, vector: Tensor, params: list[Tensor], retain_graph: bool) -> list:
        if self._batched is None:
            try:
                # The graph is kept in case vmap fails midway and the losses must be replayed.
                jacobians = jacobian(vector, params, chunk_size=self.chunk_size, retain_graph=True)
            except RuntimeError as error:
                warnings.warn(
                    f"The batched backward pass failed ({error}); computing one backward pass "
                    "per loss from now on. Pass chunk_size=1 to choose this explicitly.",
                    stacklevel=4,
                )
                self._batched = False
            else:
                self._batched = True
                return jacobians
        return jacobian(
            vector,
            params,
            chunk_size=self.chunk_size,
            retain_graph=retain_graph,
            batched=self._batched,
        )

    def _refuse(self, reason: str) -> None:
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"{reason}. Nothing was changed. Pass nonfinite='skip' to skip such steps."
            )
        warnings.warn(f"Skipping the step: {reason}.", stacklevel=3)
        self._pending = []
        self._skip_next_step = True

    def _loss_vector(self, losses: LossesT) -> Tensor:
        vector = as_loss_vector(losses)
        if not vector.requires_grad:
            raise ValueError(
                "The losses do not require grad, so they are not connected to any parameter; "
                "compute them from the model's outputs with grad enabled."
            )
        return vector

    def _signal_overflow(self) -> None:
        """Fill every gradient with infinities, so that the ``GradScaler`` skips the step."""
        for p in self._parameters():
            p.grad = torch.full_like(p, float("inf"))

    def _group(self) -> ProcessGroup | None:
        return self.process_group if self.process_group is not None else default_process_group()

    def _scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def _contribution(self, losses: LossesT, retain_graph: bool) -> _Contribution:
        vector = self._loss_vector(losses)
        params = self._parameters()
        if isinstance(self.aggregator, Scalarizer):
            return self._scalarized_contribution(vector, params, retain_graph)
        jacobians = self._jacobians(vector, params, retain_graph)
        reached = [(p, jac) for p, jac in zip(params, jacobians, strict=True) if jac is not None]
        if not reached:
            raise _not_connected(params)
        shared_ids = None if self.shared_params is None else {id(p) for p in self.shared_params}
        shared = [(p, j) for p, j in reached if shared_ids is None or id(p) in shared_ids]
        own = {
            p: j.sum(dim=0)
            for p, j in reached
            if shared_ids is not None and id(p) not in shared_ids
        }
        matrix = stack_jacobians([j for _, j in shared]) if shared else None
        finite = _all_finite([vector, *own.values(), *([] if matrix is None else [matrix])])
        if not finite and not self._scaling() and self._group() is None:
            self._refuse(_non_finite(vector, "the Jacobian"))
        return _Contribution([p for p, _ in shared], matrix, own, finite)

    def _scalarized_contribution(
        self, vector: Tensor, params: list[Tensor], retain_graph: bool
    ) -> _Contribution:
        local = self._group() is None
        if not bool(torch.isfinite(vector).all()):
            # Checked before the scalarizer runs, so that a refused step records no state in it.
            if not self._scaling() and local:
                self._refuse(_non_finite(vector, "the losses"))
            return _Contribution([], None, {}, finite=False)
        scale = self.scaler.get_scale() if self._scaling() else 1.0
        loss = self.aggregator(vector / scale) * scale if scale != 1.0 else self.aggregator(vector)
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
        own = {p: g for p, g in zip(params, grads, strict=True) if g is not None}
        if not own:
            raise _not_connected(params)
        finite = _all_finite(list(own.values()))
        if not finite and not self._scaling() and local:
            self._refuse("the gradient of the scalarised loss is not finite")
        return _Contribution([], None, own, finite)

    def backward(
        self, losses: LossesT, *, aggregate: bool = True, retain_graph: bool = False
    ) -> None:
        """Add the aggregated update of ``losses`` into the parameters' ``.grad``.

        Parameters that no loss reaches keep their ``.grad`` (``None`` stays ``None``).
        If anything fails, no ``.grad`` is changed.

        Args:
            losses: A tensor of losses of any shape with at least one dimension (flattened to
                ``m`` objectives), or a sequence of scalar tensors.
            aggregate: ``False`` keeps this Jacobian (costing ``m × n`` memory) to be combined,
                following ``accumulation``, with those of later calls; the next call with
                ``aggregate=True``, or `step`, aggregates them all at once.
            retain_graph: Keep the autograd graph for another backward pass.

        Raises:
            ValueError: If the losses are empty, 0-d, or not connected to any parameter.
            NonFiniteError: If losses, Jacobian or update are not finite and
                ``nonfinite="raise"``.
        """
        if self._engine is not None:
            return self._gramian_backward(losses, aggregate, retain_graph)
        contribution = self._contribution(losses, retain_graph)
        if self._skip_next_step:
            return
        self._pending.append(contribution)
        if aggregate:
            self._aggregate_pending()

    def _gramian_backward(self, losses: LossesT, aggregate: bool, retain_graph: bool) -> None:
        engine = self._engine
        assert engine is not None
        if not aggregate:
            raise ValueError(
                "Gramian mode aggregates every backward pass; accumulate micro-batches with "
                "mode='jacobian'."
            )
        group = self._group()
        if group is not None and not self.local_weighting:
            raise ValueError(
                "Gramian mode cannot build the global Gramian across ranks: use mode='jacobian' "
                "for exact Jacobian descent under data parallelism, or local_weighting=True."
            )
        vector = self._loss_vector(losses)
        if self._skip_next_step:
            engine.reset()
            return None
        # The engine reads the per-sample structure from the loss tensor's shape.
        tensor = losses if isinstance(losses, Tensor) else vector
        finite = bool(torch.isfinite(vector).all())
        gramian = engine.gramian(tensor, retain_graph=retain_graph) if finite else None
        scale = self.scaler.get_scale() if self._scaling() else 1.0
        if gramian is not None:
            gramian = gramian / scale**2 if scale != 1.0 else gramian
            finite = _all_finite([gramian])
        weights = self.aggregator.weighting(gramian) if finite else None
        if weights is not None and not _all_finite([weights]):
            engine.reset()
            return self._refuse(f"{self.aggregator!r} returned non-finite weights")
        if group is not None:
            return self._local_weighting_backward(weights, gramian, vector, group)
        if weights is None:
            engine.reset()
            if self._scaling():
                return self._signal_overflow()
            return self._refuse(_non_finite(vector, "the Gramian"))
        if self.diagnostics:
            self._report(diagnose_gramian(gramian, weights))
        engine.backward(weights, params=self._parameters())
        return None

    def _local_weighting_backward(
        self, weights: Tensor | None, gramian: Tensor | None, vector: Tensor, group: ProcessGroup
    ) -> None:
        """Weight the local losses, then average the weighted gradients over the ranks."""
        engine = self._engine
        assert engine is not None
        params = self._parameters()
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        if weights is None:
            engine.reset()
        else:
            engine.backward(weights, params=params)
        local = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        reached = torch.tensor([p.grad is not None for p in params], dtype=vector.dtype)
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
        _, (reached, *grads), finite = synchronise(
            None, [reached, *local], weights is not None, False, group
        )
        if not finite:
            if self._scaling():
                return self._signal_overflow()
            return self._refuse("the losses or the Gramian are not finite on some rank")
        if self.diagnostics and gramian is not None and weights is not None:
            self._report(diagnose_gramian(gramian, weights))
        kept = [(p, g) for p, g, r in zip(params, grads, reached.tolist(), strict=True) if r > 0]
        accumulate_grads([p for p, _ in kept], [g for _, g in kept])
        return None

    def _combine(self, pending: list[_Contribution]) -> _Contribution:
        first = pending[0]
        if len(pending) == 1:
            return first
        own: dict[Tensor, Tensor] = {}
        for contribution in pending:
            if [id(p) for p in contribution.shared] != [id(p) for p in first.shared]:
                raise ValueError(
                    "The accumulated losses reach different shared parameters; accumulate "
                    "micro-batches of the same model and objectives."
                )
            for p, g in contribution.own.items():
                own[p] = g if p not in own else own[p] + g
        matrices = [c.matrix for c in pending if c.matrix is not None]
        matrix = None
        if matrices and self.accumulation == "concat":
            matrix = torch.cat(matrices)
        elif matrices:
            shapes = {tuple(mat.shape) for mat in matrices}
            if len(shapes) > 1:
                raise ValueError(
                    f"accumulation='sum' adds Jacobians of the same objectives, got shapes "
                    f"{sorted(shapes)}; use accumulation='concat' for different objectives."
                )
            matrix = torch.stack(matrices).sum(dim=0)
        finite = all(c.finite for c in pending)
        return _Contribution(first.shared, matrix, own, finite)

    def _aggregate_pending(self) -> None:
        combined = self._combine(self._pending)
        group = self._group()
        if group is not None:
            matrix, others, finite = synchronise(
                combined.matrix,
                list(combined.own.values()),
                combined.finite,
                self.accumulation == "concat",
                group,
            )
            own = dict(zip(combined.own, others, strict=True))
            combined = _Contribution(combined.shared, matrix, own, finite)
            if not finite and not self._scaling():
                return self._refuse("the losses or the Jacobian are not finite on some rank")
        if not combined.finite:  # only reached with a GradScaler
            self._pending = []
            return self._signal_overflow()
        updates: list[Tensor] = []
        if combined.matrix is not None:
            scale = self.scaler.get_scale() if self._scaling() else 1.0
            matrix = combined.matrix if scale == 1.0 else combined.matrix / scale
            weights: list[Tensor] = []
            handle = None
            if self.diagnostics and isinstance(self.aggregator, WeightedAggregator):
                handle = self.aggregator.weighting.register_forward_hook(
                    lambda module, args, output: weights.append(output)
                )
            try:
                update = self.aggregator(matrix)
            finally:
                if handle is not None:
                    handle.remove()
            if not _all_finite([update]):
                return self._refuse(f"{self.aggregator!r} returned a non-finite update")
            if self.diagnostics:
                self._report(diagnose(matrix, update, weights[-1] if weights else None))
            updates = split_update(update * scale if scale != 1.0 else update, combined.shared)
        self._pending = []
        accumulate_grads([*combined.shared, *combined.own], [*updates, *combined.own.values()])

    def _report(self, diagnostics: StepDiagnostics) -> None:
        self.last_diagnostics = diagnostics
        for hook in list(self._diagnostics_hooks.values()):
            hook(self, diagnostics)

    def step(  # type: ignore[override]
        self,
        losses: LossesT | None = None,
        closure: Callable[[], LossesT] | None = None,
    ) -> Tensor | None:
        """Run `backward` on ``losses`` (if given), then let the inner optimizer step.

        ``step()`` with no arguments only steps, using the ``.grad`` already there (as
        ``GradScaler.step`` does). A step whose `backward` was skipped for non-finite values
        does not step.

        Args:
            losses: The losses, as in `backward`.
            closure: For optimizers that re-evaluate the losses (such as LBFGS): a function
                that clears the gradients, recomputes and returns the losses. The inner
                optimizer sees the sum of the losses as the loss value. Non-finite values
                always raise here. A closure that returns ``None`` (as Lightning's manual
                optimisation passes) only lets the inner optimizer step.

        Returns:
            What the inner optimizer's ``step`` returns.
        """
        if closure is not None:
            if losses is not None:
                raise ValueError("Pass either losses or a closure to step(), not both.")

            def jd_closure() -> Tensor | None:
                with torch.enable_grad():
                    value = closure()
                    if value is None:
                        return None  # a closure that only steps, as Lightning passes
                    vector = as_loss_vector(value)
                    policy, self.nonfinite = self.nonfinite, "raise"
                    try:
                        self.backward(vector)
                    finally:
                        self.nonfinite = policy
                return vector.detach().sum()

            return self.optimizer.step(jd_closure)
        if losses is not None:
            self.backward(losses)
        elif self._pending:
            self._aggregate_pending()
        if self._skip_next_step:
            self._skip_next_step = False
            return None
        return self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, as the inner optimizer does, and forget accumulated Jacobians
        and a pending skip."""
        self._pending = []
        self._skip_next_step = False
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the inner optimizer."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus the aggregator's config and state under the
        ``"jdoptim"`` key."""
        state = self.optimizer.state_dict()
        state[_STATE_KEY] = {
            "aggregator": self._aggregator_config(),
            "aggregator_state": self.aggregator.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by `state_dict` (or by the inner optimizer alone).

        Raises:
            ValueError: If the state was written with another aggregator configuration.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        current = self._aggregator_config()
        saved = None if extra is None else extra["aggregator"]
        if None not in (saved, current) and saved != current:
            raise ValueError(
                f"This state was saved with the aggregator {saved}, but this "
                f"optimizer uses {current}; build it with "
                "jdoptim.build(state_dict['jdoptim']['aggregator'])."
            )
        self.optimizer.load_state_dict(state_dict)
        if extra is not None:
            self.aggregator.load_state_dict(extra["aggregator_state"])

    def _aggregator_config(self) -> dict[str, Any] | None:
        try:
            return to_config(self.aggregator)
        except (ValueError, TypeError):
            return None  # an unregistered aggregator: its state is still saved

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n  ")
        return (
            f"{type(self).__name__}(\n  optimizer={inner},\n  aggregator={self.aggregator!r},\n"
            f"  mode={self.mode!r}, chunk_size={self.chunk_size!r}, "
            f"nonfinite={self.nonfinite!r}\n)"
        )
