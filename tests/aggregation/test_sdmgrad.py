from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from jdoptim import SDMGradWeighting
from jdoptim.functional import jacobian, stack_jacobians
from tests.aggregation.test_modo import _simplex_projection_by_qp


def _reference_sdmgrad(
    matrices: list[Tensor], lr: float, momentum: float, n_iter: int, lam: float, pref: Tensor
) -> list[Tensor]:
    m = matrices[0].shape[0]
    w = torch.full((m,), 1.0 / m, dtype=torch.float64)
    out = []
    for A in matrices:
        scale = A.diagonal().clamp(min=0).sqrt().mean()
        A = A / scale**2 if scale > 0 else A
        velocity = torch.zeros(m, dtype=torch.float64)
        for _ in range(n_iter):
            velocity = momentum * velocity + A @ (w + lam * pref)
            w = _simplex_projection_by_qp(w - lr * velocity)
        out.append((w + lam * pref) / (1 + lam))
    return out


def test_torchjd_test_suite_values():
    # TorchJD's tests/unit/aggregation/test_sdmgrad.py, worked out by hand there: with
    # A = diag(1, 0.25, 0), n_iter = 1, lr = 10, lambda_ = 0.3, the weights are [1, 1, 11] / 13;
    # then A = I gives [6, 6, 1] / 13; and the preference [0, 0, 1] gives [0, 0, 1].
    weighting = SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=1, lambda_=0.3)
    A1 = torch.diag(torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(weighting(A1), A1.new_tensor([1.0, 1.0, 11.0]) / 13)
    torch.testing.assert_close(
        weighting(torch.eye(3, dtype=A1.dtype)), A1.new_tensor([6, 6, 1]) / 13
    )
    preferring = SDMGradWeighting(n_iter=1, pref_vector=[0.0, 0.0, 1.0])
    torch.testing.assert_close(preferring(A1), A1.new_tensor([0.0, 0.0, 1.0]))


@pytest.mark.parametrize("pref", [None, [0.5, 0.2, 0.2, 0.1]])
def test_matches_the_projected_momentum_sgd_over_several_calls(pref):
    generator = torch.Generator().manual_seed(0)
    matrices = []
    for _ in range(4):  # two batches' Jacobians: a common part plus batch noise
        common, noise1, noise2 = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)
        matrices.append((common + 0.5 * noise1) @ (common + 0.5 * noise2).T)
    preferred = torch.full((4,), 0.25, dtype=torch.float64) if pref is None else torch.tensor(pref)
    expected = _reference_sdmgrad(matrices, 0.5, 0.5, 7, 0.4, preferred.double())
    weighting = SDMGradWeighting(lr=0.5, n_iter=7, lambda_=0.4, pref_vector=pref)
    for A, weights in zip(matrices, expected, strict=True):
        torch.testing.assert_close(weighting(A), weights)


def test_weights_do_not_depend_on_the_gradients_scale():
    A = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    A = A @ A.T
    for scale in (1e-12, 1e12):
        torch.testing.assert_close(SDMGradWeighting()(A * scale), SDMGradWeighting()(A))


def test_state_dict_into_a_fresh_instance_reset_and_change_of_m():
    generator = torch.Generator().manual_seed(2)
    A1, A2 = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    weighting = SDMGradWeighting(lr=0.3)
    first = weighting(A1)
    state = copy.deepcopy(weighting.state_dict())
    restored = SDMGradWeighting(lr=0.3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(A2), weighting(A2), rtol=0, atol=0)
    weighting.reset()
    torch.testing.assert_close(weighting(A1), first, rtol=0, atol=0)
    B = torch.randn(2, 2, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(weighting(B), SDMGradWeighting(lr=0.3)(B))


def test_cross_batch_feeding_path():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    params = list(model.parameters())
    weighting = SDMGradWeighting()

    def losses(x: Tensor, y: Tensor) -> Tensor:
        return ((model(x) - y) ** 2).mean(dim=0)

    (x1, y1), (x2, y2) = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(2)]
    J1 = stack_jacobians(jacobian(losses(x1, y1), params))
    J2 = stack_jacobians(jacobian(losses(x2, y2), params))
    A = J1 @ J2.T
    g = [
        torch.autograd.grad(losses(x1, y1)[0], params),
        torch.autograd.grad(losses(x2, y2)[1], params),
    ]
    torch.testing.assert_close(A[0, 1], sum((a * b).sum() for a, b in zip(*g, strict=True)))
    weights = weighting(A)
    assert weights.shape == (2,) and not weights.requires_grad and weights.min() >= 0
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"n_iter": 0}, "n_iter"),
        ({"lambda_": -1.0}, "lambda_"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        SDMGradWeighting(**kwargs)


def test_pref_vector_length_is_checked():
    with pytest.raises(ValueError, match="2 preferences"):
        SDMGradWeighting(pref_vector=[0.5, 0.5])(torch.eye(3))
