"""Per-objective gradients of parameters, kept in factored form.

Objective ``k = s·T + t`` belongs to sample ``s`` (of ``S``) and task ``t`` (of ``T``); in the
general (not per-sample) case ``S = 1`` and ``T = m``. A *term* holds the gradients of all ``m``
objectives with respect to a few parameters without forming them when that is cheaper, and can

- add their Gramian into an ``[m, m]`` matrix (`Term.add_gramian`),
- add their weighted sum ``Σ_k w_k ∇_k`` into the parameters' ``.grad`` (`Term.accumulate`),
- materialise them as ``[m, numel]`` matrices (`Term.materialize`), when terms of different
  kinds share a parameter and must be summed before inner products are taken,
- gather the objectives of every rank of a sharded model into one term (`Term.gathered`), whose
  Gramian then holds the inner products between the ranks' objectives.

`FactoredTerm` covers every layer whose weight gradient is a sum of outer products
``Σ_p δ_p a_pᵀ`` over positions ``p`` (linear and convolution layers, with groups); for sample
``s`` and objectives ``k``, ``l``

$$ \\langle \\nabla_k W, \\nabla_l W\\rangle = \\sum_{p,q} (a_{s(k)p}\\cdot a_{s(l)q})
(\\delta_{kp}\\cdot\\delta_{lq}), $$

computed either from the two small Gramians of inputs and output gradients ("ghost" inner
products, cheap when positions are few) or from materialised per-objective gradients (cheap when
positions are many). `EmbeddingTerm` does the same for an embedding table, whose inputs are
one-hot: ``a_p·a_q`` is ``1`` when the two indices are equal. `DenseTerm` holds materialised
gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

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


def prefer_ghost(S: int, T: int, groups: int, P: int, d_in: int, d_out: int) -> bool:
    """Whether ghost inner products cost fewer operations than materialised gradients, for
    ``S·T`` objectives, ``Γ`` groups and ``P`` positions of a ``d_in → d_out`` map."""
    m = S * T
    ghost = groups * ((S * P) ** 2 * d_in + (m * P) ** 2 * (d_out + 1))
    materialize = groups * (m * P * d_in * d_out + m * m * d_in * d_out)
    return ghost < materialize


class FactoredTerm(Term):
    """Gradients ``∇_k W[γ] = Σ_p D[k, γ, p]ᵀ A[s(k), γ, p]`` of a weight (and ``Σ_p D`` of its
    bias), for linear maps applied at ``P`` positions in ``Γ`` groups.

    Args:
        weight: The weight, whose gradient ``[Γ, d_out, d_in]`` is reshaped to its shape; or
            ``None`` if it is frozen.
        bias: The bias ``[Γ·d_out]``, or ``None``.
        A: Inputs, ``[S, Γ, P, d_in]`` (any strides).
        D: Output gradients, ``[S, T, Γ, P, d_out]`` (any strides).
    """

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

    def _use_ghost(self) -> bool:
        S, T, groups, P, d_out = self.D.shape
        return self.weight is not None and prefer_ghost(S, T, groups, P, self.A.shape[-1], d_out)

    def add_gramian(self, G: Tensor) -> None:
        S, _, groups, P, _ = self.D.shape
        d_in = self.A.shape[-1]
        if self._use_ghost():
            if P == 1 and groups == 1:
                A2 = self.A.reshape(S, d_in)
                AA = (A2 @ A2.T).unsqueeze(0)
            else:
                Ag = self.A.permute(1, 0, 2, 3).reshape(groups, S * P, d_in)
                AA = torch.bmm(Ag, Ag.transpose(1, 2))
            if self.bias is not None:
                AA.add_(1.0)
            _ghost(AA, self.D, G)
            return
        M, Mb = self.materialize_parts()
        for grads in (M, Mb):
            if grads is not None:
                G.addmm_(grads, grads.T)
        # `accumulate` needs either the gradients or the factors: keep the smaller.
        if M is None or M.numel() <= self.A.numel() + self.D.numel():
            self._M, self._Mb = M, Mb
            self.A = self.D = None  # type: ignore[assignment]

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


class ConvTerm(Term):
    """Gradients of a convolution's weight (and bias), per sample and task, from one grouped
    convolution backward pass in which every sample (and convolution group) is a group.

    Args:
        weight: The weight ``[C_out, C_in/Γ, *kernel]``.
        bias: The bias ``[C_out]``, or ``None``.
        x: The (already padded) inputs, ``[S, C_in, *spatial]``.
        D: Output gradients, ``[S, T, C_out, *spatial_out]``.
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
        S, T, C_out = self.D.shape[:3]
        out_spatial = self.D.shape[3:]
        groups = self.config[3]
        D = self.D
        if T > 1:  # group-major output channels: [S, Γ, T, C_out/Γ]
            D = D.reshape(S, T, groups, C_out // groups, *out_spatial).transpose(1, 2)
        grad_output = D.reshape(1, S * T * C_out, *out_spatial)
        inputs = self.x.reshape(1, -1, *self.x.shape[2:])
        grads = self._weight_grads(grad_output, inputs, S * groups)
        grads = grads.view(S, groups, T, -1).transpose(1, 2).reshape(S * T, -1)
        if self.bias is None:
            return [grads]
        return [grads, self.D.reshape(S * T, C_out, -1).sum(dim=2)]

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
        write(self.weight, self._weight_grads(Dw, self.x, self.config[3]))
        if self.bias is not None:
            write(self.bias, Dw.transpose(0, 1).reshape(Dw.shape[1], -1).sum(dim=1))

    def gathered(self, gather: Gather) -> Term:
        if self._grads is not None:
            return DenseTerm(self.params, [gather(M) for M in self._grads])
        return ConvTerm(self.weight, self.bias, gather(self.x), gather(self.D), self.config)


class EmbeddingTerm(Term):
    """Gradients ``∇_k E = Σ_p e_{I[s(k), p]} D[k, p]ᵀ`` of an embedding table ``E``.

    Args:
        weight: The table ``[V, d]``.
        indices: The looked-up indices, ``[S, P]``.
        D: Output gradients, ``[S, T, P, d]``.
        padding_idx: An index whose row receives no gradient, or ``None``.
    """

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

    def add_gramian(self, G: Tensor) -> None:
        S, T, P, d = self.D.shape
        V = self.weight.shape[0]
        m = S * T
        ghost = (S * P) ** 2 + (m * P) ** 2 * (d + 1)
        if ghost > m * P * d + m * m * V * d:
            M = self.materialize()[0]
            G.addmm_(M, M.T)
            return
        flat = self.indices.reshape(-1)
        same = flat[:, None] == flat[None, :]
        if self.padding_idx is not None:
            same &= (flat != self.padding_idx)[:, None]
        _ghost(same.to(G.dtype).unsqueeze(0), self.D.unsqueeze(2), G)

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
