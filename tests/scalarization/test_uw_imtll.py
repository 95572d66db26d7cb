"""UW and IMTL-L: one trainable parameter per objective, learnt with the model."""

from __future__ import annotations

import math

import pytest
import torch

from jdoptim.scalarization import IMTLL, UW

VALUES = [0.5, 2.0, 8.0]


def _set(scalarizer, values):
    scalarizer(torch.ones(len(values)))  # fixes m
    with torch.no_grad():
        next(scalarizer.parameters()).copy_(torch.tensor(values, dtype=torch.float64))


def test_uw_value_and_gradients_follow_the_formula():
    s = [0.3, -0.7, 1.1]
    uw = UW(3).double()
    _set(uw, s)
    losses = torch.tensor(VALUES, dtype=torch.float64, requires_grad=True)
    scalar = uw(losses)
    expected = sum(0.5 * math.exp(-si) * li + 0.5 * si for si, li in zip(s, VALUES, strict=True))
    assert scalar.item() == pytest.approx(expected, rel=1e-14)
    scalar.backward()
    for i, (si, li) in enumerate(zip(s, VALUES, strict=True)):
        assert losses.grad[i].item() == pytest.approx(0.5 * math.exp(-si), rel=1e-14)
        assert uw.log_var.grad[i].item() == pytest.approx(0.5 - 0.5 * math.exp(-si) * li, rel=1e-13)


def test_imtll_value_and_gradients_follow_the_formula_and_relate_to_uw():
    s = [0.3, -0.7, 1.1]
    imtll, uw = IMTLL(3).double(), UW(3).double()
    _set(imtll, s)
    _set(uw, [-si for si in s])
    losses = torch.tensor(VALUES, dtype=torch.float64, requires_grad=True)
    scalar = imtll(losses)
    expected = sum(math.exp(si) * li - si for si, li in zip(s, VALUES, strict=True))
    assert scalar.item() == pytest.approx(expected, rel=1e-14)
    torch.testing.assert_close(scalar, 2 * uw(losses), rtol=1e-14, atol=0)
    scalar.backward()
    for i, (si, li) in enumerate(zip(s, VALUES, strict=True)):
        assert losses.grad[i].item() == pytest.approx(math.exp(si), rel=1e-14)
        assert imtll.log_scale.grad[i].item() == pytest.approx(math.exp(si) * li - 1, rel=1e-13)


@pytest.mark.parametrize(("cls", "optimum"), [(UW, math.log), (IMTLL, lambda x: -math.log(x))])
def test_training_the_parameters_on_fixed_losses_reaches_the_closed_form_optimum(cls, optimum):
    scalarizer = cls().double()
    optimizer = torch.optim.SGD(scalarizer.parameters(), lr=0.5)  # before the first call
    losses = torch.tensor(VALUES, dtype=torch.float64)
    for _ in range(300):
        optimizer.zero_grad()
        scalarizer(losses).backward()
        optimizer.step()
    expected = torch.tensor([optimum(value) for value in VALUES], dtype=torch.float64)
    torch.testing.assert_close(next(scalarizer.parameters()).detach(), expected, rtol=0, atol=1e-8)
    if cls is IMTLL:  # balanced: every scaled loss is 1
        scaled = torch.exp(scalarizer.log_scale.detach()) * losses
        torch.testing.assert_close(scaled, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("cls", [UW, IMTLL])
def test_m_is_learnt_at_the_first_call_on_the_losses_device_and_then_fixed(cls):
    scalarizer = cls()
    assert len(list(scalarizer.parameters())) == 1
    assert scalarizer.state_dict() == {}
    scalarizer(torch.ones(4, dtype=torch.float64))
    parameter = next(scalarizer.parameters())
    assert parameter.shape == (4,) and parameter.dtype == torch.get_default_dtype()
    assert (parameter == 0).all()
    with pytest.raises(ValueError, match=f"{cls.__name__} has 4 objectives but got 3 losses"):
        scalarizer(torch.ones(3))
    scalarizer.reset()
    with pytest.raises(ValueError, match="has 4 objectives"):
        scalarizer(torch.ones(3))
    with pytest.raises(ValueError, match="has 2 objectives"):
        cls(2)(torch.ones(3))
    with pytest.raises(ValueError, match="Invalid m value: 0"):
        cls(0)


@pytest.mark.parametrize("cls", [UW, IMTLL])
def test_a_lazy_instance_moved_to_float64_creates_float64_parameters(cls):
    scalarizer = cls().to(torch.float64)
    scalarizer(torch.ones(2))
    assert next(scalarizer.parameters()).dtype == torch.float64


@pytest.mark.parametrize("cls", [UW, IMTLL])
def test_learnt_parameters_resume_from_state_dict_into_an_instance_in_an_optimizer(cls):
    trained = cls()
    _set(trained, [0.5, -0.25])
    fresh = cls()
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1)
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh(torch.ones(2)), trained(torch.ones(2)))
    optimizer.zero_grad()
    fresh(torch.ones(2)).backward()
    optimizer.step()  # the optimizer holds the parameter that was loaded into
    assert (next(fresh.parameters()) != next(trained.parameters())).all()
