from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import Tensor

from jdoptim import Columns, GradVac, GradVacWeighting, JDOptimizer, PCGrad

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def _reference_step(
    J: Tensor, targets: Tensor, orders: list[tuple[int, ...]], beta: float, eps: float
) -> tuple[Tensor, Tensor]:
    """One GradVac call computed on the rows themselves, for given orders of the other tasks."""
    targets = targets.clone()
    corrected = []
    for i, order in enumerate(orders):
        g = J[i].clone()
        for j in order:
            norm_g, norm_j = g.norm(), J[j].norm()
            cosine = g @ J[j] / (norm_g * norm_j)
            target = targets[i, j]
            if cosine < target:
                sine, target_sine = (1 - cosine**2).sqrt(), (1 - target**2).sqrt()
                g = (
                    g
                    + norm_g
                    * (target * sine - cosine * target_sine)
                    / (norm_j * (target_sine + eps))
                    * J[j]
                )
            targets[i, j] = (1 - beta) * target + beta * cosine
        corrected.append(g)
    return torch.stack(corrected).sum(dim=0), targets


def _all_orders(m: int) -> list[list[tuple[int, ...]]]:
    per_row = [list(itertools.permutations(sorted(set(range(m)) - {i}))) for i in range(m)]
    return [list(choice) for choice in itertools.product(*per_row)]


def test_torchjd_documented_values():
    # TorchJD 0.18 tests/unit/aggregation/test_values.py: GradVac()(J) = [0.5848, 3.8012,
    # 3.8012] and GradVacWeighting()(G) = [2.2222, 1.5789] (the first call equals PCGrad).
    torch.testing.assert_close(
        GradVac()(J_BASE),
        torch.tensor([0.5848, 3.8012, 3.8012], dtype=J_BASE.dtype),
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(
        GradVacWeighting()(J_BASE @ J_BASE.T),
        torch.tensor([2.2222, 1.5789], dtype=J_BASE.dtype),
        atol=1e-4,
        rtol=0,
    )


def test_two_objectives_over_several_calls_match_the_reference():
    generator = torch.Generator().manual_seed(0)
    aggregator = GradVac(beta=0.3)
    targets = torch.zeros(2, 2, dtype=torch.float64)
    for _ in range(6):
        J = torch.randn(2, 5, generator=generator, dtype=torch.float64)
        expected, targets = _reference_step(J, targets, [(1,), (0,)], beta=0.3, eps=1e-8)
        torch.testing.assert_close(aggregator(J), expected)
        torch.testing.assert_close(aggregator.weighting.targets, targets)


def test_three_objectives_over_two_calls_match_the_reference_for_some_orders():
    generator = torch.Generator().manual_seed(1)
    J1, J2 = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    aggregator = GradVac(beta=0.5, seed=3)
    first, second = aggregator(J1), aggregator(J2)
    zero = torch.zeros(3, 3, dtype=torch.float64)
    found = False
    for orders1 in _all_orders(3):
        update1, targets = _reference_step(J1, zero, orders1, 0.5, 1e-8)
        if not torch.allclose(update1, first):
            continue
        for orders2 in _all_orders(3):
            update2, _ = _reference_step(J2, targets, orders2, 0.5, 1e-8)
            found = found or torch.allclose(update2, second)
    assert found


def test_a_correction_reaches_the_target_cosine():
    J = torch.tensor([[1.0, 0.2, 0.0], [-0.5, 1.0, 0.3]], dtype=torch.float64)
    weighting = GradVacWeighting(eps=0.0)
    weighting._targets = torch.tensor([[0.0, 0.6], [0.6, 0.0]], dtype=torch.float64)
    weights = weighting(J @ J.T)
    # Row 0 became g1 + w g2; its cosine with g2 is now the target 0.6.
    corrected = J[0] + (weights[1] - 1.0) * J[1]
    cosine = corrected @ J[1] / (corrected.norm() * J[1].norm())
    torch.testing.assert_close(cosine, torch.tensor(0.6, dtype=torch.float64))


def test_beta_zero_keeps_zero_targets_so_every_call_is_pcgrad():
    J = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gradvac, pcgrad = GradVac(beta=0.0, eps=0.0, seed=9), PCGrad(seed=9)
    for _ in range(3):
        torch.testing.assert_close(gradvac(J), pcgrad(J))


def test_scale_invariant_unlike_an_absolute_eps():
    J = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for scale in (1e-9, 1e9):
        big, small = GradVac(seed=1), GradVac(seed=1)
        for _ in range(3):
            torch.testing.assert_close(small(J * scale), big(J) * scale)


def test_zero_rows_give_finite_weights():
    J = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    weighting = GradVacWeighting(seed=0)
    for _ in range(3):
        assert torch.isfinite(weighting(J @ J.T)).all()


def test_changing_the_number_of_objectives_reinitialises_the_targets():
    generator = torch.Generator().manual_seed(4)
    J3, J2 = torch.randn(3, 4, generator=generator), torch.randn(2, 4, generator=generator)
    aggregator = GradVac()
    aggregator(J3)
    torch.testing.assert_close(aggregator(J2), GradVac()(J2))
    assert aggregator.weighting.targets.shape == (2, 2)


def test_state_dict_into_a_fresh_instance_and_reset():
    generator = torch.Generator().manual_seed(5)
    J1, J2 = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64)
    aggregator = GradVac(seed=2)
    first = aggregator(J1)
    state = copy.deepcopy(aggregator.state_dict())
    assert state["weighting._extra_state"]["targets"].shape == (4, 4)
    restored = GradVac(seed=2)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(J2), aggregator(J2), rtol=0, atol=0)
    aggregator.reset()
    assert aggregator.weighting.targets is None
    torch.testing.assert_close(aggregator(J1), first, rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "match"), [({"beta": 1.5}, "beta"), ({"eps": -1.0}, "eps")])
def test_bad_arguments_are_rejected(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        GradVac(**kwargs)


# --- per layer, per parameter, per parameter group --------------------------------------------


def test_blocks_are_corrected_separately_with_one_order_for_all():
    # With m = 2 the orders are fixed: each block follows the reference on its own columns.
    generator = torch.Generator().manual_seed(4)
    columns = Columns((2, 3, 1), layers=("a", "b", "a"))
    aggregator = GradVac(beta=0.3, granularity="layer")
    targets = {
        "a": torch.zeros(2, 2, dtype=torch.float64),
        "b": torch.zeros(2, 2, dtype=torch.float64),
    }
    for _ in range(4):
        J = torch.randn(2, 6, generator=generator, dtype=torch.float64)
        expected = torch.empty(6, dtype=torch.float64)
        for layer, index in (("a", [0, 1, 5]), ("b", [2, 3, 4])):
            update, targets[layer] = _reference_step(
                J[:, index], targets[layer], [(1,), (0,)], 0.3, 1e-8
            )
            expected[index] = update
        torch.testing.assert_close(aggregator(J, columns=columns), expected)
    torch.testing.assert_close(
        aggregator.weighting.targets, torch.stack([targets["a"], targets["b"]])
    )


@pytest.mark.parametrize("granularity", ["parameter", "group"])
def test_each_block_is_gradvac_on_its_columns_with_the_same_random_orders(granularity: str):
    generator = torch.Generator().manual_seed(5)
    columns = Columns((3, 2, 4), groups=(0, 1, 2))
    blockwise = GradVac(seed=11, granularity=granularity)
    alone = [GradVac(seed=11) for _ in range(3)]
    for _ in range(3):
        J = torch.randn(4, 9, generator=generator, dtype=torch.float64)
        parts = [
            aggregator(J[:, start:stop])
            for aggregator, (start, stop) in zip(alone, [(0, 3), (3, 5), (5, 9)], strict=True)
        ]
        torch.testing.assert_close(blockwise(J, columns=columns), torch.cat(parts))


def test_the_optimizer_finds_the_layers_of_the_shared_module():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    heads = torch.nn.ModuleList(torch.nn.Linear(2, 1) for _ in range(3))
    x = torch.randn(8, 3, dtype=torch.float32)
    model = copy.deepcopy((trunk, heads))
    optimizer = JDOptimizer(
        torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1),
        GradVac(seed=1, granularity="layer"),
        shared_params=trunk,
    )
    features = trunk(x)
    losses = torch.stack([head(features).pow(2).mean() for head in heads])
    optimizer.backward(losses)
    # The same step by hand: the Jacobian of the trunk, aggregated with the trunk's layers.
    twin_trunk, twin_heads = model
    features = twin_trunk(x)
    twin_losses = torch.stack([head(features).pow(2).mean() for head in twin_heads])
    params = list(twin_trunk.parameters())
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in twin_losses
        ]
    )
    update = GradVac(seed=1, granularity="layer")(J, columns=Columns.of(params, twin_trunk))
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in trunk.parameters()]), update)


def test_layers_unknown_or_gramian_mode_are_clear_errors():
    model = torch.nn.Linear(3, 2)
    for shared in (None, list(model.parameters())):
        unknown = JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            GradVac(granularity="layer"),
            shared_params=shared,
        )
        with pytest.raises(ValueError, match="layers of the Jacobian's columns are not known"):
            unknown.backward(model(torch.randn(4, 3)).pow(2).mean(dim=0))
    known = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), GradVac(granularity="layer"), modules=model
    )
    known.backward(model(torch.randn(4, 3)).pow(2).mean(dim=0))
    assert known.aggregator.weighting.targets.shape == (2, 2)  # one layer
    with pytest.raises(ValueError, match="needs the Jacobian"):
        JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            GradVac(granularity="parameter"),
            mode="gramian",
            modules=model,
        )
    auto = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        GradVac(granularity="parameter"),
        mode="auto",
        modules=model,
    )
    assert auto.resolved_mode == "jacobian"
    with pytest.raises(ValueError, match="needs the layout of the Jacobian's columns"):
        GradVac(granularity="parameter")(torch.eye(2))


def test_assigning_the_granularity_restarts_the_targets():
    aggregator = GradVac(granularity="parameter")
    aggregator(torch.eye(2, dtype=torch.float64), columns=Columns((1, 1)))
    assert aggregator.weighting.targets.shape == (2, 2, 2)
    aggregator.granularity = "all"
    assert aggregator.weighting.targets is None
