"""DWA: weights from the ratio of the last two epochs' average losses."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from jdoptim.scalarization import DWA

EPOCHS = [  # three batches per epoch, three objectives
    [[4.0, 2.0, 1.0], [3.0, 2.5, 1.0], [5.0, 1.5, 1.3]],
    [[2.0, 2.0, 0.9], [2.4, 1.0, 1.1], [1.6, 1.5, 0.8]],
    [[1.0, 1.0, 1.0], [1.2, 0.8, 0.9], [0.9, 1.1, 1.0]],
]


def _average(batches):
    return [sum(column) / len(column) for column in zip(*batches, strict=True)]


def _weights(older, newer, temperature):
    """The paper's weights in Python floats."""
    exps = [math.exp(n / o / temperature) for o, n in zip(older, newer, strict=True)]
    return [len(exps) * e / sum(exps) for e in exps]


def _gradient(scalarizer, batch):
    losses = torch.tensor(batch, dtype=torch.float64, requires_grad=True)
    scalarizer(losses).backward()
    return losses.grad


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_weights_over_epochs_follow_the_paper(temperature):
    scalarizer = DWA(temperature)
    for epoch, batches in enumerate(EPOCHS):
        if epoch < 2:
            expected = [1.0, 1.0, 1.0]
        else:
            expected = _weights(_average(EPOCHS[0]), _average(EPOCHS[1]), temperature)
        for batch in batches:
            gradient = _gradient(scalarizer, batch)
            torch.testing.assert_close(gradient, torch.tensor(expected, dtype=torch.float64))
        scalarizer.step()
    expected = _weights(_average(EPOCHS[1]), _average(EPOCHS[2]), temperature)
    torch.testing.assert_close(
        _gradient(scalarizer, [1.0, 1.0, 1.0]), torch.tensor(expected, dtype=torch.float64)
    )
    assert sum(expected) == pytest.approx(3.0)


def test_step_can_take_the_epoch_averages_instead_of_the_recorded_ones():
    scalarizer = DWA()
    scalarizer(torch.tensor([100.0, 100.0]))  # discarded by the explicit averages below
    scalarizer.step(torch.tensor([2.0, 4.0], dtype=torch.float64))
    scalarizer.step(torch.tensor([1.0, 3.0], dtype=torch.float64))
    expected = _weights([2.0, 4.0], [1.0, 3.0], 2.0)
    torch.testing.assert_close(scalarizer.weights(2), torch.tensor(expected, dtype=torch.float64))
    assert scalarizer.loss_sum is None and scalarizer.batches == 0


def test_losses_scalarised_in_eval_mode_are_not_recorded():
    scalarizer = DWA()
    scalarizer(torch.tensor([2.0, 4.0]))
    scalarizer.eval()
    scalarizer(torch.tensor([1000.0, 1000.0]))
    scalarizer.train()
    scalarizer.step()
    torch.testing.assert_close(scalarizer.history, torch.tensor([[2.0, 4.0]]))


def test_a_step_without_recorded_losses_warns_and_changes_nothing():
    scalarizer = DWA()
    with pytest.warns(UserWarning, match="no losses recorded"):
        scalarizer.step()
    assert scalarizer.history is None


def test_undefined_ratios_and_changes_of_m_are_rejected():
    scalarizer = DWA()
    with pytest.raises(ValueError, match="non-zero epoch-average losses"):
        scalarizer.step(torch.tensor([1.0, 0.0]))
    scalarizer(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="recorded losses for 2 objectives but got 3"):
        scalarizer(torch.tensor([1.0, 2.0, 3.0]))
    scalarizer.step()
    with pytest.raises(ValueError, match="recorded losses for 2 objectives but got 3"):
        scalarizer.step(torch.tensor([1.0, 2.0, 3.0]))
    scalarizer.reset()
    scalarizer(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="Invalid temperature value: 0"):
        DWA(0)


def test_a_training_loop_resumed_from_state_dict_mid_epoch_matches_the_uninterrupted_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 16, 4), torch.randn(6, 16, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scalarizer = DWA()
    snapshot = None
    for epoch in range(4):
        for batch in range(3):
            if (epoch, batch) == (2, 1):
                snapshot = copy.deepcopy((model, optimizer.state_dict(), scalarizer.state_dict()))
            losses = ((model(x[batch]) - y[batch]) ** 2).mean(dim=0)
            optimizer.zero_grad()
            scalarizer(losses).backward()
            optimizer.step()
        scalarizer.step()
    resumed_model, optimizer_state, scalarizer_state = snapshot
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05)
    resumed_optimizer.load_state_dict(optimizer_state)
    resumed = DWA()
    resumed.load_state_dict(scalarizer_state)
    for first_batch in (1, 0):  # the rest of epoch 2, then epoch 3
        for batch in range(first_batch, 3):
            losses = ((resumed_model(x[batch]) - y[batch]) ** 2).mean(dim=0)
            resumed_optimizer.zero_grad()
            resumed(losses).backward()
            resumed_optimizer.step()
        resumed.step()
    for trained, restarted in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(restarted, trained, rtol=0, atol=0)
    torch.testing.assert_close(resumed.history, scalarizer.history, rtol=0, atol=0)
    assert not torch.equal(resumed.weights(3), torch.ones(3))
