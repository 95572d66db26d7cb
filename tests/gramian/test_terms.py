"""The factored gradient terms against explicitly formed per-objective gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from jdoptim.gramian._terms import DenseTerm, EmbeddingTerm, FactoredTerm, combine
from tests.gramian._reference import assert_close

DTYPE = torch.float64


def collect(term, w: Tensor) -> dict[int, Tensor]:
    written: dict[int, Tensor] = {}

    def write(param: Tensor, grad: Tensor) -> None:
        assert grad.shape == param.shape
        written[id(param)] = written.get(id(param), 0) + grad

    term.accumulate(w, write)
    return written


@pytest.mark.parametrize("ghost", [True, False])
@pytest.mark.parametrize(("S", "T", "groups", "P"), [(5, 1, 1, 1), (4, 3, 1, 1), (3, 2, 2, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_factored_term(ghost: bool, S: int, T: int, groups: int, P: int, bias: bool) -> None:
    generator = torch.Generator().manual_seed(S * 100 + T * 10 + P)
    d_in, d_out = 3, 2
    A = torch.randn(S, groups, P, d_in, dtype=DTYPE, generator=generator)
    D = torch.randn(S, T, groups, P, d_out, dtype=DTYPE, generator=generator)
    weight = torch.zeros(groups * d_out, d_in, dtype=DTYPE)
    b = torch.zeros(groups * d_out, dtype=DTYPE) if bias else None
    m = S * T
    grads_w = torch.einsum("stgpo,sgpi->stgoi", D, A).reshape(m, -1)
    grads_b = D.sum(dim=3).reshape(m, -1)
    flat = torch.cat([grads_w, grads_b], dim=1) if bias else grads_w
    term = FactoredTerm(weight, b, A, D)
    term._use_ghost = lambda: ghost  # type: ignore[method-assign]
    G = torch.zeros(m, m, dtype=DTYPE)
    term.add_gramian(G)
    assert_close(G, flat @ flat.T, "Gramian")
    w = torch.randn(m, dtype=DTYPE, generator=generator)
    written = collect(term, w)
    assert_close(written[id(weight)], (w @ grads_w).view(weight.shape), "weight")
    if bias:
        assert_close(written[id(b)], w @ grads_b, "bias")
    for param, grads in zip(term.params, term.materialize(), strict=True):
        expected = grads_w if param is weight else grads_b
        assert_close(grads, expected, "materialised")


@pytest.mark.parametrize("ghost", [True, False])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_term(ghost: bool, padding_idx: int | None) -> None:
    generator = torch.Generator().manual_seed(1)
    S, T, P, V, d = 4, 2, 5, 6, 3
    indices = torch.randint(0, V, (S, P), generator=generator)
    indices[0, :2] = 2
    D = torch.randn(S, T, P, d, dtype=DTYPE, generator=generator)
    weight = torch.zeros(V, d, dtype=DTYPE)
    one_hot = torch.nn.functional.one_hot(indices, V).to(DTYPE)
    if padding_idx is not None:
        one_hot[..., padding_idx] = 0
    grads = torch.einsum("stpd,spv->stvd", D, one_hot).reshape(S * T, -1)
    term = EmbeddingTerm(weight, indices, D, padding_idx)
    G = torch.zeros(S * T, S * T, dtype=DTYPE)
    if ghost:
        term.add_gramian(G)
    else:
        M = term.materialize()[0]
        G.addmm_(M, M.T)
    assert_close(G, grads @ grads.T, "Gramian")
    w = torch.randn(S * T, dtype=DTYPE, generator=generator)
    assert_close(collect(term, w)[id(weight)], (w @ grads).view(V, d), "weighted")


def test_combine_sums_per_call_gradients_before_inner_products() -> None:
    generator = torch.Generator().manual_seed(2)
    S, d = 3, 4
    shared = torch.zeros(5, d, dtype=DTYPE)
    other = torch.zeros(2, dtype=DTYPE)
    linear = FactoredTerm(
        shared,
        None,
        torch.randn(S, 1, 1, d, dtype=DTYPE, generator=generator),
        torch.randn(S, 1, 1, 1, 5, dtype=DTYPE, generator=generator),
    )
    embedding = EmbeddingTerm(
        shared,
        torch.randint(0, 5, (S, 2), generator=generator),
        torch.randn(S, 1, 2, d, dtype=DTYPE, generator=generator),
        None,
    )
    dense = DenseTerm([other], [torch.randn(S, 2, dtype=DTYPE, generator=generator)])
    per_shared = linear.materialize()[0] + embedding.materialize()[0]
    flat = torch.cat([per_shared, dense.grads[0]], dim=1)
    combined = combine([linear, dense, embedding])
    assert len(combined) == 2
    G = torch.zeros(S, S, dtype=DTYPE)
    for term in combined:
        term.add_gramian(G)
    assert_close(G, flat @ flat.T, "Gramian")

    calls = [
        FactoredTerm(
            shared,
            None,
            torch.randn(S, 1, P, d, dtype=DTYPE, generator=generator),
            torch.randn(S, 1, 1, P, 5, dtype=DTYPE, generator=generator),
        )
        for P in (1, 3)
    ]
    (merged,) = combine(calls)
    assert isinstance(merged, FactoredTerm)
    G = torch.zeros(S, S, dtype=DTYPE)
    merged.add_gramian(G)
    summed = calls[0].materialize()[0] + calls[1].materialize()[0]
    assert_close(G, summed @ summed.T, "merged Gramian")
