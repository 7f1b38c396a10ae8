"""Linear probes: how much of a discrete variable a representation holds, read by a linear map.

Features are standardized with the training part's statistics; `ridge` regresses one-hot labels in
closed form, `logistic` fits a multinomial logistic regression with L-BFGS from zero (no
randomness: the same features give the same probe).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ProbeMethod = Literal["logistic", "ridge"]


def _standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    ones = torch.ones(1, device=train.device)
    # A constant column carries the bias.
    return (torch.cat([(train - mean) / std, ones.expand(len(train), 1)], 1),
            torch.cat([(test - mean) / std, ones.expand(len(test), 1)], 1))


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, classes: int,
                     method: ProbeMethod = "logistic", l2: float = 1e-3, steps: int = 100) -> torch.Tensor:
    """Weights (features + 1, classes) of a probe from standardized features to labels."""
    if method == "ridge":
        targets = F.one_hot(train_y, classes).double()
        x = train_x.double()
        gram = x.T @ x + l2 * len(x) * torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
        return torch.linalg.solve(gram, x.T @ targets).float()
    weights = torch.zeros(train_x.shape[1], classes, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weights, train_y) + l2 * weights[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weights.detach()


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   classes: int, method: ProbeMethod = "logistic") -> float:
    """Held-out accuracy of a linear probe fitted on (train_x, train_y)."""
    train_x, test_x = _standardize(train_x.float(), test_x.float())
    weights = fit_linear_probe(train_x, train_y, classes, method)
    return float(((test_x @ weights).argmax(1) == test_y).float().mean())
