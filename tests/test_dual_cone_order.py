"""UPGrad and DualProj on float32 Jacobians whose update used to depend on the rows' order.

Each Jacobian of ``tests/data/float32_order_cases.npz`` was drawn by
`tests.strategies.degenerate_jacobians` (low rank, duplicated and tiny rows, in float32) and
broke `tests.properties.aggregator_violations` for UPGrad: with its rows permuted (the stored
seed draws the permutation) the update changed by 0.002 to 0.63 times ``Σ_j |w_j| |g_j|``,
against at most 5e-6 under rounding-level noise. Their float32 Gramians have eigenvalues at
float32's rounding (some negative) whose sign and size the order of the rows decides, and
positive combinations of rows that vanish (so that the multipliers are not unique). The
dual-cone solver drops the directions below the input's rounding and takes the smallest
multipliers where the exact method's are large (the last four cases: also where quadprog refuses
the problem and Lawson and Hanson's method finishes it, whose multipliers reached 1e7 and left
the float32 update to rounding); these inputs hold it to every contract again:
no conflict, the same update in any order (within float32's tolerance of the properties),
finite output, nothing raised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.properties import aggregator_violations

DATA = np.load(Path(__file__).parent / "data" / "float32_order_cases.npz")
CASES = [
    (torch.from_numpy(DATA[f"jacobian_{i}"]), int(seed)) for i, seed in enumerate(DATA["seeds"])
]


@pytest.mark.parametrize("method", ["upgrad", "dualproj"])
@pytest.mark.parametrize("index", range(len(CASES)))
def test_contracts_hold(index: int, method: str):
    J, seed = CASES[index]
    assert J.dtype == torch.float32
    assert aggregator_violations(method, J, seed) == []
