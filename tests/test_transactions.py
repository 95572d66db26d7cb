"""A step either happens or changes nothing: faults injected into real steps, over the registry.

For every registered aggregator and scalarizer (stateful and randomised ones above all, with the
stateful weightings that have no aggregator of their own), and every kind of fault (an exception
in the model's backward pass, in the method, in a diagnostics hook, a refused non-finite update
under ``nonfinite="raise"`` and ``"skip"``, ``KeyboardInterrupt`` at each stage up to the writing
of ``.grad``): the parameters, ``.grad``, the inner optimizer's state, the queued Jacobians,
every method's state and torch's global generator are bit-identical to before the fault, and the
next normal step equals the same step in a run that never saw the fault.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import jdoptim
import jdoptim.optimizer as optimizer_module
from jdoptim import JDOptimizer, NonFiniteError, get_spec
from jdoptim.aggregation import GramianWeightedAggregator, WeightedAggregator

pytestmark = pytest.mark.usefixtures("float64")

M = 4  # objectives


class _InjectedError(Exception):
    """The injected failure."""


class _Trap(torch.autograd.Function):
    """The identity, whose backward pass raises ``armed`` when it is set."""

    armed: type[BaseException] | None = None

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if _Trap.armed is not None:
            raise _Trap.armed("injected in the model's backward pass")
        return grad


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.head = nn.Linear(8, M)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(_Trap.apply(self.trunk(x)))


def _batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 5, generator=generator), torch.randn(12, M, generator=generator)


def _losses(model: nn.Module, step: int) -> Tensor:
    x, y = _batch(step)
    return ((model(x) - y) ** 2).mean(dim=0) + 0.1


def _method(name: str) -> nn.Module:
    spec = get_spec(name)
    method = spec.example(M)
    if spec.kind == "weighting":
        wrapper = WeightedAggregator if method.needs_jacobian else GramianWeightedAggregator
        return wrapper(method)
    return method


def _names() -> list[str]:
    aggregators = set(jdoptim.list_aggregators())
    weightings = [
        name
        for name in jdoptim.list_weightings()
        if get_spec(name).stateful and name.removesuffix("weighting") not in aggregators
    ]
    return [*jdoptim.list_aggregators(), *weightings, *jdoptim.list_scalarizers()]


NAMES = _names()
GRAMIAN_NAMES = [
    name for name in NAMES if name in jdoptim.list_aggregators() and get_spec(name).gramian_based
]


def _make(name: str, mode: str = "jacobian", method: nn.Module | None = None, **options: Any):
    torch.manual_seed(0)
    model = _Net()
    method = _method(name) if method is None else method
    params = [*model.parameters(), *method.parameters()]
    inner = torch.optim.Adam(params, lr=0.01)
    optimizer = JDOptimizer(inner, method, mode=mode, modules=model, **options)
    return model, optimizer


# --- what a fault must leave unchanged --------------------------------------------------------


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(item) for item in value]
    return copy.deepcopy(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _everything(model: nn.Module, optimizer: JDOptimizer) -> dict[str, Any]:
    method = optimizer.aggregator
    return _copy(
        {
            "params": [p.detach() for p in model.parameters()],
            "grads": [p.grad for p in model.parameters()],
            "inner": optimizer.optimizer.state_dict(),
            "pending": [
                (pieces.matrix, list(pieces.own.values()), pieces.finite)
                for pieces in optimizer._pending
            ],
            "method": method.state_dict(),
            "method_params": [p.detach() for p in method.parameters() if not _lazy(p)],
            "rng": torch.get_rng_state(),
            "skip": optimizer._skip_next_step,
        }
    )


def _lazy(param: Tensor) -> bool:
    return isinstance(param, nn.parameter.UninitializedParameter)


def _assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        assert _same(before[key], after[key]), f"{key} changed"


# --- the faults --------------------------------------------------------------------------------


def _called(optimizer: JDOptimizer) -> nn.Module:
    """The module the step calls: the aggregator, its weighting in gramian mode, or the
    scalarizer."""
    if optimizer.resolved_mode == "gramian":
        return optimizer.aggregator.weighting
    return optimizer.aggregator


def _in_model(error: type[BaseException]) -> Callable:
    def inject(optimizer, monkeypatch):
        monkeypatch.setattr(_Trap, "armed", error)

    return inject


def _in_method(error: type[BaseException]) -> Callable:
    def raise_after_forward(module, args, output):
        raise error("injected in the method, after it ran")

    def inject(optimizer, monkeypatch):
        for module in optimizer.aggregator.modules():
            module.register_forward_hook(raise_after_forward)

    return inject


def _in_hook(error: type[BaseException]) -> Callable:
    def hook(optimizer, report):
        raise error("injected in a diagnostics hook")

    def inject(optimizer, monkeypatch):
        optimizer.register_diagnostics_hook(hook)

    return inject


def _non_finite(optimizer, monkeypatch):
    _called(optimizer).register_forward_hook(lambda module, args, output: output * float("nan"))


def _in_commit(optimizer, monkeypatch):
    write = optimizer_module._write_grads

    class Interrupted(dict):
        def items(self):
            for i, item in enumerate(super().items()):
                if i == 2:
                    raise KeyboardInterrupt("injected while .grad is written")
                yield item

    monkeypatch.setattr(optimizer_module, "_write_grads", lambda grads: write(Interrupted(grads)))


FAULTS = {
    "model": (_in_model(_InjectedError), _InjectedError),
    "method": (_in_method(_InjectedError), _InjectedError),
    "hook": (_in_hook(_InjectedError), _InjectedError),
    "refused": (_non_finite, NonFiniteError),
    "interrupt-model": (_in_model(KeyboardInterrupt), KeyboardInterrupt),
    "interrupt-method": (_in_method(KeyboardInterrupt), KeyboardInterrupt),
    "interrupt-hook": (_in_hook(KeyboardInterrupt), KeyboardInterrupt),
    "interrupt-commit": (_in_commit, KeyboardInterrupt),
}


def _cases(names: list[str], faults: list[str]) -> list[tuple[str, str]]:
    """(method, fault) pairs: interrupts take the path of other exceptions, so they are injected
    into the methods with state (and one without); scalarizers have no diagnostics hook."""
    return [
        (name, fault)
        for name in names
        for fault in faults
        if not ("hook" in fault and get_spec(name).kind == "scalarizer")
        and not ("interrupt" in fault and not get_spec(name).stateful and name != "upgrad")
    ]


def _check_fault(name: str, fault: str, mode: str, monkeypatch) -> None:
    """Step once, fail the second step, then take it normally; compare with a run without the
    fault."""
    inject, error = FAULTS[fault]
    model, optimizer = _make(name, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Nash-MTL's solver on tiny problems
        optimizer.zero_grad()
        optimizer.step(_losses(model, 0))
        optimizer.zero_grad()
        before = _everything(model, optimizer)
        with monkeypatch.context() as patch:
            inject(optimizer, patch)
            with pytest.raises(error):
                optimizer.step(_losses(model, 1))
        for module in optimizer.aggregator.modules():
            module._forward_hooks.clear()
        optimizer._diagnostics_hooks.clear()
        _assert_unchanged(before, _everything(model, optimizer))
        optimizer.step(_losses(model, 1))

        reference_model, reference = _make(name, mode)
        for step in (0, 1):
            reference.zero_grad()
            reference.step(_losses(reference_model, step))
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert _same(optimizer.aggregator.state_dict(), reference.aggregator.state_dict())


@pytest.mark.parametrize(("name", "fault"), _cases(NAMES, list(FAULTS)))
def test_a_failed_step_changes_nothing(name, fault, monkeypatch):
    _check_fault(name, fault, "jacobian", monkeypatch)


@pytest.mark.parametrize(
    ("name", "fault"), _cases(GRAMIAN_NAMES, ["model", "method", "refused", "interrupt-commit"])
)
def test_a_failed_step_changes_nothing_in_gramian_mode(name, fault, monkeypatch):
    _check_fault(name, fault, "gramian", monkeypatch)


@pytest.mark.parametrize("name", NAMES)
def test_a_skipped_step_changes_nothing_and_the_next_step_is_normal(name):
    model, optimizer = _make(name, nonfinite="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer.step(_losses(model, 0))
        optimizer.zero_grad()
        before = _everything(model, optimizer)
        handle = _called(optimizer).register_forward_hook(
            lambda module, args, output: output * float("nan")
        )
        with pytest.warns(UserWarning, match="Skipping the step"):
            assert optimizer.step(_losses(model, 1)) is None
        handle.remove()
        after = _everything(model, optimizer)
        before["skip"] = after["skip"] = None  # the skip is recorded, and already consumed
        _assert_unchanged(before, after)
        optimizer.zero_grad()
        optimizer.step(_losses(model, 1))
        reference_model, reference = _make(name)
        for step in (0, 1):
            reference.zero_grad()
            reference.step(_losses(reference_model, step))
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


# --- accumulated Jacobians ------------------------------------------------------------------

STATEFUL = [name for name in NAMES if get_spec(name).stateful]


@pytest.mark.parametrize("name", STATEFUL)
def test_a_failed_aggregation_keeps_the_queue_and_a_skipped_one_drops_the_whole_step(name):
    model, optimizer = _make(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer.step(_losses(model, 0))
        optimizer.zero_grad()
        start = _everything(model, optimizer)
        optimizer.backward(_losses(model, 1), aggregate=False)
        queued = _everything(model, optimizer)
        assert len(queued["pending"]) == 1
        handle = _called(optimizer).register_forward_hook(
            lambda module, args, output: output * float("nan")
        )
        with pytest.raises(NonFiniteError):
            optimizer.backward(_losses(model, 2))
        _assert_unchanged(queued, _everything(model, optimizer))
        optimizer.nonfinite = "skip"
        with pytest.warns(UserWarning, match="Skipping the step"):
            optimizer.backward(_losses(model, 2))
        handle.remove()
        skipped = _everything(model, optimizer)
        assert skipped["skip"] and skipped["pending"] == []
        start["skip"] = skipped["skip"] = None
        # torch's global generator is put back as it was before the skipped call only: the
        # model's forward passes of the queued micro-batches may have drawn from it since.
        start["rng"] = skipped["rng"] = None
        _assert_unchanged(start, skipped)


@pytest.mark.parametrize("name", [name for name in STATEFUL if "scalarization" in name])
def test_zero_grad_forgets_what_queued_losses_changed_in_a_scalarizer(name):
    model, optimizer = _make(name)
    optimizer.step(_losses(model, 0))
    optimizer.zero_grad()
    before = _everything(model, optimizer)
    optimizer.backward(_losses(model, 1), aggregate=False)
    optimizer.backward(_losses(model, 2), aggregate=False)
    optimizer.zero_grad()
    after = _everything(model, optimizer)
    before["rng"] = after["rng"] = None  # torch's global generator is the training loop's
    _assert_unchanged(before, after)


def test_a_micro_batch_of_another_shape_is_refused_at_once_and_not_queued():
    model, optimizer = _make("upgrad")
    optimizer.backward(_losses(model, 0), aggregate=False)
    queued = _everything(model, optimizer)
    with pytest.raises(ValueError, match=r"shapes \[\(2, \d+\), \(4, \d+\)\]"):
        optimizer.backward(_losses(model, 1)[:2], aggregate=False)
    _assert_unchanged(queued, _everything(model, optimizer))
    optimizer.backward(_losses(model, 1), aggregate=False)  # the queue still works
    assert len(optimizer._pending) == 2


# --- the reproductions --------------------------------------------------------------


def test_a_raising_diagnostics_hook_leaves_no_stale_jacobian_for_the_next_step():
    model, optimizer = _make("upgrad", diagnostics=True)

    def hook(optimizer, report):
        raise RuntimeError("a logging failure")

    handle = optimizer.register_diagnostics_hook(hook)
    with pytest.raises(RuntimeError, match="logging"):
        optimizer.step(_losses(model, 0))
    handle.remove()
    optimizer.step(_losses(model, 0))
    reference_model, reference = _make("upgrad")
    reference.step(_losses(reference_model, 0))
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert optimizer.last_diagnostics is not None


OVERFLOWING = {
    "excessmtl": lambda: jdoptim.ExcessMTL(),
}
"""Methods whose own arithmetic overflows on a row of 1e22 (its square is out of float32's
range), so that the step is refused after the method has run."""

FORMERLY_OVERFLOWING = {
    "sdmgrad": lambda: GramianWeightedAggregator(jdoptim.build("sdmgradweighting")),
    "crmogm(mgda)": lambda: jdoptim.build(
        {"name": "crmogm", "weighting": {"name": "mgdaweighting"}}
    ),
    "gradvac": lambda: jdoptim.GradVac(seed=3),
    "nashmtl": lambda: jdoptim.NashMTL(),
}
"""Methods that were refused on such a row while the Gramian overflowed; it is now formed in
float64 there."""


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("make", list(OVERFLOWING.values()), ids=list(OVERFLOWING))
def test_a_row_that_overflows_the_method_does_not_block_it(make, policy):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model, method = _Net(), make()
    optimizer = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), method, nonfinite=policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer.step(_losses(model, 0))
        state = _copy(method.state_dict())
        optimizer.zero_grad()
        huge = _losses(model, 1) * torch.tensor([1.0, 1e22, 1.0, 1.0])
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="non-finite update"):
                optimizer.step(huge)
        else:
            with pytest.warns(UserWarning, match="non-finite update"):
                optimizer.step(huge)
        assert _same(state, method.state_dict())
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            optimizer.step(_losses(model, 1))  # neither refused nor skipped


@pytest.mark.parametrize(
    "make", list(FORMERLY_OVERFLOWING.values()), ids=list(FORMERLY_OVERFLOWING)
)
def test_a_row_of_1e22_is_aggregated_without_overflow(make):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model, method = _Net(), make()
    optimizer = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1e-30), method)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        optimizer.step(_losses(model, 0))
        optimizer.zero_grad()
        optimizer.step(_losses(model, 1) * torch.tensor([1.0, 1e22, 1.0, 1.0]))
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        optimizer.zero_grad()
        optimizer.step(_losses(model, 1))


# --- after the commit point -----------------------------------------------------------------


def test_when_the_inner_step_raises_the_update_stays_in_grad_and_step_retries():
    model, optimizer = _make("gradvac")
    optimizer.step(_losses(model, 0))
    optimizer.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]

    def broken(*args, **kwargs):
        raise _InjectedError("injected in the inner optimizer's step")

    optimizer.optimizer.step = broken
    with pytest.raises(_InjectedError):
        optimizer.step(_losses(model, 1))
    del optimizer.optimizer.step
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(p.grad is not None for p in model.parameters()) and optimizer._pending == []
    optimizer.step()  # steps with the update already in .grad

    reference_model, reference = _make("gradvac")
    for step in (0, 1):
        reference.zero_grad()
        reference.step(_losses(reference_model, step))
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_closure_that_fails_before_the_inner_optimizer_moves_changes_nothing():
    model, optimizer = _make("gradvac")
    optimizer.step(_losses(model, 0))
    before = _everything(model, optimizer)

    def closure():
        losses = _losses(model, 1)
        _Trap.armed = _InjectedError
        return losses

    try:
        with pytest.raises(_InjectedError):
            optimizer.step(closure=closure)
    finally:
        _Trap.armed = None
    _assert_unchanged(before, _everything(model, optimizer))


@pytest.mark.parametrize("shared", [False, True], ids=["all", "shared_params"])
def test_the_fallback_to_one_backward_pass_per_loss_is_taken_only_for_vmap(monkeypatch, shared):
    model, optimizer = _make("upgrad")
    if shared:  # the trap is in the shared part, batched over the losses
        optimizer.shared_params = model.trunk
    monkeypatch.setattr(_Trap, "armed", RuntimeError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="injected in the model"):
            optimizer.step(_losses(model, 0))  # fails batched and per loss: the model's error
    monkeypatch.setattr(_Trap, "armed", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step(_losses(model, 0))  # still batched: no warning
    assert optimizer._path.batched is True


# --- load_state_dict: everything checked before anything changes ------------------------------


def _first_tensor(state: Any, dtypes: tuple[torch.dtype, ...]) -> tuple[Any, Any]:
    """(container, key) of the first tensor of one of ``dtypes`` in a nested state."""
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for key, value in items:
        if isinstance(value, Tensor) and value.dtype in dtypes:
            return state, key
        if isinstance(value, (dict, list)):
            try:
                return _first_tensor(value, dtypes)
            except LookupError:
                pass
    raise LookupError(f"no tensor of {dtypes}")


def _damage_method_tensor(
    change: Callable[[Tensor], Tensor], dtypes: tuple[torch.dtype, ...] = (torch.float64,)
) -> Callable:
    def damage(state):
        container, key = _first_tensor(state["jdoptim"]["aggregator_state"], dtypes)
        container[key] = change(container[key])
        return state

    return damage


def _drop_first_method_key(state, lazy=("loss_sum", "history", "logits", "exp_avg", "pending")):
    """Drop a key, other than those of state created at the first call (whose absence means
    "not created yet")."""
    method_state = state["jdoptim"]["aggregator_state"]
    del method_state[next(key for key in method_state if not key.startswith(lazy))]
    return state


def _set(path: tuple, value: Any) -> Callable:
    def damage(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return state

    return damage


def _delete(path: tuple) -> Callable:
    def damage(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return state

    return damage


def _exp_avg_shape(state):
    state["state"][0]["exp_avg"] = state["state"][0]["exp_avg"].T.contiguous()
    return state


def _group_count(state):
    state["param_groups"].append(copy.deepcopy(state["param_groups"][0]))
    return state


def _group_size(state):
    state["param_groups"][0]["params"].pop()
    return state


def _unknown_param(state):
    state["state"][999] = copy.deepcopy(state["state"][0])
    return state


def _other_method(state):
    state["jdoptim"]["aggregator"] = None  # as an unregistered aggregator saves it
    state["jdoptim"]["aggregator_state"] = {"weighting._extra_state": {"targets": torch.eye(M)}}
    return state


DAMAGES = {
    "truncated": (_delete(("jdoptim", "aggregator_state")), "truncated"),
    "empty-jdoptim-entry": (_set(("jdoptim",), {}), "truncated"),
    "jdoptim-entry-not-a-mapping": (_set(("jdoptim",), 3), "truncated"),
    "other-config": (_set(("jdoptim", "aggregator"), {"name": "mean"}), "saved with"),
    "other-method-state": (_other_method, "aggregator_state"),
    "method-key-missing": (_drop_first_method_key, "Missing key"),
    "method-key-unexpected": (_set(("jdoptim", "aggregator_state", "bogus"), 1), "bogus"),
    "method-state-nan": (_damage_method_tensor(lambda t: t * float("nan")), "not finite"),
    "method-state-integer": (_damage_method_tensor(lambda t: t.long()), "tensor of torch.int64"),
    "method-state-dimensions": (_damage_method_tensor(lambda t: t[None]), "-D"),
    "method-generator-state": (
        _damage_method_tensor(lambda t: t[: t.numel() // 2], (torch.uint8,)),
        "does not fit",
    ),
    "inner-no-state": (_delete(("state",)), "'state'"),
    "inner-group-count": (_group_count, "2 parameter groups"),
    "inner-group-size": (_group_size, "Parameter group 0 has"),
    "inner-unknown-parameter": (_unknown_param, "999"),
    "inner-state-shape": (_exp_avg_shape, "'exp_avg' of parameter 0 has shape"),
}
CHECKPOINTED = {
    "upgrad": jdoptim.UPGrad,
    "gradvac-seeded": lambda: jdoptim.GradVac(seed=5),
    "excessmtl": jdoptim.ExcessMTL,
    "nashmtl": jdoptim.NashMTL,
    "crmogm": lambda: jdoptim.CRMOGM(jdoptim.UPGradWeighting()),
    "random-seeded": lambda: jdoptim.Random(seed=5),
    "famo": jdoptim.scalarization.FAMO,
    "dwa": jdoptim.scalarization.DWA,
    "uw": lambda: jdoptim.scalarization.UW(m=M),
    "gradnorm": lambda: jdoptim.GradNorm(lr=0.1, n_warmup_steps=1),
    "moco": jdoptim.MoCo,
    "imtl": jdoptim.IMTL,
}


WITHOUT_FLOATING_STATE = {"upgrad", "random-seeded"}
WITH_GENERATOR = {"gradvac-seeded", "random-seeded"}


def _damage_cases() -> list[tuple[str, str]]:
    """(method, damage) pairs where the method has state of the kind the damage breaks."""
    cases = []
    for name in CHECKPOINTED:
        for damage in DAMAGES:
            if damage == "method-generator-state":
                applies = name in WITH_GENERATOR
            elif damage == "method-key-missing":
                applies = name != "upgrad"
            elif damage.startswith("method-state"):
                applies = name not in WITHOUT_FLOATING_STATE
            else:
                applies = True
            if applies:
                cases.append((name, damage))
    return cases


@pytest.mark.parametrize(("name", "damage"), _damage_cases())
def test_a_damaged_state_dict_is_refused_before_anything_changes(name, damage):
    damage_fn, match = DAMAGES[damage]
    model, optimizer = _make(name, method=CHECKPOINTED[name]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer.step(_losses(model, 0))
        saved = _copy(optimizer.state_dict())
        optimizer.zero_grad()
        optimizer.step(_losses(model, 1))
        damaged = damage_fn(_copy(saved))
        before = _everything(model, optimizer)
        with pytest.raises(ValueError, match=match):
            optimizer.load_state_dict(damaged)
        _assert_unchanged(before, _everything(model, optimizer))
        optimizer.load_state_dict(_copy(saved))  # the intact checkpoint still loads


def test_the_inner_optimizer_is_restored_if_the_method_fails_to_load_after_it(monkeypatch):
    model, optimizer = _make("gradvac")
    optimizer.step(_losses(model, 0))
    saved = _copy(optimizer.state_dict())
    optimizer.step(_losses(model, 1))
    before = _everything(model, optimizer)

    def interrupted(state, strict=True):
        raise KeyboardInterrupt("injected while the method loads")

    monkeypatch.setattr(optimizer.aggregator, "load_state_dict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimizer.load_state_dict(saved)
    _assert_unchanged(before, _everything(model, optimizer))


# --- arguments checked at construction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"process_group": 3}, TypeError, "Invalid process_group value: 3"),
        ({"diagnostics": "no"}, TypeError, "Invalid diagnostics value: 'no'"),
        ({"local_weighting": 1}, TypeError, "Invalid local_weighting value: 1"),
        ({"batch_dim": -1}, ValueError, "Invalid batch_dim value: -1"),
    ],
)
def test_constructor_arguments_are_checked_at_construction(options, error, match):
    model = _Net()
    with pytest.raises(error, match=match):
        JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), jdoptim.UPGrad(), **options)


def test_backward_flags_must_be_booleans():
    model, optimizer = _make("upgrad")
    with pytest.raises(TypeError, match="Invalid aggregate value: 'no'"):
        optimizer.backward(_losses(model, 0), aggregate="no")
    with pytest.raises(TypeError, match="Invalid retain_graph value: None"):
        optimizer.backward(_losses(model, 0), retain_graph=None)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, True])
def test_seeds_torch_cannot_take_are_refused_at_construction(seed):
    with pytest.raises(ValueError, match="Invalid seed value"):
        jdoptim.Random(seed=seed)
    jdoptim.Random(seed=2**64 - 1)(torch.ones(2, 3))
    jdoptim.Random(seed=-(2**63))(torch.ones(2, 3))


def test_aggregating_no_jacobian_is_a_clear_error():
    with pytest.raises(ValueError, match="jacobians is empty"):
        jdoptim.functional.aggregate([], jdoptim.UPGrad())
