"""Text generation from a decoder LM: greedy at temperature 0, else sampling with top-k / top-p.

Sampling draws from a torch.Generator seeded per call, so one seed gives one text whatever else used the
global RNG; with the KV cache each step feeds one token, without it the whole sequence, and both pick the
same tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from latentforge.errors import ConfigError


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0: greedy) (got {temperature})")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0: off) (got {top_k})")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1: off) (got {top_p})")


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        # Keep the most likely tokens until their mass reaches top_p (the first one always).
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, use_cache: bool = True,
             prefix: bool = False) -> torch.Tensor:
    """The tokens that follow prompt_ids ((T,) or (B, T)): (n,) or (B, n), n <= max_new_tokens. Generation
    stops early once every row has produced eos_id (rows that ended first are filled with eos_id).
    prefix: the prompt is a bidirectional prefix (a model trained as a prefix-LM)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    single = prompt_ids.dim() == 1
    ids = prompt_ids[None] if single else prompt_ids
    B, T = ids.shape
    if T == 0:
        raise ConfigError("the prompt is empty: give at least one token")
    if T + max_new_tokens > model.cfg.max_len:
        raise ConfigError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) is longer than the model's "
                          f"max_len={model.cfg.max_len}")
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    cache = model.new_cache() if use_cache else None
    prefix_len = T if prefix else None
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    was_training = model.training
    model.eval()
    new = []
    try:
        logits = model(ids, prefix_len=prefix_len, cache=cache)[:, -1]
        for step in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = torch.where(done, eos_id, token)
                done = done | (token == eos_id)
            new.append(token)
            if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            if cache is not None:
                logits = model(token[:, None], cache=cache)[:, -1]
            else:
                logits = model(ids, prefix_len=prefix_len)[:, -1]
    finally:
        model.train(was_training)
    out = torch.stack(new, dim=1)
    return out[0] if single else out
