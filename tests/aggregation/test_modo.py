from __future__ import annotations

import copy

import numpy as np
import pytest
import quadprog
import torch
from torch import Tensor

from jdoptim import MoDoWeighting
from jdoptim.functional import jacobian, stack_jacobians
from jdoptim.linalg import project_onto_simplex


def _simplex_projection_by_qp(y: Tensor) -> Tensor:
    """argmin ||x - y||² s.t. sum(x) = 1, x >= 0, solved by quadprog."""
    m = y.shape[0]
    constraints = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(m)])
    x = quadprog.solve_qp(np.eye(m), y.numpy(), constraints, bounds, meq=1)[0]
    return torch.from_numpy(x)


def _reference_modo(matrices: list[Tensor], gamma: float, rho: float) -> list[Tensor]:
    lam = torch.full((matrices[0].shape[0],), 1.0 / matrices[0].shape[0], dtype=torch.float64)
    out = []
    for A in matrices:
        lam = _simplex_projection_by_qp(lam - gamma * (A @ lam + rho * lam))
        out.append(lam)
    return out


@pytest.mark.parametrize("m", [1, 2, 5, 30])
def test_simplex_projection_matches_a_qp_solver(m: int):
    generator = torch.Generator().manual_seed(m)
    for scale in (0.1, 1.0, 10.0):
        y = torch.randn(m, generator=generator, dtype=torch.float64) * scale
        torch.testing.assert_close(project_onto_simplex(y), _simplex_projection_by_qp(y))


def test_matches_the_projected_step_over_several_calls():
    generator = torch.Generator().manual_seed(0)
    matrices = [
        torch.randn(4, 6, generator=generator, dtype=torch.float64)
        @ torch.randn(4, 6, generator=generator, dtype=torch.float64).T
        for _ in range(5)
    ]  # cross-batch products: neither symmetric nor PSD
    weighting = MoDoWeighting(gamma=0.05, rho=0.2)
    for A, expected in zip(matrices, _reference_modo(matrices, 0.05, 0.2), strict=True):
        torch.testing.assert_close(weighting(A), expected)


def test_state_dict_into_a_fresh_instance_reset_and_change_of_m():
    generator = torch.Generator().manual_seed(1)
    A1, A2 = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    weighting = MoDoWeighting()
    first = weighting(A1)
    state = copy.deepcopy(weighting.state_dict())
    restored = MoDoWeighting()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(A2), weighting(A2), rtol=0, atol=0)
    weighting.reset()
    torch.testing.assert_close(weighting(A1), first, rtol=0, atol=0)
    B = torch.randn(2, 2, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(weighting(B), MoDoWeighting()(B))


def test_cross_batch_feeding_path():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)  # three outputs, one squared-error loss each
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    weighting = MoDoWeighting(gamma=0.5)

    def losses(x: Tensor, y: Tensor) -> Tensor:
        return ((model(x) - y) ** 2).mean(dim=0)

    batches = [(torch.randn(8, 5), torch.randn(8, 3)) for _ in range(9)]
    for (x1, y1), (x2, y2), (x3, y3) in zip(
        batches[0::3], batches[1::3], batches[2::3], strict=True
    ):
        J1 = stack_jacobians(jacobian(losses(x1, y1), params))
        J2 = stack_jacobians(jacobian(losses(x2, y2), params))
        A = J1 @ J2.T
        # A[i, j] is the inner product of loss i's gradient on batch 1 and loss j's on batch 2.
        i, j = 0, 2
        g_i = torch.autograd.grad(losses(x1, y1)[i], params)
        g_j = torch.autograd.grad(losses(x2, y2)[j], params)
        torch.testing.assert_close(
            A[i, j], sum((a * b).sum() for a, b in zip(g_i, g_j, strict=True))
        )
        weights = weighting(A)
        assert not weights.requires_grad and weights.min() >= 0
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
        J3 = stack_jacobians(jacobian(losses(x3, y3), params))
        before = torch.cat([p.detach().flatten() for p in params])
        optimizer.zero_grad()
        (weights @ losses(x3, y3)).backward()
        optimizer.step()
        after = torch.cat([p.detach().flatten() for p in params])
        torch.testing.assert_close(after, before - 0.1 * weights @ J3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"gamma": 0.0}, "gamma"), ({"gamma": -1.0}, "gamma"), ({"rho": -0.1}, "rho")],
)
def test_bad_arguments_are_rejected(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        MoDoWeighting(**kwargs)


def test_non_square_input_is_rejected():
    with pytest.raises(ValueError, match="square"):
        MoDoWeighting()(torch.ones(2, 3))
