"""IMTL, the whole method: the paper's closed form for IMTL-G on the gradients of the scaled
losses, IMTL-L's step on the scales, computed independently with autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from jdoptim import IMTL, IMTLG, JDOptimizer
from tests.aggregation._multitask import M, task_losses, trained_in_mode
from tests.aggregation._multitask import TinyMultiTask as _Net

pytestmark = pytest.mark.usefixtures("float64")


def _losses(model: nn.Module, step: int) -> Tensor:
    return task_losses(model, step, (1.0, 5.0, 0.2))


def _closed_form(G: Tensor) -> Tensor:
    """The paper's α: with D = [g_1 - g_t] and U = [u_1 - u_t] (t = 2..m), α_{2:m} =
    g_1 Uᵀ (D Uᵀ)⁻¹ and α_1 = 1 - Σ α_{2:m}; here from the rows G themselves."""
    units = G / G.norm(dim=1, keepdim=True)
    D, U = G[:1] - G[1:], units[:1] - units[1:]
    rest = G[0] @ U.T @ torch.linalg.inv(D @ U.T)
    return torch.cat([(1 - rest.sum())[None], rest])


def _reference(steps: int, lr: float, net_lr: float) -> tuple[nn.Module, Tensor]:
    model = _Net()
    trunk, heads = list(model.trunk.parameters()), list(model.heads.parameters())
    s = torch.zeros(M)
    for step in range(steps):
        losses = _losses(model, step)
        scaled = s.exp() * losses - s
        rows = torch.stack(
            [
                torch.cat(
                    [
                        g.reshape(-1)
                        for g in torch.autograd.grad(scaled[i], trunk, retain_graph=True)
                    ]
                )
                for i in range(M)
            ]
        )
        head_grads = torch.autograd.grad(scaled.sum(), heads)
        update = _closed_form(rows) @ rows
        with torch.no_grad():
            start = 0
            for p in trunk:
                p -= net_lr * update[start : start + p.numel()].view_as(p)
                start += p.numel()
            for p, g in zip(heads, head_grads, strict=True):
                p -= net_lr * g
        s = s - lr * (s.exp() * losses.detach() - 1)
    return model, s


def test_training_follows_the_paper():
    reference, scales = _reference(4, lr=0.3, net_lr=0.05)
    model = _Net()
    aggregator = IMTL(lr=0.3)
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        aggregator,
        shared_params=model.trunk,
        diagnostics=True,
    )
    for step in range(4):
        optimizer.zero_grad()
        optimizer.step(_losses(model, step))
    torch.testing.assert_close(aggregator.weighting.log_scales, scales)
    torch.testing.assert_close(optimizer.last_diagnostics.method_state["loss_scales"], scales.exp())
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_with_scales_at_zero_it_is_imtlg():
    J = torch.randn(M, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(IMTL()(J, losses=torch.ones(M)), IMTLG()(J))


def test_the_scales_drive_the_scaled_losses_to_one():
    weighting = IMTL(lr=0.5).weighting
    losses = torch.tensor([10.0, 0.1, 1.0])
    G = torch.eye(M)
    for _ in range(200):
        weighting(G, losses=losses)
    torch.testing.assert_close(weighting.log_scales.exp() * losses, torch.ones(M))


def test_gramian_mode_steps_like_jacobian_mode():
    def method():
        return IMTL(lr=0.2)

    gramian = trained_in_mode(method, "gramian", 0.05, _losses)
    jacobian = trained_in_mode(method, "jacobian", 0.05, _losses)
    for a, b in zip(gramian, jacobian, strict=True):
        torch.testing.assert_close(a, b)


def test_state_dict_resumes_bit_exactly():
    generator = torch.Generator().manual_seed(2)
    jacobians = torch.randn(4, M, 5, generator=generator)
    losses = torch.rand(4, M, generator=generator) + 0.5
    original = IMTL(lr=0.2)
    for J, values in zip(jacobians[:2], losses[:2], strict=True):
        original(J, losses=values)
    restored = IMTL(lr=0.2)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    for J, values in zip(jacobians[2:], losses[2:], strict=True):
        expected = original(J, losses=values)
        torch.testing.assert_close(restored(J, losses=values), expected, rtol=0, atol=0)
