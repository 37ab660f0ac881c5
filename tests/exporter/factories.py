"""Tiny ``module.path:factory`` sources for tests/exporter/test_convert.py."""

from __future__ import annotations

import torch


class TinyTagger(torch.nn.Module):
    """Token embedding, masked; per-token logits and a masked mean."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        hidden = torch.tanh(self.embed(input_ids)) * mask
        pooled = hidden.sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(hidden), pooled


class TinyRegressor(torch.nn.Module):
    """A float input of fixed width; one tensor out."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layer(features))


def tiny_tagger() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    inputs = {
        # the attention_mask is given first: the exporter orders inputs as forward() does
        "attention_mask": torch.ones(2, 6, dtype=torch.int64),
        "input_ids": torch.randint(0, 50, (2, 6)),
    }
    return TinyTagger(), inputs


def tiny_regressor() -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, list[int]]]:
    torch.manual_seed(0)
    return TinyRegressor(), {"features": torch.randn(1, 8)}, {"features": [0], "output": [0]}


def not_a_model() -> tuple[str, dict[str, torch.Tensor]]:
    return "model", {"x": torch.zeros(1)}
