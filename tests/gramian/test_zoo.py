"""The Gramian engine against the explicit Jacobian on a zoo of models, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as nnf

from tests.gramian._reference import check_against_jacobian

B = 6


@pytest.fixture(autouse=True)
def _float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)


def per_sample_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: nnf.cross_entropy(model(x), y, reduction="none")


def test_mlp():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y))


def test_mlp_inplace_activation():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y))


def test_cnn_with_group_norm():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 4, (3, 2), padding="same", dilation=2, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    x, y = torch.randn(B, 3, 7, 7), torch.randint(0, 3, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y))


def test_conv1d_and_batch_norm_in_eval_mode():
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Conv1d(4, 4, 2, dilation=2, groups=4, padding=1, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(4 * 5, 2),
    )
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model[1].eval()
    x, y = torch.randn(B, 2, 9), torch.randint(0, 2, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y))


def test_conv_with_few_positions_and_iwmtl():
    # Few positions and many weights: the weighted gradient is recomputed from the factors.
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(8, 6, 3),
        nn.Flatten(),
        nn.Linear(24, 3),
    )
    x, y = torch.randn(B, 8, 4, 4), torch.randn(B, 3)
    check_against_jacobian(model, lambda: (model(x) - y) ** 2)  # [B, 3]


def test_linear_on_sequences():
    # Materialised gradients larger than the layer's inputs and output gradients.
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    head = nn.Linear(16, 3)
    x, y = torch.randn(B, 6, 16), torch.randint(0, 3, (B,))
    full = nn.ModuleList([model, head])
    check_against_jacobian(
        full, lambda: nnf.cross_entropy(head(model(x).mean(dim=1)), y, reduction="none")
    )


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, d: int, classes: int = 3) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_transformer_encoder_layer():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    model = Classifier(layer, 8)
    x, y = torch.randn(B, 5, 8), torch.randint(0, 3, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y))


def test_text_model_embedding_mean_pool():
    model = Classifier(nn.Embedding(11, 6, padding_idx=0), 6)
    x, y = torch.randint(0, 11, (B, 7)), torch.randint(0, 3, (B,))
    x[0, :3] = 0
    x[1] = x[2]  # repeated tokens across samples
    check_against_jacobian(model, per_sample_ce(model, x, y))


class Residual(nn.Module):
    def __init__(self, d: int, rms: bool = False) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d) if rms else nn.LayerNorm(d)
        self.inner = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(self.norm(x))


def test_residual_block():
    model = nn.Sequential(nn.Linear(4, 6), Residual(6), Residual(6, rms=True), nn.Linear(6, 3))
    x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y))


class Reuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(torch.tanh(self.shared(x))))


def test_linear_called_twice():
    model = Reuse()
    x, y = torch.randn(B, 5), torch.randint(0, 2, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 9, bias=False)
        self.decode.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.tanh(self.mix(self.embed(x))).mean(dim=1))


def test_weight_tied_embedding_and_linear():
    model = Tied()
    x, y = torch.randint(0, 9, (B, 3)), torch.randint(0, 9, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y))


def test_frozen_layers():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 3))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y))
    assert model[0].weight.grad is None and model[2].bias.grad is None


class ThreeHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], dim=1)


def test_iwmtl_three_heads():
    model = ThreeHeads()
    x, y = torch.randn(B, 4), torch.randn(B, 3)
    check_against_jacobian(model, lambda: (model(x) - y) ** 2)  # [B, 3]


def test_task_losses_averaged_over_the_batch():
    model = ThreeHeads()
    x, y = torch.randn(B, 4), torch.randn(B, 3)
    losses = lambda: ((model(x) - y) ** 2).mean(dim=0)  # noqa: E731  [3]
    check_against_jacobian(model, losses)
    check_against_jacobian(model, losses, batch_dim=None)


def test_batch_norm_in_training_mode_with_task_losses():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(9, 2))
    x, y = torch.randn(B, 2, 5), torch.randn(B, 2)
    check_against_jacobian(model, lambda: ((model(x) - y) ** 2).mean(dim=0), batch_dim=None)


def test_per_sample_losses_in_general_mode():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 2))
    x, y = torch.randn(B, 2, 5), torch.randint(0, 2, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y), batch_dim=None)
    check_against_jacobian(model, per_sample_ce(model, x, y), batched=False)


def test_partial_jd_on_the_last_layers():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    check_against_jacobian(model, per_sample_ce(model, x, y), modules=[model[2], model[4]])


class Scaled(nn.Module):
    """A module with a direct parameter around hooked children."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.5, 2.0, 1.5]))
        self.inner = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


def test_fallback_for_direct_parameters_and_lstm():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.scaled = Scaled()
            self.out = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(x)
            return self.out(torch.tanh(self.scaled(h[:, -1])))

    model = Model()
    x, y = torch.randn(B, 5, 3), torch.randint(0, 2, (B,))
    with pytest.warns(UserWarning, match="one sample at a time"):
        check_against_jacobian(model, per_sample_ce(model, x, y))


def test_unreached_head_keeps_no_grad():
    model = ThreeHeads()
    x, y = torch.randn(B, 4), torch.randn(B, 2)

    def losses() -> torch.Tensor:
        h = model.trunk(x)
        model.heads[2](h)  # computed, but no loss uses it
        return torch.cat([model.heads[0](h), model.heads[1](h)], dim=1) - y

    check_against_jacobian(model, losses, expect_unreached=list(model.heads[2].parameters()))
