"""Freezing parameters by name (optim.freeze): fine-tune part of a model, e.g. everything but the embeddings.

Frozen parameters get requires_grad=False before the optimizer is built, so they have no gradient, no
optimizer state and no weight decay, and the gradient clipping never sees them.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from latentforge.errors import ConfigError


def freeze(model: nn.Module, patterns: list[str]) -> int:
    """Freeze the parameters whose name (as in model.named_parameters(), e.g. `layers.0.attention.wq.weight`)
    matches one of the fnmatch patterns; returns how many numbers were frozen. A pattern that matches no
    parameter, or patterns that freeze everything, are a ConfigError."""
    if not patterns:
        return 0
    # remove_duplicate=False: a tied weight can be named by either of its names.
    named = list(model.named_parameters(remove_duplicate=False))
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name, _ in named):
            examples = ", ".join(name for name, _ in named[:4])
            raise ConfigError(f"optim.freeze pattern {pattern!r} matches no parameter of the model "
                              f"(names look like: {examples}, ...)")
    frozen = {id(p): p for name, p in named if any(fnmatchcase(name, pattern) for pattern in patterns)}
    if len(frozen) == len({id(p) for _, p in named}):
        raise ConfigError(f"optim.freeze {patterns} freezes every parameter: nothing would be trained")
    for p in frozen.values():
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen.values())
