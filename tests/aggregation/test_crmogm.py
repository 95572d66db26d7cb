from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import Tensor

from jdoptim import (
    CRMOGM,
    CRMOGMWeighting,
    MeanWeighting,
    MGDAWeighting,
    RandomWeighting,
    UPGradWeighting,
    WeightedAggregator,
    Weighting,
    build,
    to_config,
)


class _NormWeighting(Weighting):
    """Weights proportional to the rows' norms: a weighting that needs J."""

    needs_jacobian = True

    def _weights(self, matrix: Tensor) -> Tensor:
        norms = matrix.norm(dim=1)
        return norms / norms.sum()


def _gramians(count: int, m: int = 3) -> list[Tensor]:
    generator = torch.Generator().manual_seed(count)
    jacobians = torch.randn(count, m, 5, generator=generator, dtype=torch.float64)
    return [J @ J.T for J in jacobians]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_moving_average_of_the_wrapped_weights(alpha: float):
    gramians = _gramians(5)
    bare = UPGradWeighting()
    weighting = CRMOGMWeighting(UPGradWeighting(), alpha=alpha)
    average = bare(gramians[0])
    for G in gramians:
        average = alpha * average + (1 - alpha) * bare(G)
        torch.testing.assert_close(weighting(G), average)


def test_initial_weights_start_the_average():
    G1, G2 = _gramians(2)
    weighting = CRMOGMWeighting(MGDAWeighting(), alpha=0.25, initial_weights=[1.0, 0.0, 0.0])
    first = 0.25 * torch.tensor([1.0, 0.0, 0.0], dtype=G1.dtype) + 0.75 * MGDAWeighting()(G1)
    torch.testing.assert_close(weighting(G1), first)
    torch.testing.assert_close(weighting(G2), 0.25 * first + 0.75 * MGDAWeighting()(G2))
    with pytest.raises(ValueError, match="1 initial weights but the Jacobian has 3 rows"):
        CRMOGMWeighting(MeanWeighting(), initial_weights=[1.0])(G1)


def test_nested_configs_build_recursively_and_round_trip():
    config = {"name": "crmogm", "weighting": {"name": "upgradweighting", "reg_eps": 0.001}}
    aggregator = build(config)
    assert isinstance(aggregator, CRMOGM)
    assert isinstance(aggregator.weighting.weighting, UPGradWeighting)
    assert aggregator.weighting.weighting.reg_eps == 0.001
    written = to_config(aggregator)
    assert written["weighting"]["name"] == "upgradweighting"
    assert written["alpha"] == 0.9 and written["initial_weights"] is None
    rebuilt = build(json.loads(json.dumps(written)))
    assert repr(rebuilt) == repr(aggregator)
    weighting = build({"name": "crmogmweighting", "weighting": {"name": "meanweighting"}})
    assert isinstance(weighting, CRMOGMWeighting)
    assert isinstance(weighting.weighting, MeanWeighting)


def test_a_weighting_that_needs_the_jacobian():
    J = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wrapped = CRMOGMWeighting(_NormWeighting(), alpha=0.5)
    assert wrapped.needs_jacobian
    aggregator = WeightedAggregator(wrapped)
    torch.testing.assert_close(aggregator(J), _NormWeighting()(J) @ J)
    with pytest.raises(ValueError, match="needs the Jacobian"):
        CRMOGM(_NormWeighting())


def test_weights_that_ignore_the_matrix_skip_the_gramian():
    aggregator = CRMOGM(MeanWeighting())
    assert not aggregator.weighting.uses_matrix
    J = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(aggregator(J), J.mean(dim=0))


def test_state_dict_holds_both_states_and_reset_resets_both():
    G1, G2 = _gramians(2)
    weighting = CRMOGMWeighting(RandomWeighting(seed=3), alpha=0.5)
    first = weighting(G1)
    state = copy.deepcopy(weighting.state_dict())
    assert set(state) == {"_extra_state", "weighting._extra_state"}
    restored = CRMOGMWeighting(RandomWeighting(seed=3), alpha=0.5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(G2), weighting(G2), rtol=0, atol=0)
    weighting.reset()
    torch.testing.assert_close(weighting(G1), first, rtol=0, atol=0)


def test_changing_the_number_of_objectives_needs_a_reset():
    weighting = CRMOGMWeighting(UPGradWeighting())
    weighting(_gramians(1, m=3)[0])
    with pytest.raises(ValueError, match="changed from 3 to 2; call reset"):
        weighting(_gramians(1, m=2)[0])
    weighting.reset()
    assert weighting(_gramians(1, m=2)[0]).shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weighting": "upgradweighting"}, TypeError, "Weighting"),
        ({"weighting": MeanWeighting(), "alpha": 1.5}, ValueError, "alpha"),
        ({"weighting": MeanWeighting(), "initial_weights": [float("nan")]}, ValueError, "finite"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        CRMOGMWeighting(**kwargs)
