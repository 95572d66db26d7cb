"""`JDOptimizer`: Jacobian descent inside any ``torch.optim`` optimizer.

A loss vector goes through :meth:`JDOptimizer.backward`, which hands it to one path
(``jdoptim._paths``: the Jacobian, the Gramian or a scalarised loss). The path computes, on the
side, what to aggregate and then the update, calling the aggregator (``jdoptim.aggregation``,
whose numerical kernels live in ``jdoptim.linalg``); the optimizer queues, reduces across ranks
and checks, then adds the update into ``.grad``; :meth:`JDOptimizer.step` lets the inner
optimizer step.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from jdoptim._paths import (
    FsdpModel,
    GramianPath,
    JacobianPath,
    Losses,
    MultiTaskGramianPath,
    Path,
    Pieces,
    RepresentationPath,
    ScalarizedPath,
    ShardedGramianPath,
    ShardedJacobianPath,
    ShardedMultiTaskGramianPath,
    ShardedScalarizedPath,
    Update,
    check_combinable,
    combine,
    shared_modules,
)
from jdoptim._paths.representation import check_method as check_representation_method
from jdoptim._state import GlobalGenerators, MethodState, check_method_state, check_optimizer_state
from jdoptim.aggregation import Aggregator, Columns, GramianWeightedAggregator
from jdoptim.aggregation._columns import layer_names
from jdoptim.diagnostics import StepDiagnostics
from jdoptim.distributed import (
    Sharding,
    default_process_group,
    disable_ddp_sync,
    sharding_of,
    synchronise,
)
from jdoptim.functional import as_loss_vector, check_chunk_size
from jdoptim.gramian import GramianEngine, is_supported
from jdoptim.gramian._engine import _check_batch_dim
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
_CONFIG_OPTIONS = (
    "mode",
    "batch_dim",
    "chunk_size",
    "nonfinite",
    "accumulation",
    "diagnostics",
    "rep_grad",
)


class NonFiniteError(ValueError):
    """Raised when a step meets non-finite losses, Jacobian or update under
    ``nonfinite="raise"``."""


@dataclass
class _Call:
    """What one call may change besides ``.grad`` and the queue, as it was when it began."""

    state: MethodState | None
    generators: GlobalGenerators
    diagnostics: StepDiagnostics | None


def _check_flag(value: bool, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name} value: {value!r}; expected True or False.")
    return value


def _ids(params: Sequence[Tensor] | None) -> list[int] | None:
    return None if params is None else [id(p) for p in params]


def _added(param: Tensor, grad: Tensor) -> Tensor:
    """``param.grad + grad`` (``grad`` if there is no ``.grad``), in ``param``'s dtype."""
    grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)
    return grad if param.grad is None else param.grad + grad


def _write_grads(grads: Mapping[Tensor, Tensor]) -> None:
    """Set each parameter's ``.grad``, all or none: if a write fails (an interrupt included),
    the ones already made are undone."""
    previous = [(p, p.grad) for p in grads]
    try:
        for p, grad in grads.items():
            p.grad = grad
    except BaseException:
        for p, grad in previous:
            p.grad = grad
        raise


class JDOptimizer(Optimizer):
    """Jacobian descent with any ``torch.optim`` optimizer.

    ``backward(losses)`` computes the Jacobian of a vector of losses with respect to the
    parameters of the inner optimizer, maps it to one update with ``aggregator`` and adds the
    update into the parameters' ``.grad``; ``step(losses)`` does that and then lets the inner
    optimizer step. The wrapper *is* an optimizer: it shares ``param_groups``, ``state`` and
    ``defaults`` with the inner one, so LR schedulers, ``GradScaler`` and checkpoint tools
    accept it.

    A step either happens or changes nothing. Its **commit point** is the moment the update is
    accepted (finite, or a ``GradScaler`` overflow to signal). Everything before it happens on
    the side: the Jacobian or Gramian, the aggregator's (or scalarizer's) call, the diagnostics
    and their hooks, the non-finite checks, and the new state of stateful methods, which they
    compute in place but which is put back unless the step commits. At the commit point
    ``.grad`` is written (all parameters or none), the queue of accumulated Jacobians is
    emptied and the methods' new state is kept; then `step` lets the inner optimizer step.

    - Any exception before the commit point (``KeyboardInterrupt`` included, in the model's
      backward pass, the method, a hook or while ``.grad`` is written), and a refused step
      under ``nonfinite="raise"``, leave the parameters, ``.grad``, the inner optimizer's
      state, the queued Jacobians, every method's state (with the random generators it owns)
      and torch's global random generators as they were before the call. An interrupted
      backward pass may have freed the losses' autograd graph: compute them again.
    - A skipped step (``nonfinite="skip"``) or an overflow drops the queued Jacobians and puts
      every method's state back as it was when the step began (torch's global generators as
      before the call that skipped it, since the training loop may have drawn from them
      since).
    - After the commit point, the inner optimizer's ``step`` is its own: if it raises,
      ``.grad`` holds the update and the methods' state has advanced, and the parameters and
      the inner optimizer's state are wherever it left them (torch's optimizers check their
      inputs before changing anything). Call ``step()`` to retry with the same ``.grad``, or
      ``zero_grad()`` to drop it. With a closure, each evaluation is one transaction inside
      the inner optimizer's step; an evaluation that fails after the inner optimizer moved the
      parameters (a line search) leaves them moved, as with any closure.
    - `load_state_dict` checks everything before it changes anything, and loads both states or
      neither.

    Args:
        optimizer: The inner optimizer, which owns the parameters and takes the steps.
        aggregator: Maps the Jacobian ``[m, n]`` to an update ``[n]``. A loss `Scalarizer`
            (from `jdoptim.scalarization`) is accepted too: the optimizer then does one ordinary
            backward pass of the scalarised loss, with no Jacobian.
        mode: How the update is obtained. ``"jacobian"``: the Jacobian from one batched
            vector-Jacobian product over all losses, then the aggregator. ``"gramian"``: the
            ``m × m`` Gramian from one backward pass through ``modules`` without the Jacobian
            (see `jdoptim.gramian.GramianEngine`), the aggregator's weighting, then the weighted
            gradient; it needs a Gramian-based aggregator (such as `UPGrad`) and the model
            (``modules``, or ``shared_params`` given as a module), and is much cheaper for one
            loss per sample or for many tasks. ``"auto"``: ``"gramian"`` when the aggregator is
            Gramian-based, the model is given, every layer holding aggregated parameters has a
            closed form (with ``shared_params``: the modules hold every shared parameter), and
            there is no data parallelism (or ``local_weighting=True``, or the model is sharded);
            else ``"jacobian"``. The mode chosen is `resolved_mode`. On a model sharded with
            ``fully_shard`` (FSDP2), every rank applies its shard of the step of one process on
            the whole model, in either mode and with or without ``shared_params``: see the
            guide "Sharded models (FSDP2)".
        shared_params: For multi-task learning: the parameters (or a module holding them)
            whose Jacobian is aggregated. Every other parameter receives the ordinary gradient
            of the sum of the losses that reach it (a task head gets its own task's gradient).
            The part of the graph outside the shared parameters (the heads) is differentiated
            once; only the shared part is batched over the losses. In gramian mode the Gramian
            is that of the shared parameters in ``modules`` (by default, the shared module), and
            they receive the weighted gradient. Hooks on tensors (``Tensor.register_hook``) and
            modules (full backward hooks) run as in ordinary backward passes, except hooks
            registered on the autograd node of an operation that reads the shared part from a
            head (``output.grad_fn.register_hook`` or ``register_prehook`` on a head's first
            layer's output): that node's backward function is called directly, without them,
            unless the losses are stacked scalars each of which reaches its own heads.
            ``None`` aggregates over all parameters.
        chunk_size: Jacobian mode: losses per batched backward pass; ``1`` for one backward
            pass per loss (no vmap). ``None`` (default): as many losses per pass as fit in
            ``2**23`` entries of the Jacobian (32 MiB in float32), at least one and at most all:
            ``min(m, max(1, 2**23 // n))`` for ``m`` losses and ``n`` aggregated parameters.
            A pass then holds at most that many entries besides the Jacobian, and its
            vectorised weight gradients stay small enough to run fast on CPUs.
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
            synchronisation turned off, since the optimizer reduces the Jacobian itself. A model
            sharded with ``fully_shard`` has its FSDP state reset if a backward pass fails.
        batch_dim: Gramian mode: the batch dimension of the modules' inputs and outputs, or
            ``None`` when losses never decompose per sample.
        process_group: Under data parallelism, the ranks that step together; ``None`` uses the
            default group once ``torch.distributed`` is initialised with several ranks. Each
            aggregation then reduces the Jacobian across ranks (averaged with
            ``accumulation="sum"``, rows stacked in rank order with ``"concat"``) so that every
            rank applies the same update, equal to one process stepping on the global batch.
            On a sharded model, the ranks are those of the parameters' device mesh instead.
        local_weighting: Gramian mode under data parallelism, where the global Gramian is not
            available: each rank weights its own losses from its local Gramian, and the
            weighted gradients are averaged across ranks, as ``DistributedDataParallel``
            averages gradients. Every rank applies the same update, but it is not Jacobian
            descent on the global batch: conflicts between samples of different ranks are not
            seen (with `Mean` the two coincide). Without it, gramian mode refuses to run under
            data parallelism. It has no effect on a sharded model, whose gramian mode is exact.
        rep_grad: With ``shared_params``: aggregate the Jacobian with respect to the *shared
            representation* (what the task heads read from the shared part, such as the trunk's
            output) instead of the shared parameters, then send the aggregated representation
            gradient through the shared part once (MGDA-UB's approximation, see the multi-task
            guide). The update is that of Jacobian descent with weights computed from the
            representation's Jacobian, which the guarantees of the methods (no conflict, for
            example) cover for the representation, not for the parameters. Not with data
            parallelism or a sharded model; every backward pass is aggregated (no
            ``aggregate=False``).

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
        rep_grad: bool = False,
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
        check_chunk_size(chunk_size)
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
        if process_group is not None and not isinstance(process_group, ProcessGroup):
            raise TypeError(
                f"Invalid process_group value: {process_group!r}; expected a "
                "torch.distributed.ProcessGroup or None."
            )
        _check_flag(diagnostics, "diagnostics")
        _check_flag(local_weighting, "local_weighting")
        _check_flag(rep_grad, "rep_grad")
        _check_batch_dim(batch_dim)
        self.optimizer = optimizer
        self.mode = mode
        self._shared_params = self._check_shared(shared_params)
        self._shared_module = [shared_params] if isinstance(shared_params, nn.Module) else []
        self._layers: dict[int, str] | None = None
        self._chunk_size = chunk_size
        self.nonfinite = nonfinite
        self.scaler = scaler
        self.accumulation = accumulation
        self.diagnostics = diagnostics
        self.modules = self._check_modules(modules)
        self.batch_dim = batch_dim
        self.process_group = process_group
        self.local_weighting = local_weighting
        self.rep_grad = rep_grad
        self._path = self._make_path(aggregator)
        for module in self.modules:
            disable_ddp_sync(module)
        self.last_diagnostics: StepDiagnostics | None = None
        self._diagnostics_hooks: OrderedDict[int, DiagnosticsHook] = OrderedDict()
        self._pending: list[Pieces] = []
        # The method's state when the queued pieces' step began, for a path whose pieces
        # already run it (None otherwise, and once the step is committed or dropped).
        self._step_state: MethodState | None = None
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
        return listed

    def _make_path(self, aggregator: Aggregator | Scalarizer) -> Path:
        """The path the losses take, from the options: a scalarizer's, the Gramian's (where
        ``mode`` asks for it or ``"auto"`` finds it applies) or the Jacobian's; on a model
        sharded with ``fully_shard``, their sharded versions."""
        sharding = sharding_of(self._parameters())
        if self.rep_grad:
            return self._representation_path(aggregator, sharding)
        if isinstance(aggregator, Scalarizer):
            if sharding is not None:
                return ShardedScalarizedPath(aggregator, sharding, FsdpModel(self.modules))
            return ScalarizedPath(aggregator)
        gramian_based = isinstance(aggregator, GramianWeightedAggregator)
        if self.mode == "gramian":
            if not gramian_based or aggregator.needs_columns:
                raise ValueError(
                    f"mode='gramian' needs a Gramian-based aggregator (such as UPGrad), but "
                    f"{aggregator!r} needs the Jacobian; use mode='jacobian'."
                )
            if not (self.modules or self._shared_module):
                raise ValueError("mode='gramian' needs the model: pass modules=model.")
            return self._gramian_path(aggregator, self._gramian_modules()[0], sharding)
        if (
            self.mode == "auto"
            and gramian_based
            and not aggregator.needs_columns
            and (self.modules or self._shared_module)
            and (
                sharding is not None  # the exact global Gramian is available when sharded
                or self.local_weighting
                or (default_process_group() is None and not self.process_group)
            )
        ):
            try:
                modules, complete = self._gramian_modules()
            except ValueError:  # modules that gramian mode cannot hook
                modules, complete = [], False
            if complete and modules and is_supported(modules, batch_dim=self.batch_dim):
                return self._gramian_path(aggregator, modules, sharding)
        if sharding is not None:
            return ShardedJacobianPath(
                aggregator,  # type: ignore[arg-type]
                sharding,
                self._shared_params,
                FsdpModel(self.modules),
            )
        return JacobianPath(aggregator, self._shared_params, self._chunk_size, self._columns)

    def _columns(self, shared: list[Tensor]) -> Columns:
        """The layout of the shared parameters' Jacobian: their sizes, their layers (the modules
        that hold them, in ``shared_params`` when it is a module, else in ``modules``) and their
        parameter groups."""
        if self._layers is None:
            self._layers = layer_names(self._shared_module or self.modules)
        layers = self._layers
        known = all(id(p) in layers for p in shared)
        group_of = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        return Columns(
            tuple(p.numel() for p in shared),
            tuple(layers[id(p)] for p in shared) if known else None,
            tuple(group_of[id(p)] for p in shared),
        )

    def _representation_path(
        self, aggregator: Aggregator | Scalarizer, sharding: Sharding | None
    ) -> RepresentationPath:
        """The path of ``rep_grad=True``, after checking that it applies."""
        if isinstance(aggregator, Scalarizer):
            raise ValueError(
                "rep_grad=True aggregates a Jacobian, but a scalarizer has none; drop rep_grad."
            )
        if self.shared_params is None:
            raise ValueError(
                "rep_grad=True needs shared_params: the parameters (or the module, such as the "
                "encoder) shared by the tasks, whose input from the task heads is the "
                "representation."
            )
        if sharding is not None or self.process_group is not None or default_process_group():
            raise ValueError(
                "rep_grad=True does not run under data parallelism or on a sharded model yet: "
                "the ranks' representations are different samples; use rep_grad=False."
            )
        if self.mode == "gramian" and not isinstance(aggregator, GramianWeightedAggregator):
            raise ValueError(
                f"mode='gramian' needs a Gramian-based aggregator (such as UPGrad), but "
                f"{aggregator!r} needs the Jacobian; use mode='jacobian'."
            )
        mode = "gramian" if self.mode == "gramian" else "jacobian"
        return RepresentationPath(aggregator, self.shared_params, mode, self._chunk_size)

    def _gramian_modules(self) -> tuple[list[nn.Module], bool]:
        """The modules gramian mode hooks and whether they hold every aggregated parameter:
        with ``shared_params``, the largest submodules of ``modules`` (or of the shared module)
        whose parameters are all shared."""
        if self.shared_params is None:
            return self.modules, True
        modules, complete = shared_modules(self.modules or self._shared_module, self.shared_params)
        if not modules:
            raise ValueError(
                "mode='gramian' builds the Gramian of the shared parameters, but no module among "
                "modules holds only shared parameters; pass modules= the shared modules."
            )
        return modules, complete

    def _gramian_path(
        self,
        aggregator: GramianWeightedAggregator,
        modules: list[nn.Module],
        sharding: Sharding | None,
    ) -> Path:
        engine = GramianEngine(modules, batch_dim=self.batch_dim)
        if sharding is not None:
            model = FsdpModel(self.modules)
            if self._shared_params is None:
                return ShardedGramianPath(aggregator, engine, sharding, model)
            return ShardedMultiTaskGramianPath(
                aggregator, engine, sharding, model, self._shared_params
            )
        if self._shared_params is None:
            return GramianPath(aggregator, engine)
        return MultiTaskGramianPath(aggregator, engine, self._shared_params)

    @property
    def aggregator(self) -> Aggregator | Scalarizer:
        """The aggregator (or scalarizer). Another one of the same kind may be assigned: a
        scalarizer in place of a scalarizer, a Gramian-based aggregator in gramian mode."""
        return self._path.method  # type: ignore[return-value]

    @aggregator.setter
    def aggregator(self, aggregator: Aggregator | Scalarizer) -> None:
        kind = self._path.method_type
        if not isinstance(aggregator, kind):
            raise TypeError(
                f"This optimizer's {self.resolved_mode} path takes a method of type "
                f"{kind.__name__}, got {aggregator!r}; build a new JDOptimizer to change the "
                "kind of method."
            )
        if isinstance(self._path, RepresentationPath):
            check_representation_method(aggregator)  # type: ignore[arg-type]
        elif getattr(aggregator, "needs_columns", False) and not isinstance(
            self._path, JacobianPath
        ):
            raise TypeError(
                f"{aggregator!r} needs the Jacobian's columns, which this optimizer's "
                f"{self.resolved_mode} path does not form; build a new JDOptimizer with "
                "mode='jacobian' on a model that is not sharded."
            )
        self._path.method = aggregator

    @property
    def chunk_size(self) -> int | None:
        """Losses per batched backward pass (see the constructor); it may be reassigned."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, chunk_size: int | None) -> None:
        self._chunk_size = check_chunk_size(chunk_size)
        if isinstance(self._path, JacobianPath):
            self._path.chunk_size = chunk_size

    @property
    def shared_params(self) -> list[Tensor] | None:
        """The parameters whose Jacobian is aggregated (see the constructor); they may be
        reassigned in jacobian mode. In gramian mode the engine hooks the modules chosen from
        them when the optimizer is built, so other parameters are refused."""
        return self._shared_params

    @shared_params.setter
    def shared_params(self, shared_params: Iterable[Tensor] | nn.Module | None) -> None:
        checked = self._check_shared(shared_params)
        if self._path.mode == "gramian" and _ids(checked) != _ids(self._shared_params):
            raise ValueError(
                "In gramian mode the Gramian engine hooks the modules chosen from shared_params "
                "when the optimizer is built; build a new JDOptimizer to change shared_params."
            )
        if isinstance(self._path, RepresentationPath) and checked is None:
            raise ValueError("rep_grad=True needs shared_params; build a new JDOptimizer.")
        self._shared_params = checked
        self._shared_module = [shared_params] if isinstance(shared_params, nn.Module) else []
        self._layers = None
        if isinstance(self._path, (JacobianPath, ShardedJacobianPath)):
            self._path.shared_params = checked

    @property
    def resolved_mode(self) -> Literal["jacobian", "gramian"]:
        """The mode in use: ``"gramian"`` or ``"jacobian"`` (what ``"auto"`` chose)."""
        return self._path.mode

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
            >>> JDOptimizer.from_config(sgd, {"aggregator": {"name": "imtlg"}, "mode": "auto"})
            ... # doctest: +ELLIPSIS
            JDOptimizer(
              optimizer=SGD (...),
              aggregator=IMTLG(),
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

    def _loss_vector(self, losses: LossesT) -> Tensor:
        vector = as_loss_vector(losses)
        if not vector.requires_grad:
            raise ValueError(
                "The losses do not require grad, so they are not connected to any parameter; "
                "compute them from the model's outputs with grad enabled."
            )
        return vector

    def _group(self) -> ProcessGroup | None:
        return self.process_group if self.process_group is not None else default_process_group()

    def _scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def _scale(self) -> float:
        return self.scaler.get_scale() if self._scaling() else 1.0

    def backward(
        self, losses: LossesT, *, aggregate: bool = True, retain_graph: bool = False
    ) -> None:
        """Add the aggregated update of ``losses`` into the parameters' ``.grad``.

        Parameters that no loss reaches keep their ``.grad`` (``None`` stays ``None``).
        The call is a transaction (see the commit point above): if it fails, nothing changes.

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
        _check_flag(aggregate, "aggregate")
        _check_flag(retain_graph, "retain_graph")
        skipped = self._backward(losses, aggregate, retain_graph, self.nonfinite)
        if skipped:
            warnings.warn(f"Skipping the step: {skipped}.", stacklevel=2)

    def _backward(
        self, losses: LossesT, aggregate: bool, retain_graph: bool, policy: NonFinite
    ) -> str | None:
        """`backward` as one transaction; returns why the step is skipped, if it is."""
        path = self._path
        if not aggregate and not path.queues:
            if isinstance(path, RepresentationPath):
                raise ValueError(
                    "rep_grad=True aggregates every backward pass (the representation's graph "
                    "is needed until then); accumulate micro-batches with rep_grad=False."
                )
            raise ValueError(
                f"{path.mode.capitalize()} mode aggregates every backward pass; accumulate "
                "micro-batches with mode='jacobian'."
            )
        group = self._group()
        if group is not None and isinstance(path, RepresentationPath):
            raise ValueError(
                "rep_grad=True does not run under data parallelism yet: the ranks' "
                "representations are different samples; use rep_grad=False."
            )
        if group is not None and path.reduces == "update" and not self.local_weighting:
            raise ValueError(
                "Gramian mode cannot build the global Gramian across ranks: use mode='jacobian' "
                "for exact Jacobian descent under data parallelism, or local_weighting=True."
            )
        method = path.method
        if (
            (not aggregate or self._pending)
            and self.accumulation == "sum"
            and isinstance(method, Aggregator)
            and method.loss_dependent_head_weights
            and self.shared_params is not None
        ):
            raise ValueError(
                f"{type(method).__name__} weights the heads' gradients by the values of each "
                "call's losses, so the heads' gradients of micro-batches added with "
                "accumulation='sum' are not those of the whole batch; aggregate every "
                "backward pass, or accumulate with accumulation='concat'."
            )
        vector = self._loss_vector(losses)
        if self._skip_next_step:
            return None
        tensor = losses if isinstance(losses, Tensor) else vector
        with self._transaction(runs_method=aggregate or path.method_in_pieces) as call:
            pieces = path.pieces(
                Losses(
                    tensor,
                    vector,
                    self._parameters(),
                    retain_graph,
                    self._scale(),
                    self.accumulation,
                )
            )
            if not pieces.finite and not self._scaling() and group is None:
                return self._refuse(pieces.reason, policy, call)
            if not aggregate:
                if self._pending:
                    check_combinable(self._pending[0], pieces, self.accumulation)
                self._pending.append(pieces)
                return None
            return self._settle([*self._pending, pieces], policy, call)

    @contextmanager
    def _transaction(self, runs_method: bool) -> Iterator[_Call]:
        """Run the block on the side: if it raises (anything, KeyboardInterrupt included), put
        back what it may have changed, and re-raise."""
        call = _Call(
            state=MethodState(self._path.method) if runs_method else None,
            generators=GlobalGenerators(p.device for p in self._parameters()),
            diagnostics=self.last_diagnostics,
        )
        if runs_method and self._path.method_in_pieces and not self._pending:
            self._step_state = call.state  # the method's state when this step began
        try:
            yield call
        except BaseException:
            if call.state is not None:
                call.state.restore()
            call.generators.restore()
            self.last_diagnostics = call.diagnostics
            self._path.discard()
            if not self._pending:
                self._step_state = None
            raise

    def _settle(self, queued: list[Pieces], policy: NonFinite, call: _Call) -> str | None:
        """Aggregate the queued pieces, then commit the update, or refuse the step."""
        path, group = self._path, self._group()
        pieces = combine(queued, self.accumulation)
        across_ranks = f"the losses or {path.what} are not finite on some rank"
        if group is not None and path.reduces == "pieces":
            pieces = self._reduce_pieces(pieces, group)
        if group is not None and path.reduces == "update":
            # Each rank aggregates its own losses; only the updates are averaged.
            update = self._aggregate(pieces) if pieces.finite else Update(finite=False)
            update = self._reduce_update(update, group)
            if not update.finite:
                return self._overflow_or_refuse(across_ranks, policy, call)
        else:
            if not pieces.finite:  # local non-finite pieces were refused unless scaled
                return self._overflow_or_refuse(across_ranks, policy, call)
            update = self._aggregate(pieces)
            if not update.finite:
                return self._refuse(update.reason, policy, call)
        if self.diagnostics and update.diagnose is not None:
            self._report(update.diagnose())
        # The commit point: the update is accepted.
        _write_grads({p: _added(p, g) for p, g in update.grads.items()})
        self._pending = []
        self._step_state = None
        return None

    def _aggregate(self, pieces: Pieces) -> Update:
        return self._path.aggregate(pieces, scale=self._scale(), diagnostics=self.diagnostics)

    def _refuse(self, reason: str, policy: NonFinite, call: _Call) -> str:
        """Raise a `NonFiniteError` (the transaction then changes nothing), or drop the step
        and return the reason, which the caller warns about."""
        if policy == "raise":
            raise NonFiniteError(
                f"{reason}. Nothing was changed. Pass nonfinite='skip' to skip such steps."
            )
        self._drop_step(call)
        self._skip_next_step = True
        return reason

    def _overflow_or_refuse(self, reason: str, policy: NonFinite, call: _Call) -> str | None:
        """With a ``GradScaler``, non-finite values are an overflow: every gradient is filled
        with infinities, so that ``scaler.step`` skips the step, as in plain AMP. Without one,
        the non-finite policy applies."""
        if not self._scaling():
            return self._refuse(reason, policy, call)
        _write_grads({p: torch.full_like(p, float("inf")) for p in self._parameters()})
        self._drop_step(call)
        return None

    def _drop_step(self, call: _Call) -> None:
        """Forget the queued pieces, and put the methods' state back as it was before the step
        began (torch's global generators as before this call)."""
        state = self._step_state if self._step_state is not None else call.state
        if state is not None:
            state.restore()
        call.generators.restore()
        self._path.discard()
        self._pending = []
        self._step_state = None

    def _reduce_pieces(self, pieces: Pieces, group: ProcessGroup) -> Pieces:
        """The pieces of the global batch: Jacobians averaged (or rows stacked in rank order with
        ``accumulation="concat"``), own gradients averaged, finite on every rank."""
        matrix, losses = pieces.matrix, pieces.loss_values
        with_losses = matrix is not None and losses is not None and self.aggregator.needs_losses
        if with_losses:
            # The losses travel as one more column, reduced as the rows are.
            matrix = torch.cat([matrix, losses.to(matrix.dtype)[:, None]], dim=1)
        matrix, others, finite = synchronise(
            matrix, list(pieces.own.values()), pieces.finite, self.accumulation == "concat", group
        )
        if with_losses:
            matrix, losses = matrix[:, :-1], matrix[:, -1].to(losses.dtype)
        own = dict(zip(pieces.own, others, strict=True))
        return Pieces(pieces.shared, matrix, own, finite, loss_values=losses)

    def _reduce_update(self, update: Update, group: ProcessGroup) -> Update:
        """The ranks' updates averaged, for the parameters some rank's losses reach."""
        params = self._parameters()
        local = [update.grads.get(p, torch.zeros_like(p)) for p in params]
        dtype, device = (local[0].dtype, local[0].device) if local else (None, None)
        reached = torch.tensor([p in update.grads for p in params], dtype=dtype, device=device)
        _, (reached, *grads), finite = synchronise(
            None, [reached, *local], update.finite, False, group
        )
        kept = {p: g for p, g, r in zip(params, grads, reached.tolist(), strict=True) if r > 0}
        return Update(kept, finite, update.reason, update.diagnose)

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
                    self._backward(vector, True, False, "raise")
                return vector.detach().sum()

            return self.optimizer.step(jd_closure)
        skipped = None
        if losses is not None:
            skipped = self._backward(losses, True, False, self.nonfinite)
        elif self._pending:
            with self._transaction(runs_method=not self._path.method_in_pieces) as call:
                skipped = self._settle(list(self._pending), self.nonfinite, call)
        if skipped:
            warnings.warn(f"Skipping the step: {skipped}.", stacklevel=2)
        if self._skip_next_step:
            self._skip_next_step = False
            return None
        return self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, as the inner optimizer does, and forget accumulated Jacobians
        (with what their losses changed in a scalarizer's state) and a pending skip."""
        if self._step_state is not None:
            self._step_state.restore()
        self._step_state = None
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

        Everything is checked before anything changes: the ``"jdoptim"`` entry, the aggregator's
        configuration and state (its keys, the kinds and dimensions of its tensors, their
        finiteness, and that the aggregator loads it), and the inner optimizer's parameter
        groups and per-parameter state shapes. Either both states are loaded, or neither. A
        successful load forgets accumulated Jacobians and a pending skip.

        Raises:
            ValueError: If the state was written with another aggregator configuration, or is
                damaged; the message names what is wrong.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Expected a state dict (a mapping), got {type(state_dict).__name__}.")
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        if extra is not None:
            self._check_saved_aggregator(extra)
        check_optimizer_state(self.optimizer, state_dict)
        previous = self.optimizer.state_dict()
        self.optimizer.load_state_dict(state_dict)
        if extra is not None:
            method = MethodState(self.aggregator)
            try:
                self.aggregator.load_state_dict(extra["aggregator_state"])
            except BaseException:
                method.restore()
                self.optimizer.load_state_dict(previous)
                raise
        self._pending = []
        self._step_state = None
        self._skip_next_step = False

    def _check_saved_aggregator(self, extra: Any) -> None:
        """Raise unless ``extra``, the ``"jdoptim"`` entry of a state dict, suits this
        optimizer."""
        where = f"state_dict[{_STATE_KEY!r}]"
        keys = ("aggregator", "aggregator_state")
        if not isinstance(extra, Mapping) or any(key not in extra for key in keys):
            found = sorted(extra) if isinstance(extra, Mapping) else type(extra).__name__
            raise ValueError(
                f"{where} should hold {list(keys)}, found {found}: the checkpoint is truncated "
                "or was not written by JDOptimizer.state_dict()."
            )
        current = self._aggregator_config()
        saved = extra["aggregator"]
        if None not in (saved, current) and saved != current:
            raise ValueError(
                f"This state was saved with the aggregator {saved}, but this "
                f"optimizer uses {current}; build it with "
                "jdoptim.build(state_dict['jdoptim']['aggregator'])."
            )
        check_method_state(
            self.aggregator, extra["aggregator_state"], f"{where}['aggregator_state']"
        )

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
