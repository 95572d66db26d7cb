from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from jdoptim import GradDrop, build, to_config
from jdoptim.aggregation._bases import RandomSource

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def _reference(J: Tensor, draws: Tensor, leak: Tensor, f=lambda p: p) -> Tensor:
    """Lines 10 to 15 of the paper's Algorithm 1, entry by entry."""
    m, n = J.shape
    update = torch.zeros(n, dtype=J.dtype)
    for k in range(n):
        column = J[:, k]
        magnitude = column.abs().sum()
        purity = 0.5 * (1 + column.sum() / magnitude) if magnitude > 0 else torch.tensor(0.5)
        fp = f(purity)
        for i in range(m):
            mask = float((fp > draws[k] and column[i] > 0) or (fp < draws[k] and column[i] < 0))
            update[k] += (leak[i] + (1 - leak[i]) * mask) * column[i]
    return update


def test_torchjd_documented_value_is_one_of_the_two_outcomes_with_its_probability():
    # TorchJD 0.18 documents GradDrop()(J) = [6, 2, 2]: the purity of the first column is 0.6,
    # so 6 is kept with probability 0.6, else -4; the other columns are all positive.
    outcomes = torch.stack([GradDrop()(J_BASE) for _ in range(4000)])
    first = outcomes[:, 0]
    assert set(first.tolist()) == {6.0, -4.0}
    torch.testing.assert_close(outcomes[:, 1:], torch.full((4000, 2), 2.0, dtype=J_BASE.dtype))
    assert abs((first == 6.0).double().mean().item() - 0.6) < 0.03


@pytest.mark.parametrize("leak", [None, [0.0, 0.3, 1.0, 0.5]])
def test_matches_the_entrywise_reference_for_the_same_draws(leak):
    J = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    J[:, 3] = 0.0
    draws = RandomSource(seed=4).rand((50,), J)
    expected = _reference(J, draws, torch.zeros(4) if leak is None else torch.tensor(leak))
    torch.testing.assert_close(GradDrop(leak=leak, seed=4)(J), expected)


def test_custom_f_matches_the_reference():
    J = torch.randn(3, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = RandomSource(seed=5).rand((40,), J)
    expected = _reference(J, draws, torch.zeros(3), f=lambda p: p**3)
    torch.testing.assert_close(GradDrop(f=lambda p: p**3, seed=5)(J), expected)


def test_full_leak_is_the_sum_and_certain_purity_keeps_positive_parts():
    J = torch.randn(3, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(GradDrop(leak=[1.0, 1.0, 1.0])(J), J.sum(dim=0))
    keep_positive = GradDrop(f=torch.ones_like)
    torch.testing.assert_close(keep_positive(J), J.clamp(min=0).sum(dim=0))


def test_seed_reset_and_state_dict():
    J = torch.randn(3, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    aggregator = GradDrop(seed=1)
    first = aggregator(J)
    state = copy.deepcopy(aggregator.state_dict())
    second = aggregator(J)
    assert not torch.equal(first, second)
    restored = GradDrop(seed=1)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(J), second, rtol=0, atol=0)
    aggregator.reset()
    torch.testing.assert_close(aggregator(J), first, rtol=0, atol=0)


def test_config_round_trip_with_leak_and_a_custom_f_is_refused():
    aggregator = GradDrop(leak=[0.25, 0.5], seed=3)
    config = to_config(aggregator)
    assert config == {"name": "graddrop", "f": None, "leak": [0.25, 0.5], "seed": 3}
    assert repr(build(config)) == repr(aggregator)
    with pytest.raises(TypeError, match="f="):
        to_config(GradDrop(f=torch.sigmoid))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("seed", range(4))
def test_a_non_finite_entry_gives_a_non_finite_coordinate(value: float, seed: int):
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    J[seed % 2, 0] = value
    update = GradDrop(seed=seed)(J)
    assert not torch.isfinite(update[0])
    torch.testing.assert_close(update[1:], torch.tensor([2.0, 2.0]))


def test_a_nested_config_for_f_is_refused_when_built():
    # {"name": "mean"} builds the Mean aggregator, which is callable but not a function of P.
    with pytest.raises(TypeError, match=r"Invalid f value: Mean\(\)"):
        build({"name": "graddrop", "f": {"name": "mean"}})


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match=r"Invalid f value: 0\.5; expected a function"):
        GradDrop(f=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GradDrop(leak=[0.5, 1.5])
    with pytest.raises(ValueError, match="2 leaks but the Jacobian has 3 rows"):
        GradDrop(leak=[0.5, 0.5])(torch.ones(3, 2))
