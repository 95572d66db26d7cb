"""Reference computations for the Gramian engine's tests: the Jacobian, explicitly."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from jdoptim import MeanWeighting, UPGradWeighting, Weighting
from jdoptim.functional import jacobian
from jdoptim.gramian import GramianEngine

RTOL = 1e-10


def assert_close(
    actual: Tensor, expected: Tensor, what: str, rtol: float = RTOL, scale: float | None = None
) -> None:
    """Norm-wise relative closeness: ``‖actual − expected‖ ≤ rtol · scale``, where the scale is
    ``‖expected‖`` unless given (for a part of a larger vector that may vanish)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    error = (actual - expected).norm().item()
    scale = expected.norm().item() if scale is None else scale
    assert error <= rtol * max(scale, 1e-300), f"{what}: error {error:.3e}, norm {scale:.3e}"


def trainable(modules: nn.Module | Iterable[nn.Module]) -> list[Tensor]:
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    seen: dict[int, Tensor] = {}
    for root in roots:
        for p in root.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def check_against_jacobian(
    model: nn.Module,
    make_losses: Callable[[], Tensor],
    *,
    modules: nn.Module | Iterable[nn.Module] | None = None,
    batch_dim: int | None = 0,
    batched: bool | None = None,
    weightings: Iterable[Weighting] = (MeanWeighting(), UPGradWeighting()),
    expect_unreached: Iterable[Tensor] = (),
) -> None:
    """Check the engine's Gramian, weights and every ``.grad`` against the explicit Jacobian.

    The Gramian is compared with ``J Jᵀ`` over the trainable parameters of ``modules`` (the
    model by default); the gradients of every trainable parameter of the model with
    ``w @ J``. Existing gradients must be added to.
    """
    hooked = trainable(model if modules is None else modules)
    params = trainable(model)
    unreached = {id(p) for p in expect_unreached}
    by_param: dict[int, Tensor | None] = {}
    with GramianEngine(model if modules is None else modules, batch_dim=batch_dim) as engine:
        for weighting in weightings:
            for p in params:
                p.grad = None
            losses = make_losses()
            m = losses.numel()
            if not by_param:  # the parameters do not change between the iterations
                jacobians = jacobian(losses.reshape(-1), params, retain_graph=True)
                by_param = {id(p): jac for p, jac in zip(params, jacobians, strict=True)}
                for p in params:
                    assert (by_param[id(p)] is None) == (id(p) in unreached), "reachability"
                J = torch.cat(
                    [by_param[id(p)].reshape(m, -1) for p in hooked if by_param[id(p)] is not None],
                    dim=1,
                )
                G_ref = J @ J.T
            G = engine.gramian(losses, batched=batched)
            assert_close(G, G_ref, "Gramian")
            w_ref = weighting(G_ref)
            w = weighting(G)
            # Weights are not unique where rows repeat: compare what they do, Jᵀw, in G's norm.
            difference = w - w_ref
            error = float(difference @ G_ref @ difference) ** 0.5
            size = float(w_ref @ G_ref @ w_ref) ** 0.5
            name = type(weighting).__name__
            assert error <= RTOL * max(size, 1e-300), (
                f"{name}: Jᵀw off by {error:.3e} of {size:.3e}"
            )
            previous = {}
            for i, p in enumerate(params):
                if i % 2 == 0 and id(p) not in unreached:
                    previous[id(p)] = torch.randn_like(p)
                    p.grad = previous[id(p)].clone()
            engine.backward(w)
            update = torch.cat(
                [(w_ref @ jac.reshape(m, -1)) for jac in by_param.values() if jac is not None]
            )
            for p in params:
                jac = by_param[id(p)]
                if jac is None:
                    assert p.grad is None, "a parameter no loss reaches got a .grad"
                    continue
                expected = (w_ref @ jac.reshape(m, -1)).view(p.shape)
                if id(p) in previous:
                    expected = expected + previous[id(p)]
                assert p.grad is not None, f"no .grad for a parameter of shape {p.shape}"
                what = f".grad of a parameter of shape {tuple(p.shape)}"
                assert_close(p.grad, expected, what, scale=update.norm().item())
