"""Published values on J = [[-4, 1, 1], [6, 1, 1]].

They are the examples of the UPGrad paper's reference implementation (TorchJD 0.18 documentation),
obtained with its regularisation (norm_eps = reg_eps = 1e-4).
"""

from __future__ import annotations

import pytest
import torch

from jdoptim import IMTLG, MGDA, DualProj, UPGrad

J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
TORCHJD_EPS = {"norm_eps": 1e-4, "reg_eps": 1e-4}


@pytest.mark.parametrize(
    ("aggregator", "update", "weights"),
    [
        (UPGrad(**TORCHJD_EPS, solver="quadprog"), [0.2929, 1.9004, 1.9004], [1.1109, 0.7894]),
        (DualProj(**TORCHJD_EPS, solver="quadprog"), [0.5563, 1.1109, 1.1109], None),
        (MGDA(), [0.0, 1.0, 1.0], [0.6, 0.4]),
        (MGDA(solver="frank_wolfe"), [0.0, 1.0, 1.0], [0.6, 0.4]),
        (IMTLG(), [0.0767, 1.0, 1.0], None),
    ],
    ids=repr,
)
def test_published_values(aggregator, update, weights):
    torch.testing.assert_close(
        aggregator(J), torch.tensor(update, dtype=J.dtype), atol=1e-4, rtol=0
    )
    if weights is not None:
        torch.testing.assert_close(
            aggregator.weighting(J @ J.T), torch.tensor(weights, dtype=J.dtype), atol=1e-4, rtol=0
        )


def test_upgrad_exact_values_without_regularisation():
    # By hand: u = (1/2, 0) is projected to v = (1/2, 11/38) and u = (0, 1/2) to (11/18, 1/2),
    # so w = (1/2 + 11/18, 11/38 + 1/2) = (10/9, 15/19).
    aggregator = UPGrad(norm_eps=0.0, reg_eps=1e-12, solver="quadprog")
    expected = torch.tensor([10 / 9, 15 / 19], dtype=J.dtype)
    torch.testing.assert_close(aggregator.weighting(J @ J.T), expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(aggregator(J), expected @ J, atol=1e-9, rtol=0)


def test_mgda_exact_weights():
    # min over a of |a g1 + (1 - a) g2|^2: the first coordinate 6 - 10a vanishes at a = 3/5.
    expected = torch.tensor([0.6, 0.4], dtype=J.dtype)
    torch.testing.assert_close(MGDA().weighting(J @ J.T), expected, rtol=0, atol=1e-15)
    frank_wolfe = MGDA(solver="frank_wolfe", epsilon=0.0, max_iters=10_000).weighting(J @ J.T)
    torch.testing.assert_close(frank_wolfe, expected)


def test_imtlg_projections_on_unit_gradients_are_equal():
    update = IMTLG()(J)
    projections = (J @ update) / J.norm(dim=1)
    torch.testing.assert_close(projections[0], projections[1])
