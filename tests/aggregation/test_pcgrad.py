from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import Tensor

from jdoptim import PCGrad, PCGradWeighting

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def _projected(J: Tensor, i: int, order: tuple[int, ...]) -> Tensor:
    """g_i^PC for one order of the other tasks, computed on the rows themselves."""
    g = J[i].clone()
    for j in order:
        dot = g @ J[j]
        if dot < 0:
            g = g - dot / (J[j] @ J[j]) * J[j]
    return g


def _all_possible_updates(J: Tensor) -> list[Tensor]:
    m = J.shape[0]
    per_row = [
        [_projected(J, i, order) for order in itertools.permutations(set(range(m)) - {i})]
        for i in range(m)
    ]
    return [torch.stack(choice).sum(dim=0) for choice in itertools.product(*per_row)]


def test_torchjd_documented_values():
    # TorchJD 0.18 documentation and tests/unit/aggregation/test_values.py:
    # PCGrad()(J) = [0.5848, 3.8012, 3.8012], PCGradWeighting()(G) = [2.2222, 1.5789].
    torch.testing.assert_close(
        PCGrad()(J_BASE),
        torch.tensor([0.5848, 3.8012, 3.8012], dtype=J_BASE.dtype),
        atol=1e-4,
        rtol=0,
    )
    # By hand: g1·g2 = -22, so w = (1 + 22/18, 1 + 22/38) = (20/9, 30/19).
    torch.testing.assert_close(
        PCGradWeighting()(J_BASE @ J_BASE.T), torch.tensor([20 / 9, 30 / 19], dtype=J_BASE.dtype)
    )


@pytest.mark.parametrize("seed", range(5))
def test_update_is_the_sum_of_the_projections_for_some_order(seed: int):
    J = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    update = PCGrad(seed=seed)(J)
    candidates = _all_possible_updates(J)
    distances = torch.stack([(update - c).norm() for c in candidates])
    assert distances.min() <= 1e-12 * J.norm()


def test_every_order_is_drawn():
    # Row 0 conflicts with both others, and its projection depends on their order.
    J = torch.tensor([[3.0, -1.0], [-2.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    seen = {tuple(PCGrad(seed=seed)(J).tolist()) for seed in range(40)}
    assert len(seen) == len({tuple(c.tolist()) for c in _all_possible_updates(J)}) > 1


def test_can_conflict_for_more_than_two_objectives():
    J = torch.tensor([[3.0, -1.0], [-2.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    assert all((J @ c < -0.1).any() for c in _all_possible_updates(J))
    assert (J @ PCGrad(seed=0)(J) < -0.1).any()


def test_never_conflicts_for_two_objectives():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        J = torch.randn(2, 4, generator=generator, dtype=torch.float64)
        assert (J @ PCGrad()(J) >= -1e-12).all()


def test_linear_under_scaling_for_a_fixed_order():
    generator = torch.Generator().manual_seed(2)
    J = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    c1, c2 = torch.rand(2, 5, generator=generator, dtype=torch.float64) + 0.1
    aggregator = PCGrad(seed=7)

    def run(matrix: Tensor) -> Tensor:
        aggregator.reset()
        return aggregator(matrix)

    combined = run(J * (c1 + c2)[:, None])
    torch.testing.assert_close(combined, run(J * c1[:, None]) + run(J * c2[:, None]))


def test_zero_rows_are_never_projected_against():
    J = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    weights = PCGradWeighting(seed=0)(J @ J.T)
    assert torch.isfinite(weights).all()
    assert weights[1] == 1.0  # the zero row keeps its own unit coefficient only
    torch.testing.assert_close(weights @ J, _all_possible_updates(J)[0])


def test_single_row_is_returned_unchanged():
    J = torch.tensor([[1.0, -2.0, 3.0]])
    torch.testing.assert_close(PCGrad()(J), J[0])


def test_gramian_path_matches_the_jacobian_path():
    J = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    update = PCGrad(seed=11)(J)
    weights = PCGradWeighting(seed=11)(J @ J.T)
    torch.testing.assert_close(update, weights @ J)


def test_seed_reset_and_state_dict():
    J = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    aggregator = PCGrad(seed=5)
    first = aggregator(J)
    state = copy.deepcopy(aggregator.state_dict())
    second = aggregator(J)
    restored = PCGrad(seed=5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(J), second, rtol=0, atol=0)
    aggregator.reset()
    torch.testing.assert_close(aggregator(J), first, rtol=0, atol=0)


def test_global_generator_without_seed():
    J = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.manual_seed(0)
    first = PCGrad()(J)
    torch.manual_seed(0)
    torch.testing.assert_close(PCGrad()(J), first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no seed"):
        PCGrad().load_state_dict(_seeded_state_after_a_draw())


def _seeded_state_after_a_draw() -> dict:
    aggregator = PCGrad(seed=1)
    aggregator(torch.eye(3))
    return aggregator.state_dict()


@pytest.mark.parametrize("seed", [1.5, "0", True])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        PCGrad(seed=seed)
