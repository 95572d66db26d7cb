"""Per-objective gradients of parameters, kept in factored form.

Objective ``k = s·T + t`` belongs to sample ``s`` (of ``S``) and task ``t`` (of ``T``); in the
general (not per-sample) case ``S = 1`` and ``T = m``. A *term* holds the gradients of all ``m``
objectives with respect to a few parameters without forming them when that is cheaper, and can

- add their Gramian into an ``[m, m]`` matrix (`Term.add_gramian`),
- add their weighted sum ``Σ_k w_k ∇_k`` into the parameters' ``.grad`` (`Term.accumulate`),
- materialise them as ``[m, numel]`` matrices (`Term.materialize`), when terms of different
  kinds share a parameter and must be summed before inner products are taken,
- gather the objectives of every rank of a sharded model into one term (`Term.gathered`), whose
  Gramian then holds the inner products between the ranks' objectives,
- give the largest entries of its output gradients (`Term.magnitudes`), which tell whether the
  products forming its Gramian flush to zero, and the same gradients with factors in a wider dtype
  (`Term.widened`), for the Gramian of factors too large or too small for their own.

`FactoredTerm` covers every layer whose weight gradient is a sum of outer products
``Σ_p δ_p a_pᵀ`` over positions ``p`` (linear and convolution layers, with groups); for sample
``s`` and objectives ``k``, ``l``

$$ \\langle \\nabla_k W, \\nabla_l W\\rangle = \\sum_{p,q} (a_{s(k)p}\\cdot a_{s(l)q})
(\\delta_{kp}\\cdot\\delta_{lq}), $$

computed either from the two small Gramians of inputs and output gradients ("ghost" inner
products, cheap when positions are few) or from materialised per-objective gradients (cheap when
positions are many), or, for one sample (task losses averaged over the batch), from the kernel
``K = A Aᵀ`` of the inputs as ``⟨D_s, K D_t⟩``; `route_costs` counts each. `ConvTerm`
materialises a convolution's gradients without unfolding its input. `EmbeddingTerm` does the
same for an embedding table, whose inputs are one-hot: ``a_p·a_q`` is ``1`` when the two indices
are equal, and the per-objective gradients live on the rows looked up. `DenseTerm` holds
materialised gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from jdoptim.linalg._gramian import solve_dtype

Write = Callable[[Tensor, Tensor], None]
"""Adds a gradient (second argument) into a parameter's ``.grad`` (first argument)."""
Gather = Callable[[Tensor], Tensor]
"""Concatenates, along the first dimension and in the order of the ranks, every rank's tensor of
the same shape (a collective: every rank calls it in the same order)."""


class Term:
    """The per-objective gradients of ``params``; see the module docstring."""

    params: tuple[Tensor, ...]

    def merge_key(self) -> tuple | None:
        """Terms with equal non-``None`` keys can be merged by concatenating positions."""
        return None

    def add_gramian(self, G: Tensor) -> None:
        """Add ``Σ_params ∇_k·∇_l`` into ``G[k, l]``."""
        raise NotImplementedError

    def accumulate(self, w: Tensor, write: Write) -> None:
        """Write ``Σ_k w_k ∇_k`` of every parameter of the term."""
        raise NotImplementedError

    def materialize(self) -> list[Tensor]:
        """Return, for each parameter, its per-objective gradients as ``[m, numel]``."""
        raise NotImplementedError

    def gathered(self, gather: Gather) -> Term:
        """The term of the objectives of every rank, in rank order: each rank's per-sample
        factors (or gradients) gathered along their sample dimension. Only its Gramian is used.
        """
        raise NotImplementedError

    def magnitudes(self) -> Tensor:
        """The largest absolute entry of each objective's output gradients (or materialised
        gradients), in float32 or wider, without host synchronisation: where each one that is
        not zero has a normal square (with a margin), the objective's gradient does not flush
        to zero in the products that form the Gramian. (Inputs are not checked: layer inputs
        whose largest entry is below about 1e-17 but not zero are not expected; the Gramian's
        diagonal still shows their products when they partly underflow.)"""
        raise NotImplementedError

    def widened(self, dtype: torch.dtype) -> Term:
        """The same gradients with factors in ``dtype``, for `add_gramian` only."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the term's factors (or gradients)."""
        raise NotImplementedError


def _largest(tensor: Tensor, leading: int) -> Tensor:
    """The largest absolute entry of ``tensor`` for each index of its first ``leading``
    dimensions (flattened), in float32 or wider."""
    rows = math.prod(tensor.shape[:leading])
    if tensor.numel() == 0:
        return tensor.new_zeros(rows, dtype=solve_dtype(tensor.dtype))
    if tensor.ndim == leading:
        largest = tensor.abs()
    else:
        # The extremes without the absolute values: no temporary as large as the tensor.
        dims = tuple(range(leading, tensor.ndim))
        largest = torch.maximum(tensor.amax(dim=dims), tensor.amin(dim=dims).neg_())
    dtype = solve_dtype(tensor.dtype)
    largest = largest if largest.ndim == 1 else largest.reshape(rows)
    return largest if largest.dtype == dtype else largest.to(dtype)


def _ghost(AA: Tensor, D: Tensor, G: Tensor) -> None:
    """Add ``Σ_{γ,p,q} AA[γ, s(k)p, s(l)q]·(D[k,γ,p]·D[l,γ,q])`` into ``G[k, l]``.

    Args:
        AA: Input inner products, ``[Γ, S·P, S·P]``.
        D: Output gradients, ``[S, T, Γ, P, d_out]``.
        G: The ``[m, m]`` Gramian, ``m = S·T``.
    """
    S, T, groups, P, d_out = D.shape
    m = S * T
    if P == 1 and groups == 1:
        D2 = D.reshape(m, d_out)
        DD = D2 @ D2.T
        if T == 1:
            G.addcmul_(AA[0], DD)
        else:
            G.view(S, T, S, T).addcmul_(AA[0].view(S, 1, S, 1), DD.view(S, T, S, T))
        return
    Dg = D.permute(2, 0, 1, 3, 4).reshape(groups, m * P, d_out)
    DD = torch.bmm(Dg, Dg.transpose(1, 2)).view(groups, S, T, P, S, T, P)
    DD.mul_(AA.view(groups, S, 1, P, S, 1, P))
    G.add_(DD.sum(dim=(0, 3, 6)).view(m, m))


BLOCK = 256
"""Samples per block of `_ghost_blocks`: from two blocks on, the Gramian is built block by block,
and only the blocks on and above the diagonal are computed."""


def _ghost_blocks(A: Tensor, D: Tensor, bias: bool, G: Tensor) -> None:
    """Add ``(A Aᵀ + bias) ⊙ (D Dᵀ)`` into ``G``, over samples: ``G[(s,t),(s',t')]`` gets
    ``(a_s·a_s' + bias)(δ_st·δ_s't')``.

    The product is symmetric, so blocks of `BLOCK` samples below the diagonal are copied from
    those above it instead of being computed: about half the multiply-adds for many samples.

    Args:
        A: Inputs, ``[S, d_in]``.
        D: Output gradients, ``[S, T, d_out]``.
        bias: Whether the layer has a bias (whose gradient is ``δ``: ``+1`` to the inputs' inner
            products).
        G: The ``[S·T, S·T]`` Gramian.
    """
    S, T, d_out = D.shape
    G4 = G.view(S, T, S, T)
    D2 = D.reshape(S * T, d_out)
    for i in range(0, S, BLOCK):
        rows = slice(i, i + BLOCK)
        for j in range(i, S, BLOCK):
            cols = slice(j, j + BLOCK)
            AA = A[rows] @ A[cols].T
            if bias:
                AA.add_(1.0)
            DD = D2[i * T : (i + BLOCK) * T] @ D2[j * T : (j + BLOCK) * T].T
            block = DD.view(AA.shape[0], T, AA.shape[1], T).mul_(AA[:, None, :, None])
            G4[rows, :, cols, :].add_(block)
            if j != i:
                G4[cols, :, rows, :].add_(block.permute(2, 3, 0, 1))


KERNEL_CHUNK = 2**16
"""The kernel route forms its products ``K D_t`` for a chunk of the objectives at a time: at
least this many entries (all objectives when they hold fewer), and at least a `KERNEL_PASSES`-th
of the objectives. A temporary half the size of the output gradients, instead of one as large,
is faster on CPUs where the allocator maps the larger afresh; each chunk reads the output
gradients once more."""

KERNEL_PASSES = 2
"""The most chunks of objectives the kernel route takes (see `KERNEL_CHUNK`)."""

MEMORY = 4
"""Multiply-adds that writing an element of an intermediate tensor and reading it back costs
about as much as, in `route_costs` (measured on CPUs, for sizes where the routes are close)."""


def route_costs(S: int, T: int, groups: int, P: int, d_in: int, d_out: int) -> dict[str, int]:
    """Cost of each exact route to the Gramian of a linear map applied at ``P`` positions in
    ``Γ`` groups (``d_in → d_out``), for ``S`` samples of ``T`` objectives (``m = S·T``), in
    multiply-adds plus `MEMORY` per element of the intermediates:

    - ``"ghost"``: the Gramians of inputs and of output gradients over all positions,
      ``(S·P)²·d_in + (m·P)²·(d_out + 1)``, intermediates ``(S·P)² + (m·P)²``;
    - ``"materialize"``: the per-objective gradients, then their Gramian,
      ``m·P·d_in·d_out + m²·d_in·d_out``, intermediates ``m·P·d_out + m·d_in·d_out``;
    - ``"kernel"`` (one sample, ``S = 1``: task losses over the batch): the kernel
      ``K = A Aᵀ`` of the inputs at the ``P`` positions, then ``⟨D_s, K D_t⟩`` for every pair of
      objectives, ``P²·d_in + T·P²·d_out + T²·P·d_out``, intermediates ``P² + T·P·d_out``.
    """
    m = S * T
    costs = {
        "ghost": (S * P) ** 2 * d_in + (m * P) ** 2 * (d_out + 1 + MEMORY) + MEMORY * (S * P) ** 2,
        "materialize": m * d_in * d_out * (P + m + MEMORY) + MEMORY * m * P * d_out,
    }
    if S == 1:
        costs["kernel"] = P * P * (d_in + T * d_out + MEMORY) + T * P * d_out * (T + MEMORY)
    return {route: groups * cost for route, cost in costs.items()}


def cheapest(costs: dict[str, int]) -> str:
    """The route of least cost (the first listed among equals)."""
    return min(costs, key=costs.__getitem__)


class FactoredTerm(Term):
    """Gradients ``∇_k W[γ] = Σ_p D[k, γ, p]ᵀ A[s(k), γ, p]`` of a weight (and ``Σ_p D`` of its
    bias), for linear maps applied at ``P`` positions in ``Γ`` groups.

    The Gramian takes the cheapest of the routes of `route_costs`; ``route`` forces one.

    Args:
        weight: The weight, whose gradient ``[Γ, d_out, d_in]`` is reshaped to its shape; or
            ``None`` if it is frozen.
        bias: The bias ``[Γ·d_out]``, or ``None``.
        A: Inputs, ``[S, Γ, P, d_in]`` (any strides).
        D: Output gradients, ``[S, T, Γ, P, d_out]`` (any strides).
    """

    route: str | None = None
    """Forces a route of `route_costs` for the Gramian (the cheapest by default)."""

    def __init__(self, weight: Tensor | None, bias: Tensor | None, A: Tensor, D: Tensor) -> None:
        self.weight = weight
        self.bias = bias
        self.params = tuple(p for p in (weight, bias) if p is not None)
        self.A = A
        self.D = D
        self._M: Tensor | None = None
        self._Mb: Tensor | None = None

    def merge_key(self) -> tuple | None:
        S, T, groups, _, d_out = self.D.shape
        return (
            type(self),
            tuple(id(p) for p in self.params),
            S,
            T,
            groups,
            self.A.shape[-1],
            d_out,
        )

    @classmethod
    def merged(cls, terms: Sequence[FactoredTerm]) -> FactoredTerm:
        """One term for several calls of the same layer: positions are concatenated."""
        first = terms[0]
        A = torch.cat([t.A for t in terms], dim=2)
        D = torch.cat([t.D for t in terms], dim=3)
        return cls(first.weight, first.bias, A, D)

    def _route(self) -> str:
        if self.route is not None:
            return self.route
        if self.weight is None:
            return "materialize"  # the bias alone: Σ_p D, already the smallest form
        S, T, groups, P, d_out = self.D.shape
        return cheapest(route_costs(S, T, groups, P, self.A.shape[-1], d_out))

    def _input_kernel(self) -> Tensor:
        """``A Aᵀ`` over all positions of all samples (plus 1 for the bias): ``[Γ, S·P, S·P]``."""
        S, groups, P, d_in = self.A.shape
        if P == 1 and groups == 1:
            A2 = self.A.reshape(S, d_in)
            AA = (A2 @ A2.T).unsqueeze(0)
        else:
            Ag = self.A.permute(1, 0, 2, 3).reshape(groups, S * P, d_in)
            AA = torch.bmm(Ag, Ag.transpose(1, 2))
        if self.bias is not None:
            AA.add_(1.0)
        return AA

    def add_gramian(self, G: Tensor) -> None:
        route = self._route()
        S, T, groups, P, d_out = self.D.shape
        if route == "ghost" and P == 1 and groups == 1:
            A = self.A.reshape(S, -1)
            _ghost_blocks(A, self.D.reshape(S, T, d_out), self.bias is not None, G)
            return
        if route == "ghost":
            _ghost(self._input_kernel(), self.D, G)
            return
        if route == "kernel":
            self._add_kernel_gramian(G)
            return
        M, Mb = self.materialize_parts()
        for grads in (M, Mb):
            if grads is not None:
                G.addmm_(grads, grads.T)
        # `accumulate` needs either the gradients or the factors: keep the smaller.
        if M is None or M.numel() <= self.A.numel() + self.D.numel():
            self._M, self._Mb = M, Mb
            self.A = self.D = None  # type: ignore[assignment]

    def _add_kernel_gramian(self, G: Tensor) -> None:
        """Add ``Σ_γ ⟨D_s[γ], K[γ] D_t[γ]⟩`` for one sample (``S = 1``): with ``K = A Aᵀ``, the
        inner product of two objectives' weight gradients ``D_sᵀ A`` and ``D_tᵀ A``."""
        _, T, groups, P, d_out = self.D.shape
        K = self._input_kernel()  # [Γ, P, P]
        D = self.D[0].transpose(0, 1)  # [Γ, T, P, d_out]
        # Part of the objectives at a time: the products K D_t stay smaller temporaries.
        chunk = min(T, max(1, KERNEL_CHUNK // (P * d_out), -(-T // KERNEL_PASSES)))
        for g in range(groups):
            Dg = D[g] if D[g].is_contiguous() else D[g].contiguous()
            flat_t = Dg.view(T, P * d_out).T
            kernel = K[g].expand(chunk, P, P)
            for start in range(0, T, chunk):
                rows = Dg[start : start + chunk]
                KD = torch.bmm(kernel[: rows.shape[0]], rows)  # [chunk, P, d_out]
                G[start : start + chunk].addmm_(KD.view(-1, P * d_out), flat_t)

    def _weight_grads(self) -> Tensor:
        S, T, groups, P, d_out = self.D.shape
        d_in = self.A.shape[-1]
        Dp = self.D.permute(0, 2, 1, 4, 3).reshape(S, groups, T * d_out, P)
        M = torch.matmul(Dp, self.A).view(S, groups, T, d_out, d_in)
        return M.transpose(1, 2).reshape(S * T, groups * d_out * d_in)

    def _bias_grads(self) -> Tensor:
        S, T, groups, _, d_out = self.D.shape
        return self.D.sum(dim=3).reshape(S * T, groups * d_out)

    def materialize_parts(self) -> tuple[Tensor | None, Tensor | None]:
        """The weight's and the bias's gradients ``[m, numel]`` (``None`` where absent)."""
        if self.A is None:
            return self._M, self._Mb
        weight = None if self.weight is None else self._weight_grads()
        bias = None if self.bias is None else self._bias_grads()
        return weight, bias

    def materialize(self) -> list[Tensor]:
        return [M for M in self.materialize_parts() if M is not None]

    def accumulate(self, w: Tensor, write: Write) -> None:
        if self.A is None:
            if self.weight is not None:
                write(self.weight, (w @ self._M).view(self.weight.shape))
            if self.bias is not None:
                write(self.bias, w @ self._Mb)
            return
        S, T, groups, P, d_out = self.D.shape
        d_in = self.A.shape[-1]
        if P == 1 and groups == 1:
            D2 = self.D.reshape(S, T, d_out)
            Dw = D2[:, 0] * w[:, None] if T == 1 else torch.einsum("st,sto->so", w.view(S, T), D2)
            if self.weight is not None:
                write(self.weight, (Dw.T @ self.A.reshape(S, d_in)).view(self.weight.shape))
            if self.bias is not None:
                write(self.bias, Dw.sum(dim=0))
            return
        if S == 1 and groups == 1:  # task losses: one product of the weighted gradients
            Dw = (w @ self.D.reshape(T, P * d_out)).view(P, d_out)
            if self.weight is not None:
                grad = Dw.T @ self.A.reshape(P, d_in)
                write(self.weight, grad.view(self.weight.shape))
            if self.bias is not None:
                write(self.bias, Dw.sum(dim=0))
            return
        if T == 1:
            Dw = self.D[:, 0] * w.view(S, 1, 1, 1)
        else:
            Dw = torch.einsum("st,stgpo->sgpo", w.view(S, T), self.D)
        if self.weight is not None:
            Dg = Dw.permute(1, 3, 0, 2).reshape(groups, d_out, S * P)
            Ag = self.A.permute(1, 0, 2, 3).reshape(groups, S * P, d_in)
            write(self.weight, torch.bmm(Dg, Ag).view(self.weight.shape))
        if self.bias is not None:
            write(self.bias, Dw.sum(dim=(0, 2)).reshape(-1))

    def gathered(self, gather: Gather) -> Term:
        if self.A is None:
            weight, bias = self.materialize_parts()
            params = [p for p in (self.weight, self.bias) if p is not None]
            grads = [gather(M) for M in (weight, bias) if M is not None]
            return DenseTerm(params, grads)
        return FactoredTerm(self.weight, self.bias, gather(self.A), gather(self.D))

    def magnitudes(self) -> Tensor:
        if self.A is None:
            return torch.cat([_largest(M, 1) for M in self.materialize()])
        return _largest(self.D, 2)

    def widened(self, dtype: torch.dtype) -> Term:
        if self.A is None:
            params = [p for p in (self.weight, self.bias) if p is not None]
            return DenseTerm(params, [M.to(dtype) for M in self.materialize()])
        term = FactoredTerm(self.weight, self.bias, self.A.to(dtype), self.D.to(dtype))
        term.route = self.route
        return term

    @property
    def dtype(self) -> torch.dtype:
        return self.materialize()[0].dtype if self.A is None else self.D.dtype


class ConvTerm(Term):
    """Gradients of a convolution's weight (and bias), per sample and task, from one grouped
    convolution backward pass in which every sample (and convolution group) is a group and the
    tasks are output channels, without unfolding the input (im2col).

    Args:
        weight: The weight ``[C_out, C_in/Γ, *kernel]``.
        bias: The bias ``[C_out]``, or ``None``.
        x: The (already padded) inputs, ``[S, N, C_in, *spatial]``: ``N`` inputs per sample whose
            gradients are summed (the batch, for task losses; ``N = 1`` per sample).
        D: Output gradients, ``[S, T, N, C_out, *spatial_out]``.
        config: ``(stride, padding, dilation, groups)`` of the convolution.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        x: Tensor,
        D: Tensor,
        config: tuple[list[int], list[int], list[int], int],
    ) -> None:
        self.weight = weight
        self.bias = bias
        self.params = tuple(p for p in (weight, bias) if p is not None)
        self.x = x
        self.D = D
        self.config = config
        self._grads: list[Tensor] | None = None

    def _weight_grads(self, grad_output: Tensor, inputs: Tensor, groups: int) -> Tensor:
        stride, padding, dilation, _ = self.config
        kernel = self.weight.shape[1:]
        weight = inputs.new_zeros(()).expand(grad_output.shape[1], *kernel)
        _, grads, _ = torch.ops.aten.convolution_backward(
            grad_output,
            inputs,
            weight,
            None,
            stride,
            padding,
            dilation,
            False,
            [0] * len(kernel[1:]),
            groups,
            [False, True, False],
        )
        return grads

    def materialize(self) -> list[Tensor]:
        if self._grads is not None:
            return self._grads
        S, T, N, C_out = self.D.shape[:4]
        out_spatial = self.D.shape[4:]
        groups = self.config[3]
        # Output channels ordered (sample, group, task, channel): [N, S·Γ·T·C_out/Γ, ...].
        D = self.D.reshape(S, T, N, groups, C_out // groups, *out_spatial)
        grad_output = D.permute(2, 0, 3, 1, *range(4, D.ndim)).reshape(
            N, S * T * C_out, *out_spatial
        )
        inputs = self.x.transpose(0, 1).reshape(N, -1, *self.x.shape[3:])
        grads = self._weight_grads(grad_output, inputs, S * groups)
        grads = grads.view(S, groups, T, -1).transpose(1, 2).reshape(S * T, -1)
        if self.bias is None:
            return [grads]
        return [grads, self.D.transpose(2, 3).reshape(S * T, C_out, -1).sum(dim=2)]

    def add_gramian(self, G: Tensor) -> None:
        grads = self.materialize()
        for M in grads:
            G.addmm_(M, M.T)
        if grads[0].numel() <= self.x.numel() + self.D.numel():
            self._grads = grads
            self.x = self.D = None  # type: ignore[assignment]

    def accumulate(self, w: Tensor, write: Write) -> None:
        if self._grads is not None:
            for param, M in zip(self.params, self._grads, strict=True):
                write(param, (w @ M).view(param.shape))
            return
        S, T = self.D.shape[:2]
        if T == 1:
            Dw = self.D[:, 0] * w.view(S, *[1] * (self.D.ndim - 2))
        else:
            Dw = torch.einsum("st,st...->s...", w.view(S, T), self.D)
        Dw = Dw.reshape(-1, *Dw.shape[2:])  # [S·N, C_out, ...]: the gradients are summed
        x = self.x.reshape(-1, *self.x.shape[2:])
        write(self.weight, self._weight_grads(Dw, x, self.config[3]))
        if self.bias is not None:
            write(self.bias, Dw.transpose(0, 1).reshape(Dw.shape[1], -1).sum(dim=1))

    def gathered(self, gather: Gather) -> Term:
        if self._grads is not None:
            return DenseTerm(self.params, [gather(M) for M in self._grads])
        return ConvTerm(self.weight, self.bias, gather(self.x), gather(self.D), self.config)

    def magnitudes(self) -> Tensor:
        if self._grads is not None:
            return torch.cat([_largest(M, 1) for M in self._grads])
        return _largest(self.D, 2)

    def widened(self, dtype: torch.dtype) -> Term:
        if self._grads is not None:
            return DenseTerm(self.params, [M.to(dtype) for M in self._grads])
        x, D = self.x.to(dtype), self.D.to(dtype)
        return ConvTerm(self.weight, self.bias, x, D, self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.D.dtype if self._grads is None else self._grads[0].dtype


class EmbeddingTerm(Term):
    """Gradients ``∇_k E = Σ_p e_{I[s(k), p]} D[k, p]ᵀ`` of an embedding table ``E``.

    Args:
        weight: The table ``[V, d]``.
        indices: The looked-up indices, ``[S, P]``.
        D: Output gradients, ``[S, T, P, d]``.
        padding_idx: An index whose row receives no gradient, or ``None``.
    """

    route: str | None = None
    """Forces a route of `route_costs` for the Gramian (the cheapest by default)."""

    def __init__(self, weight: Tensor, indices: Tensor, D: Tensor, padding_idx: int | None) -> None:
        self.weight = weight
        self.params = (weight,)
        self.indices = indices
        self.D = D
        self.padding_idx = padding_idx

    def merge_key(self) -> tuple | None:
        S, T, _, d = self.D.shape
        return (type(self), id(self.weight), S, T, d, self.padding_idx)

    @classmethod
    def merged(cls, terms: Sequence[EmbeddingTerm]) -> EmbeddingTerm:
        """One term for several calls of the same table: positions are concatenated."""
        first = terms[0]
        indices = torch.cat([t.indices for t in terms], dim=1)
        D = torch.cat([t.D for t in terms], dim=2)
        return cls(first.weight, indices, D, first.padding_idx)

    def route_costs(self) -> dict[str, int]:
        """Multiply-adds of the exact routes to the Gramian: ``"ghost"`` (index equality between
        all positions, times the inner products of their output gradients), ``"rows"`` (the
        per-objective gradients restricted to the rows looked up, then their Gramian)."""
        S, T, P, d = self.D.shape
        m = S * T
        used = min(S * P, self.weight.shape[0])
        ghost = (S * P) ** 2 + (m * P) ** 2 * (d + 1)
        return {"ghost": ghost, "rows": m * P * d + m * m * used * d}

    def add_gramian(self, G: Tensor) -> None:
        route = self.route or cheapest(self.route_costs())
        flat = self.indices.reshape(-1)
        if route == "rows":
            M = self._used_rows_grads(flat)
            G.addmm_(M, M.T)
            return
        same = flat[:, None] == flat[None, :]
        if self.padding_idx is not None:
            same &= (flat != self.padding_idx)[:, None]
        _ghost(same.to(G.dtype).unsqueeze(0), self.D.unsqueeze(2), G)

    def _used_rows_grads(self, flat: Tensor) -> Tensor:
        """The per-objective gradients of the rows looked up, ``[m, n_used·d]``."""
        S, T, P, d = self.D.shape
        used, inverse = torch.unique(flat, return_inverse=True)
        n = used.shape[0]
        offsets = n * torch.arange(S * T, device=flat.device).view(S, T, 1)
        rows = inverse.view(S, 1, P) + offsets
        M = self.D.new_zeros(S * T * n, d).index_add_(0, rows.reshape(-1), self.D.reshape(-1, d))
        M = M.view(S * T, n, d)
        if self.padding_idx is not None:
            M[:, used == self.padding_idx] = 0
        return M.view(S * T, n * d)

    def materialize(self) -> list[Tensor]:
        S, T, _, d = self.D.shape
        V = self.weight.shape[0]
        rows = self.indices[:, None, :] + V * torch.arange(S * T, device=self.indices.device).view(
            S, T, 1
        )
        M = self.D.new_zeros(S * T * V, d).index_add_(0, rows.reshape(-1), self.D.reshape(-1, d))
        M = M.view(S * T, V, d)
        if self.padding_idx is not None:
            M[:, self.padding_idx] = 0
        return [M.view(S * T, V * d)]

    def accumulate(self, w: Tensor, write: Write) -> None:
        S, T, _, d = self.D.shape
        if T == 1:
            Dw = self.D[:, 0] * w.view(S, 1, 1)
        else:
            Dw = torch.einsum("st,stpd->spd", w.view(S, T), self.D)
        grad = Dw.new_zeros(self.weight.shape)
        grad.index_add_(0, self.indices.reshape(-1), Dw.reshape(-1, d))
        if self.padding_idx is not None:
            grad[self.padding_idx] = 0
        write(self.weight, grad)

    def gathered(self, gather: Gather) -> Term:
        return EmbeddingTerm(self.weight, gather(self.indices), gather(self.D), self.padding_idx)

    def magnitudes(self) -> Tensor:
        return _largest(self.D, 2)

    def widened(self, dtype: torch.dtype) -> Term:
        term = EmbeddingTerm(self.weight, self.indices, self.D.to(dtype), self.padding_idx)
        term.route = self.route
        return term

    @property
    def dtype(self) -> torch.dtype:
        return self.D.dtype


class DenseTerm(Term):
    """Materialised per-objective gradients.

    Args:
        params: The parameters.
        grads: For each parameter, its gradients ``[m, numel]``.
    """

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        self.params = tuple(params)
        self.grads = list(grads)

    def merge_key(self) -> tuple | None:
        return (type(self), tuple(id(p) for p in self.params))

    @classmethod
    def merged(cls, terms: Sequence[DenseTerm]) -> DenseTerm:
        """The sum of terms over the same parameters."""
        grads = [
            torch.stack(parts).sum(dim=0) for parts in zip(*(t.grads for t in terms), strict=True)
        ]
        return cls(terms[0].params, grads)

    def add_gramian(self, G: Tensor) -> None:
        for M in self.grads:
            G.addmm_(M, M.T)

    def materialize(self) -> list[Tensor]:
        return self.grads

    def accumulate(self, w: Tensor, write: Write) -> None:
        for param, M in zip(self.params, self.grads, strict=True):
            write(param, (w @ M).view(param.shape))

    def gathered(self, gather: Gather) -> Term:
        return DenseTerm(self.params, [gather(M) for M in self.grads])

    def magnitudes(self) -> Tensor:
        return torch.cat([_largest(M, 1) for M in self.grads])

    def widened(self, dtype: torch.dtype) -> Term:
        return DenseTerm(self.params, [M.to(dtype) for M in self.grads])

    @property
    def dtype(self) -> torch.dtype:
        return self.grads[0].dtype


def combine(terms: Sequence[Term]) -> list[Term]:
    """Group terms that share parameters so that each parameter belongs to exactly one term.

    Terms over the same parameters with the same structure (one layer called several times) are
    merged by concatenating their positions; any other sharing (a table tied to a linear layer,
    say) is resolved by materialising the gradients and summing them per parameter, so the
    per-call gradients are summed before inner products are taken.
    """
    parent = list(range(len(terms)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, term in enumerate(terms):
        for param in term.params:
            j = owner.setdefault(id(param), i)
            parent[find(i)] = find(j)
    groups: dict[int, list[Term]] = {}
    for i, term in enumerate(terms):
        groups.setdefault(find(i), []).append(term)
    combined: list[Term] = []
    for group in groups.values():
        if len(group) == 1:
            combined.append(group[0])
            continue
        keys = {term.merge_key() for term in group}
        if len(keys) == 1 and None not in keys:
            combined.append(type(group[0]).merged(group))  # type: ignore[attr-defined]
            continue
        sums: dict[int, Tensor] = {}
        params: dict[int, Tensor] = {}
        for term in group:
            for param, grads in zip(term.params, term.materialize(), strict=True):
                params[id(param)] = param
                sums[id(param)] = grads if id(param) not in sums else sums[id(param)] + grads
        combined.append(DenseTerm(list(params.values()), [sums[key] for key in params]))
    return combined
