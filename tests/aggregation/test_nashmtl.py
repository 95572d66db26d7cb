"""Nash-MTL: TorchJD's published value, the bargaining system against independent solutions, and
the state."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import Tensor

from jdoptim import FairGradWeighting, NashMTL, NashMTLWeighting
from tests.aggregation.test_fairgrad import MATRICES, coordinate_descent, with_common_direction

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def _normal(m: int, n: int, seed: int) -> Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _two_objectives(J: Tensor) -> Tensor:
    """For m = 2, α_i (Gα)_i = 1 gives α2/α1 = ‖g1‖/‖g2‖ and α_i = 1 / (‖g_i‖ √(1 + cos θ))."""
    norms = J.norm(dim=1)
    cosine = (J[0] @ J[1]) / (norms[0] * norms[1])
    return 1.0 / (norms * (1 + cosine).sqrt())


def test_torchjd_documented_value():
    # TorchJD 0.18: NashMTL docstring example and tests/unit/aggregation/test_values.py give
    # NashMTL(n_tasks=2)(J) = [0.0542, 0.7061, 0.7061].
    torch.testing.assert_close(
        NashMTL()(J_BASE),
        torch.tensor([0.0542, 0.7061, 0.7061], dtype=J_BASE.dtype),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("J", [J_BASE, _normal(2, 5, 0), _normal(2, 2, 1)], ids=["base", "a", "b"])
def test_two_objectives_closed_form(J: Tensor):
    weights = NashMTLWeighting(max_norm=0.0)(J @ J.T)
    torch.testing.assert_close(weights, _two_objectives(J), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", MATRICES)
def test_agrees_with_coordinate_descent(name: str):
    J = MATRICES[name]
    expected = coordinate_descent(J @ J.T, 1.0)
    weights = NashMTLWeighting(max_norm=0.0)(J @ J.T)
    assert float(((weights - expected).abs() / expected).max()) < 1e-6


def test_is_fairgrad_with_alpha_one():
    J = with_common_direction(5, 6, 5)
    torch.testing.assert_close(
        FairGradWeighting(1.0)(J @ J.T), NashMTL(max_norm=0.0).weighting(J @ J.T), rtol=0, atol=0
    )


def test_bargaining_properties_and_clipping():
    J = MATRICES["normal4"]
    m = J.shape[0]
    free = NashMTL(max_norm=0.0)
    d = free(J)
    weights = free.weighting(J @ J.T)
    torch.testing.assert_close(J @ d, 1.0 / weights, rtol=1e-9, atol=0)  # g_iᵀd = 1/α_i
    torch.testing.assert_close(d.norm(), torch.tensor(math.sqrt(m), dtype=J.dtype))
    torch.testing.assert_close(NashMTL(max_norm=0.5)(J), 0.5 * d / d.norm())
    torch.testing.assert_close(NashMTL(max_norm=10.0)(J), d)


def test_no_common_ascent_direction_gives_the_disagreement_point():
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert NashMTL()(J).abs().max() == 0


def test_warm_start_does_not_change_the_solution():
    J1, J2 = MATRICES["normal4"], MATRICES["normal4"] * torch.tensor([[3.0], [0.1], [1.0], [7.0]])
    aggregator = NashMTL()
    aggregator(J1)
    torch.testing.assert_close(aggregator(J2), NashMTL()(J2), rtol=1e-9, atol=0)


def test_update_weights_every_reuses_the_weights_with_the_current_clipping():
    J1, J2 = MATRICES["normal4"], 2.0 * MATRICES["wide6"][:4]
    aggregator = NashMTL(max_norm=1.0, update_weights_every=2)
    aggregator(J1)
    alpha = NashMTLWeighting(max_norm=0.0)(J1 @ J1.T)
    reused = alpha @ J2
    torch.testing.assert_close(aggregator(J2), reused / reused.norm())
    torch.testing.assert_close(aggregator(J2), NashMTL()(J2))  # third call: solved again


def test_state_dict_reset_and_number_of_objectives():
    J1, J2 = MATRICES["normal4"], MATRICES["wide6"][:4]
    aggregator = NashMTL(update_weights_every=3)
    aggregator(J1)
    state = copy.deepcopy(aggregator.state_dict())
    assert state["weighting._extra_state"]["step"] == 1
    restored = NashMTL(update_weights_every=3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(J2), aggregator(J2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="reset"):
        aggregator(MATRICES["wide6"])
    aggregator.reset()
    torch.testing.assert_close(aggregator(MATRICES["wide6"]), NashMTL()(MATRICES["wide6"]))


def test_too_few_iterations_warn_and_use_the_last_iterate():
    J = MATRICES["spread5"]
    with pytest.warns(RuntimeWarning, match="optim_niter=1"):
        update = NashMTL(optim_niter=1)(J)
    assert torch.isfinite(update).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NashMTL()(J)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_norm": -1.0}, {"update_weights_every": 0}, {"optim_niter": 0}, {"optim_niter": 2.5}],
    ids=repr,
)
def test_invalid_arguments(kwargs: dict):
    with pytest.raises(ValueError, match="Invalid"):
        NashMTL(**kwargs)
