"""What the Gramian engine records for each kind of module, and the terms it builds from that.

A *handler* belongs to one hooked module. At forward time it records a `Call` (the inputs it
needs, and where its outputs sit in the autograd graph); once the gradients of the losses with
respect to those outputs are known, it turns the call into `Term`s: closed forms for the usual
layers, per-sample gradients by ``torch.func`` for the others.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn import functional as nnf
from torch.utils._pytree import tree_flatten, tree_unflatten

from jdoptim.gramian._terms import (
    ConvTerm,
    DenseTerm,
    EmbeddingTerm,
    FactoredTerm,
    Term,
    cheapest,
    route_costs,
)

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
_RMS_NORMS: tuple[type[nn.Module], ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


class Call:
    """One recorded forward call of a hooked module.

    It is stored in the metadata of its outputs' autograd nodes, so it lives exactly as long as
    the graph; it holds no reference to those nodes (that would keep the graph alive).
    """

    __slots__ = (
        "__weakref__",
        "handler",
        "index",
        "input_edges",
        "inputs",
        "names",
        "out_batch",
        "out_nrs",
        "out_positions",
        "out_shapes",
        "outputs",
        "params",
        "spec",
        "versions",
    )

    def __init__(
        self,
        handler: Handler,
        index: int,
        inputs: tuple[Any, ...],
        params: tuple[Tensor | None, ...],
        outputs: Sequence[Tensor],
        batch_dim: int | None,
    ) -> None:
        self.handler = handler
        self.index = index
        self.inputs = inputs
        self.params = params
        self.versions = tuple(t._version if isinstance(t, Tensor) else None for t in inputs)
        self.input_edges = [
            get_gradient_edge(t) for t in inputs if isinstance(t, Tensor) and t.requires_grad
        ]
        self.outputs: list[Tensor] | None = list(outputs)  # dropped once attached to the graph
        self.out_nrs = [out.output_nr for out in outputs]
        self.out_shapes = [tuple(out.shape) for out in outputs]
        self.out_batch = [
            None if batch_dim is None or out.ndim <= batch_dim else out.shape[batch_dim]
            for out in outputs
        ]
        self.out_positions: list[int] = [0]
        self.names: list[str] = []
        self.spec: Any = None

    def check_unmodified(self) -> None:
        """Raise if an input was modified in place after the call."""
        for t, version in zip(self.inputs, self.versions, strict=True):
            if isinstance(t, Tensor) and t._version != version:
                raise ValueError(
                    f"An input of module {self.handler.name} was modified in place after the "
                    "module used it, so the recorded activations are stale; avoid in-place "
                    "operations (e.g. inplace=True activations) on the inputs of hooked modules."
                )


class Layout:
    """How the ``m`` objectives map to samples: ``S`` samples of ``T`` objectives each
    (``S = 1``, ``T = m`` when the losses are not per-sample), and how a tensor is brought to a
    leading sample dimension."""

    def __init__(self, per_sample: bool, batch_dim: int | None, S: int, T: int, dtype: Any):
        self.per_sample = per_sample
        self.batch_dim = batch_dim
        self.S = S
        self.T = T
        self.dtype = dtype

    def samples(self, x: Tensor, name: str) -> Tensor:
        """``x`` with the sample dimension first: ``[S, ...]``."""
        if not self.per_sample:
            return x.unsqueeze(0)
        bd: int = self.batch_dim  # type: ignore[assignment]
        if x.ndim <= bd or x.shape[bd] != self.S:
            raise ValueError(
                f"Module {name} received an input of shape {tuple(x.shape)}, which does not have "
                f"the batch size {self.S} of the losses along batch_dim={bd}. Per-sample Gramians "
                "need every hooked module to process the batch (expand shared inputs such as "
                "position indices to the batch), or pass batch_dim=None."
            )
        return x.movedim(bd, 0)

    def cotangent(self, g: Tensor) -> Tensor:
        """An output's gradients as ``[S, T, ...]``.

        They arrive with the output's shape (per-sample, ``T = 1``), or with a leading
        dimension of ``T`` (per-sample) or ``m`` (general).
        """
        if not self.per_sample:
            return g.unsqueeze(0)
        bd: int = self.batch_dim  # type: ignore[assignment]
        if self.T == 1:
            return g.movedim(bd, 0).unsqueeze(1)
        return g.movedim(bd + 1, 0)


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class Handler:
    """Records the calls of one module and turns them into terms."""

    jump = True
    """Whether the module's outputs depend only on its recorded inputs and `covered`
    parameters, so that a walk of the graph can skip its internals."""
    closed_form = True

    def __init__(self, module: nn.Module, name: str, batch_dim: int | None) -> None:
        self.module = module
        self.name = name
        self.batch_dim = batch_dim

    def covered(self) -> list[Tensor]:
        """The parameters whose gradients this handler computes (trainable or not)."""
        return list(self.module.parameters())

    def own_params(self) -> tuple[Tensor | None, ...]:
        """``(weight, bias)``, ``None`` where absent or frozen."""
        module = self.module
        return tuple(
            p if isinstance(p, Tensor) and p.requires_grad else None
            for p in (getattr(module, "weight", None), getattr(module, "bias", None))
        )

    def check(self) -> None:
        """Raise if the module cannot be handled in its current state."""

    def capture(self, args: tuple, kwargs: dict, output: Any, index: int) -> Call | None:
        """Record a call, or return ``None`` when none of its parameters needs a gradient."""
        x = args[0] if args else kwargs.get("input")
        if not isinstance(output, Tensor) or output.grad_fn is None or x is None:
            return None
        params = self.own_params()
        if all(p is None for p in params):
            return None
        return Call(self, index, (x,), params, [output], self.batch_dim)

    def terms(self, call: Call, cotangents: list[Tensor | None], layout: Layout) -> list[Term]:
        """Build the terms of a call from the gradients of its outputs."""
        raise NotImplementedError

    def prefers_direct(self, call: Call, objectives: int, looped: bool) -> bool:
        """Whether the per-objective gradients of the call's parameters, as the backward pass
        computes them, are the cheapest route to its Gramian, for ``objectives`` objectives
        that are not per sample. ``looped``: the backward pass runs once per objective (so it
        computes each objective's gradients at the cost of an ordinary backward pass);
        otherwise it is vectorised over the objectives."""
        return False


class LinearHandler(Handler):
    """``nn.Linear``, with any leading dimensions (those besides the batch are positions)."""

    def terms(self, call: Call, cotangents: list[Tensor | None], layout: Layout) -> list[Term]:
        (x,) = call.inputs
        if layout.per_sample and layout.batch_dim >= x.ndim - 1:  # type: ignore[operator]
            raise ValueError(
                f"Module {self.name} received an input of shape {tuple(x.shape)}, whose "
                f"batch_dim={layout.batch_dim} is its feature dimension."
            )
        A = _cast(layout.samples(x, self.name), layout.dtype)
        S = A.shape[0]
        A = A.reshape(S, 1, -1, A.shape[-1])
        D = _cast(layout.cotangent(cotangents[0]), layout.dtype)  # type: ignore[arg-type]
        D = D.reshape(S, layout.T, 1, -1, D.shape[-1])
        weight, bias = call.params
        return [FactoredTerm(weight, bias, A, D)]

    def prefers_direct(self, call: Call, objectives: int, looped: bool) -> bool:
        module: Any = self.module
        positions = call.inputs[0].numel() // module.in_features
        costs = route_costs(1, objectives, 1, positions, module.in_features, module.out_features)
        return looped and call.params[0] is not None and cheapest(costs) == "materialize"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


class ConvHandler(Handler):
    """``nn.Conv1d`` and ``nn.Conv2d`` (stride, padding of any mode, dilation, groups).

    Per-objective weight gradients come from one grouped convolution backward pass (the samples
    become groups, the tasks output channels), without unfolding the input; when the layer has
    few positions and many weights, the inner products of its unfolded input patches (im2col)
    with each other (ghost, or the kernel of the inputs for task losses) are cheaper.
    """

    def terms(self, call: Call, cotangents: list[Tensor | None], layout: Layout) -> list[Term]:
        module: Any = self.module
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        x = _cast(layout.samples(call.inputs[0], self.name), layout.dtype)
        D = _cast(layout.cotangent(cotangents[0]), layout.dtype)  # type: ignore[arg-type]
        S, T = x.shape[0], layout.T
        lead = _numel(x.shape[1 : x.ndim - spatial - 1])
        x = x.reshape(S * lead, *x.shape[x.ndim - spatial - 1 :])
        padding: Any = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = nnf.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * spatial
        groups = module.groups
        d_out = module.out_channels // groups
        d_in = module.in_channels // groups * _numel(module.kernel_size)
        positions = _numel(D.shape[D.ndim - spatial :])
        weight, bias = call.params
        costs = route_costs(S, T, groups, lead * positions, d_in, d_out)
        if weight is not None and cheapest(costs) == "materialize":
            config = (list(module.stride), list(padding), list(module.dilation), groups)
            x = x.view(S, lead, *x.shape[1:])
            D = D.reshape(S, T, lead, *D.shape[D.ndim - spatial - 1 :])
            return [ConvTerm(weight, bias, x, D, config)]
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if spatial == 1:
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
            padding = (0, *padding)
        patches = nnf.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        A = (
            patches.view(S, lead, groups, d_in, positions)
            .permute(0, 2, 1, 4, 3)
            .reshape(S, groups, lead * positions, d_in)
        )
        D = (
            D.reshape(S, T, lead, groups, d_out, positions)
            .permute(0, 1, 3, 2, 5, 4)
            .reshape(S, T, groups, lead * positions, d_out)
        )
        return [FactoredTerm(weight, bias, A, D)]

    def prefers_direct(self, call: Call, objectives: int, looped: bool) -> bool:
        module: Any = self.module
        groups = module.groups
        d_in = module.in_channels // groups * _numel(module.kernel_size)
        spatial = len(module.kernel_size)
        positions = _numel(call.out_shapes[0][: -spatial - 1]) * _numel(
            call.out_shapes[0][-spatial:]
        )
        costs = route_costs(1, objectives, groups, positions, d_in, module.out_channels // groups)
        return looped and call.params[0] is not None and cheapest(costs) == "materialize"


class EmbeddingHandler(Handler):
    """``nn.Embedding`` (``padding_idx`` and ``max_norm`` included)."""

    def own_params(self) -> tuple[Tensor | None, ...]:
        weight = self.module.weight
        return (weight if weight.requires_grad else None,)  # type: ignore[return-value]

    def terms(self, call: Call, cotangents: list[Tensor | None], layout: Layout) -> list[Term]:
        indices = layout.samples(call.inputs[0], self.name)
        S = indices.shape[0]
        D = _cast(layout.cotangent(cotangents[0]), layout.dtype)  # type: ignore[arg-type]
        D = D.reshape(S, layout.T, -1, D.shape[-1])
        padding_idx = self.module.padding_idx
        return [EmbeddingTerm(call.params[0], indices.reshape(S, -1), D, padding_idx)]  # type: ignore[arg-type]


class NormHandler(Handler):
    """The affine part ``y = x̂ ⊙ γ + β`` of ``LayerNorm`` and ``RMSNorm`` (over the last
    dimensions) and of ``GroupNorm`` and ``BatchNorm`` in eval mode (per channel, dimension 1):
    per-sample gradients ``Σ δ ⊙ x̂`` and ``Σ δ``, with ``x̂`` recomputed from the input."""

    def check(self) -> None:
        if isinstance(self.module, _BATCH_NORMS):
            problem = module_problem(self.module, self.name, self.batch_dim)
            if problem is not None:
                raise ValueError(problem)

    def terms(self, call: Call, cotangents: list[Tensor | None], layout: Layout) -> list[Term]:
        module: Any = self.module
        x = _cast(call.inputs[0], layout.dtype)
        if isinstance(module, (nn.GroupNorm, *_BATCH_NORMS)):
            if isinstance(module, nn.GroupNorm):
                xhat = nnf.group_norm(x, module.num_groups, eps=module.eps)
            else:
                batch_stats = module.training or module.running_mean is None
                xhat = nnf.batch_norm(
                    x,
                    None if batch_stats else module.running_mean,
                    None if batch_stats else module.running_var,
                    training=batch_stats,
                    eps=module.eps,
                )
            channels = xhat.shape[1]
            spatial = _numel(xhat.shape[2:])
            trailing: tuple[int, ...] = (channels, spatial)
            sum_dims: tuple[int, ...] = (2, 4)
        else:
            shape = module.normalized_shape
            if isinstance(module, nn.LayerNorm):
                xhat = nnf.layer_norm(x, shape, eps=module.eps)
            else:
                xhat = nnf.rms_norm(x, shape, eps=module.eps)
            trailing, sum_dims = (_numel(shape),), (2,)
        xhat = layout.samples(xhat, self.name)
        S, T = xhat.shape[0], layout.T
        xhat = xhat.reshape(S, 1, -1, *trailing)
        D = _cast(layout.cotangent(cotangents[0]), layout.dtype)  # type: ignore[arg-type]
        D = D.reshape(S, T, -1, *trailing)
        weight, bias = call.params
        params, grads = [], []
        if weight is not None:
            params.append(weight)
            grads.append((D * xhat).sum(dim=sum_dims).reshape(S * T, -1))
        if bias is not None:
            params.append(bias)
            grads.append(D.sum(dim=sum_dims).reshape(S * T, -1))
        return [DenseTerm(params, grads)]

    def prefers_direct(self, call: Call, objectives: int, looped: bool) -> bool:
        return looped  # the normalised input need not be recomputed nor the gradients kept


class FunctionalHandler(Handler):
    """Any other module with parameters: per-sample gradients of its parameters by
    ``torch.func`` (the ``vjp`` of the module's functional forward, ``vmap``-ed over samples and
    objectives).

    In per-sample mode, every tensor argument whose size along ``batch_dim`` equals the batch
    size is taken as batched; the others are shared by all samples.

    Args:
        whole: Handle all parameters of the module's subtree (for modules that use their
            children's parameters without calling them, such as ``nn.MultiheadAttention``);
            otherwise only its direct parameters, its children being hooked on their own.
    """

    closed_form = False

    def __init__(self, module: nn.Module, name: str, batch_dim: int | None, whole: bool) -> None:
        super().__init__(module, name, batch_dim)
        self.whole = whole
        self.jump = whole
        self.vectorize = True

    def covered(self) -> list[Tensor]:
        return list(self.module.parameters(recurse=self.whole))

    def prefers_direct(self, call: Call, objectives: int, looped: bool) -> bool:
        return True  # the backward pass gives them without replaying the module

    def capture(self, args: tuple, kwargs: dict, output: Any, index: int) -> Call | None:
        named = [
            (name, p)
            for name, p in self.module.named_parameters(recurse=self.whole)
            if p.requires_grad
        ]
        if not named:
            return None
        flat_inputs, spec = tree_flatten((args, kwargs))
        own = {id(t) for t in flat_inputs if isinstance(t, Tensor)}
        leaves, _ = tree_flatten(output)
        positions = [
            i
            for i, leaf in enumerate(leaves)
            if isinstance(leaf, Tensor) and leaf.grad_fn is not None and id(leaf) not in own
        ]
        if not positions:
            return None
        outputs = [leaves[i] for i in positions]
        call = Call(
            self, index, tuple(flat_inputs), tuple(p for _, p in named), outputs, self.batch_dim
        )
        call.out_positions = positions
        call.names = [name for name, _ in named]
        call.spec = spec
        return call

    def terms(self, call: Call, cotangents: list[Tensor | None], layout: Layout) -> list[Term]:
        params: tuple[Tensor, ...] = call.params  # type: ignore[assignment]
        # Outputs the losses do not reach (such as an RNN's final state) are left out.
        used = [j for j, cot in enumerate(cotangents) if cot is not None]
        positions = [call.out_positions[j] for j in used]
        cots = [layout.cotangent(cotangents[j]) for j in used]  # type: ignore[arg-type]
        leaves = [t.detach() if isinstance(t, Tensor) else t for t in call.inputs]
        if layout.per_sample:
            bd: int = self.batch_dim  # type: ignore[assignment]
            in_dims = [
                bd if isinstance(t, Tensor) and t.ndim > bd and t.shape[bd] == layout.S else None
                for t in leaves
            ]
        else:
            bd, in_dims = 0, [None] * len(leaves)
        grads = None
        if self.vectorize:
            try:
                grads = self._vectorized(call, positions, leaves, in_dims, cots, layout)
            except RuntimeError as error:
                if "random" in str(error):
                    raise self._random_error() from error
                warnings.warn(
                    f"Per-sample gradients of module {self.name} ({type(self.module).__name__}) "
                    f"cannot be vectorised by torch.func ({error}); computing them one sample "
                    "at a time from now on.",
                    stacklevel=2,
                )
                self.vectorize = False
        if grads is None:
            grads = self._looped(call, positions, leaves, in_dims, cots, layout)
        m = layout.S * layout.T
        return [DenseTerm(params, [_cast(g.reshape(m, -1), layout.dtype) for g in grads])]

    def _call(
        self, call: Call, values: Sequence[Tensor], leaves: list[Any], positions: list[int]
    ) -> tuple[Tensor, ...]:
        args, kwargs = tree_unflatten(leaves, call.spec)
        by_name = dict(zip(call.names, values, strict=True))
        out = torch.func.functional_call(self.module, by_name, args, kwargs, strict=False)
        out_leaves, _ = tree_flatten(out)
        return tuple(out_leaves[i] for i in positions)

    def _vectorized(
        self,
        call: Call,
        positions: list[int],
        leaves: list[Any],
        in_dims: list[int | None],
        cots: list[Tensor],
        layout: Layout,
    ) -> Sequence[Tensor]:
        """Per-objective gradients ``[S, T, *shape]`` by ``vmap`` over samples and ``vjp``."""
        params = call.params
        bd = self.batch_dim

        def sample_grads(sample: list[Any], sample_cots: tuple[Tensor, ...]) -> tuple:
            def forward(*values: Tensor) -> tuple[Tensor, ...]:
                if not layout.per_sample:
                    return self._call(call, values, sample, positions)
                batch_of_one = [
                    leaf.unsqueeze(bd) if dim is not None else leaf
                    for leaf, dim in zip(sample, in_dims, strict=True)
                ]
                outs = self._call(call, values, batch_of_one, positions)
                return tuple(out.squeeze(bd) for out in outs)

            _, vjp_fn = torch.func.vjp(forward, *params)
            return torch.func.vmap(vjp_fn)(sample_cots)

        if layout.per_sample:
            return torch.func.vmap(sample_grads, in_dims=(in_dims, 0))(leaves, tuple(cots))
        return sample_grads(leaves, tuple(c[0] for c in cots))

    def _random_error(self) -> ValueError:
        return ValueError(
            f"Module {self.name} ({type(self.module).__name__}) draws random numbers (dropout?), "
            "so its per-sample gradients cannot be recomputed; put it in eval mode or set its "
            "dropout probability to 0."
        )

    def _sample(self, leaves: list[Any], in_dims: list[int | None], s: int) -> list[Any]:
        """The arguments of sample ``s`` alone (a batch of one); in non-per-sample mode, whose
        ``in_dims`` are all ``None``, the arguments themselves."""
        return [
            leaf.narrow(self.batch_dim, s, 1) if dim is not None else leaf  # type: ignore[arg-type]
            for leaf, dim in zip(leaves, in_dims, strict=True)
        ]

    def _check_deterministic(
        self,
        call: Call,
        positions: list[int],
        leaves: list[Any],
        in_dims: list[int | None],
        layout: Layout,
    ) -> None:
        """Raise if replaying the module gives another output, as dropout does: the replays of
        `_looped` would then use other random numbers than the forward pass (vmap, in
        `_vectorized`, refuses randomness by itself)."""
        if not any(m.training for m in self.module.modules()):
            return
        sample = self._sample(leaves, in_dims, 0)
        params = [p.detach() for p in call.params]  # type: ignore[union-attr]
        with torch.no_grad():
            first = self._call(call, params, sample, positions)
            second = self._call(call, params, sample, positions)
        if not all(torch.equal(a, b) for a, b in zip(first, second, strict=True)):
            raise self._random_error()

    def _looped(
        self,
        call: Call,
        positions: list[int],
        leaves: list[Any],
        in_dims: list[int | None],
        cots: list[Tensor],
        layout: Layout,
    ) -> list[Tensor]:
        """The same as `_vectorized`, one sample and one objective at a time."""
        bd = self.batch_dim
        rows: list[list[Tensor]] = [[] for _ in call.params]
        self._check_deterministic(call, positions, leaves, in_dims, layout)
        for s in range(layout.S):
            sample = self._sample(leaves, in_dims, s)
            copies = [p.detach().requires_grad_() for p in call.params]  # type: ignore[union-attr]
            with torch.enable_grad():
                outs = self._call(call, copies, sample, positions)
            for t in range(layout.T):
                grad_outputs = [
                    c[s, t].unsqueeze(bd) if layout.per_sample else c[s, t]  # type: ignore[arg-type]
                    for c in cots
                ]
                grads = torch.autograd.grad(
                    outs, copies, grad_outputs, retain_graph=t + 1 < layout.T, allow_unused=True
                )
                for row, grad, p in zip(rows, grads, copies, strict=True):
                    row.append(torch.zeros_like(p) if grad is None else grad)
        return [torch.stack(row) for row in rows]


def _plain(module: nn.Module, *bases: type[nn.Module]) -> bool:
    """Whether ``module`` is an instance of one of ``bases`` that keeps its forward."""
    return any(isinstance(module, base) and type(module).forward is base.forward for base in bases)


def make_handler(module: nn.Module, name: str, batch_dim: int | None) -> Handler | None:
    """Choose the handler of a module (checked by `module_problem` first), or ``None`` if
    only its children are to be hooked."""
    if _plain(module, nn.Linear):
        return LinearHandler(module, name, batch_dim)
    if _plain(module, nn.Conv1d, nn.Conv2d):
        return ConvHandler(module, name, batch_dim)
    if _plain(module, nn.Embedding) and not module.scale_grad_by_freq:  # type: ignore[union-attr]
        return EmbeddingHandler(module, name, batch_dim)
    if _plain(module, nn.LayerNorm, nn.GroupNorm, *_RMS_NORMS) or isinstance(module, _BATCH_NORMS):
        return NormHandler(module, name, batch_dim)
    if isinstance(module, nn.MultiheadAttention):
        return FunctionalHandler(module, name, batch_dim, whole=True)
    if any(True for _ in module.parameters(recurse=False)):
        return FunctionalHandler(module, name, batch_dim, whole=False)
    return None


def module_problem(module: nn.Module, name: str, batch_dim: int | None) -> str | None:
    """Why the engine cannot hook ``module`` with this ``batch_dim``, or ``None``."""
    kind = type(module).__name__
    if isinstance(module, nn.Embedding) and module.sparse:
        return f"Module {name} ({kind}) has sparse=True; the engine writes dense gradients."
    if batch_dim is None:
        return None
    if isinstance(module, _BATCH_NORMS) and (module.training or not module.track_running_stats):
        return (
            f"Module {name} ({kind}) normalises with statistics of the whole batch (training "
            "mode), so one sample's loss depends on the others and per-sample Gramians do not "
            "exist; put it in eval mode, replace it by GroupNorm or LayerNorm, or use "
            "batch_dim=None with task losses."
        )
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return (
            f"Module {name} ({kind}) has scale_grad_by_freq=True, which scales each sample's "
            "gradient by counts over the whole batch; use batch_dim=None."
        )
    batch_first = getattr(module, "batch_first", None)
    if isinstance(batch_first, bool):
        position = 0 if batch_first else 1
        if position != batch_dim:
            return (
                f"Module {name} ({kind}) has batch_first={batch_first}, so its batch dimension "
                f"is {position}, but the engine was built with batch_dim={batch_dim}; build the "
                f"module with batch_first={not batch_first} or the engine with "
                f"batch_dim={position}."
            )
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.GroupNorm, *_BATCH_NORMS)) and batch_dim != 0:
        return (
            f"Module {name} ({kind}) takes inputs [batch, channels, ...], so it needs "
            f"batch_dim=0, got batch_dim={batch_dim}."
        )
    return None
