"""The factored gradient terms against explicitly formed per-objective gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from jdoptim.gramian._terms import (
    ConvTerm,
    DenseTerm,
    EmbeddingTerm,
    FactoredTerm,
    cheapest,
    combine,
    route_costs,
)
from tests.gramian._reference import assert_close

DTYPE = torch.float64


def collect(term, w: Tensor) -> dict[int, Tensor]:
    written: dict[int, Tensor] = {}

    def write(param: Tensor, grad: Tensor) -> None:
        assert grad.shape == param.shape
        written[id(param)] = written.get(id(param), 0) + grad

    term.accumulate(w, write)
    return written


FACTORED_SHAPES = [
    (5, 1, 1, 1),
    (4, 3, 1, 1),
    (3, 2, 2, 4),
    (1, 4, 1, 6),
    (1, 3, 2, 5),
    (1, 1, 1, 3),
]


@pytest.mark.parametrize(
    ("route", "S", "T", "groups", "P"),
    [
        (route, *shape)
        for shape in FACTORED_SHAPES
        for route in ("ghost", "materialize", "kernel")
        if route != "kernel" or shape[0] == 1  # the kernel route is for one sample
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_factored_term(route: str, S: int, T: int, groups: int, P: int, bias: bool) -> None:
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
    term.route = route
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


@pytest.mark.parametrize("passes", [1, 2, 3, 5])
@pytest.mark.parametrize("groups", [1, 2])
def test_the_kernel_route_by_chunks_of_objectives(monkeypatch, passes: int, groups: int) -> None:
    """With chunks of ``⌈5 / passes⌉`` objectives (the last one shorter), the Gramian is the one
    of the formed gradients."""
    import jdoptim.gramian._terms as terms

    monkeypatch.setattr(terms, "KERNEL_CHUNK", 1)
    monkeypatch.setattr(terms, "KERNEL_PASSES", passes)
    generator = torch.Generator().manual_seed(passes)
    T, P, d_in, d_out = 5, 4, 3, 2
    A = torch.randn(1, groups, P, d_in, dtype=DTYPE, generator=generator)
    D = torch.randn(1, T, groups, P, d_out, dtype=DTYPE, generator=generator)
    weight = torch.zeros(groups * d_out, d_in, dtype=DTYPE)
    bias = torch.zeros(groups * d_out, dtype=DTYPE)
    grads = torch.cat(
        [torch.einsum("stgpo,sgpi->stgoi", D, A).reshape(T, -1), D.sum(dim=3).reshape(T, -1)],
        dim=1,
    )
    term = FactoredTerm(weight, bias, A, D)
    term.route = "kernel"
    G = torch.full((T, T), 0.5, dtype=DTYPE)  # the Gramian is added to what is there
    term.add_gramian(G)
    assert_close(G, 0.5 + grads @ grads.T, "Gramian")


def test_route_costs_prefer_the_kernel_for_task_losses_on_wide_layers() -> None:
    # One 1024 x 1024 layer, batch 64, 128 task losses: the kernel form costs far less.
    costs = route_costs(1, 128, 1, 64, 1024, 1024)
    assert cheapest(costs) == "kernel"
    assert costs["materialize"] > 10 * costs["kernel"]
    # One loss per sample on a linear layer: the Gramians of inputs and output gradients.
    assert "kernel" not in route_costs(64, 1, 1, 1, 1024, 1024)
    assert cheapest(route_costs(64, 1, 1, 1, 1024, 1024)) == "ghost"
    # Many positions (a convolution over the batch), few weights: the gradients themselves.
    assert cheapest(route_costs(1, 40, 1, 65536, 27, 32)) == "materialize"


@pytest.mark.parametrize(
    ("S", "T", "N", "groups"), [(3, 1, 1, 1), (2, 3, 1, 2), (1, 4, 5, 1), (1, 2, 3, 2)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_term(S: int, T: int, N: int, groups: int, bias: bool) -> None:
    generator = torch.Generator().manual_seed(S * 100 + T * 10 + N)
    C_in, C_out = 2 * groups, 3 * groups
    conv = torch.nn.Conv2d(C_in, C_out, 3, stride=2, padding=1, groups=groups, bias=bias)
    conv = conv.to(DTYPE)
    x = torch.randn(S, N, C_in, 7, 6, dtype=DTYPE, generator=generator)
    out_shape = conv(x[0]).shape[1:]
    D = torch.randn(S, T, N, *out_shape, dtype=DTYPE, generator=generator)
    rows = []
    for s in range(S):
        for t in range(T):
            inputs = x[s].clone()
            params = [p for p in conv.parameters()]
            grads = torch.autograd.grad(conv(inputs), params, D[s, t])
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    flat = torch.stack(rows)
    padded = torch.nn.functional.pad(x.reshape(S * N, C_in, 7, 6), (1, 1, 1, 1))
    term = ConvTerm(
        conv.weight,
        conv.bias,
        padded.view(S, N, C_in, 9, 8),
        D,
        ([2, 2], [0, 0], [1, 1], groups),
    )
    G = torch.zeros(S * T, S * T, dtype=DTYPE)
    term.add_gramian(G)
    assert_close(G, flat @ flat.T, "Gramian")
    w = torch.randn(S * T, dtype=DTYPE, generator=generator)
    written = collect(term, w)
    update = w @ flat
    assert_close(written[id(conv.weight)], update[: conv.weight.numel()].view_as(conv.weight), "w")
    if bias:
        assert_close(written[id(conv.bias)], update[conv.weight.numel() :], "bias")


@pytest.mark.parametrize("route", ["ghost", "rows", "materialize"])
@pytest.mark.parametrize("S", [1, 4])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_term(route: str, S: int, padding_idx: int | None) -> None:
    generator = torch.Generator().manual_seed(1)
    T, P, V, d = 2, 5, 6, 3
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
    if route == "materialize":
        M = term.materialize()[0]
        G.addmm_(M, M.T)
    else:
        term.route = route
        term.add_gramian(G)
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


@pytest.mark.parametrize(("S", "T"), [(5, 1), (7, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_ghost_gramian_by_blocks_fills_both_triangles(monkeypatch, S: int, T: int, bias: bool):
    monkeypatch.setattr("jdoptim.gramian._terms.BLOCK", 2)  # blocks of 2, 2 and 1 (or 1) samples
    generator = torch.Generator().manual_seed(S + T)
    A = torch.randn(S, 1, 1, 4, dtype=DTYPE, generator=generator)
    D = torch.randn(S, T, 1, 1, 3, dtype=DTYPE, generator=generator)
    weight = torch.zeros(3, 4, dtype=DTYPE)
    term = FactoredTerm(weight, torch.zeros(3, dtype=DTYPE) if bias else None, A, D)
    term.route = "ghost"
    grads = [torch.einsum("stgpo,sgpi->stgoi", D, A).reshape(S * T, -1)]
    if bias:
        grads.append(D.reshape(S * T, 3))
    flat = torch.cat(grads, dim=1)
    G = torch.zeros(S * T, S * T, dtype=DTYPE)
    term.add_gramian(G)
    assert_close(G, flat @ flat.T, "Gramian")
    assert torch.equal(G, G.T)
