"""The decoder-only model of the nocot, cot, icot-si, pause and aux-probe variants.

One transformer; `continuous` turns the thought tokens of `pause` into continuous thoughts (the
last hidden state of the previous position becomes the thought's input embedding, as in
Coconut), and `probe_layers` adds linear probes that read the residual stream after those blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from latentforge.nn.transformer import Transformer, TransformerShape
from latentforge.tasks.multiply.layout import END, PAD, THOUGHT


class DecoderLM(nn.Module):
    def __init__(self, shape: TransformerShape, continuous: bool = False, probe_layers: tuple[int, ...] = ()):
        super().__init__()
        self.transformer = Transformer(shape)
        self.continuous = continuous
        self.probe_layers = tuple(probe_layers)
        self.probes = nn.ModuleDict({str(layer): nn.Linear(shape.d_model, 1) for layer in self.probe_layers})

    def embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings; with continuous thoughts, each thought position gets the final hidden
        state of the position before it, filled in one thought at a time (k extra passes)."""
        x = self.transformer.embed(tokens)
        if not self.continuous:
            return x
        is_thought = tokens == THOUGHT
        k = int(is_thought.sum(1).max()) if is_thought.any() else 0
        # The j-th thought of each row: its first thought position + j (thoughts are contiguous).
        first = is_thought.int().argmax(1)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        for j in range(k):
            position = first + j
            has = is_thought[rows, position]
            h, _ = self.transformer.hidden(x[:, : int(position.max())])
            fill = h[rows, position - 1]
            x = x.clone()
            x[rows, position] = torch.where(has[:, None], fill.to(x.dtype), x[rows, position])
        return x

    def forward(self, tokens: torch.Tensor, with_probes: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits (B, T, vocab); with_probes: and each probe's prediction (B, T) at every position.
        One forward method for both: DDP hooks (and compiles, under DDP) `forward` and no other."""
        h, kept = self.transformer.hidden(self.embeddings(tokens), self.probe_layers if with_probes else ())
        logits = self.transformer.logits(h)
        if not with_probes:
            return logits
        return logits, {layer: self.probes[str(layer)](kept[layer]).squeeze(-1) for layer in self.probe_layers}

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new: int) -> torch.Tensor:
        """Greedy continuation of prompts of one length: (B, P) -> (B, max_new) new tokens, PAD
        after a row's <end>; stops once every row has ended."""
        x = self.embeddings(prompt)
        new = torch.full((prompt.shape[0], max_new), PAD, dtype=torch.int64, device=prompt.device)
        ended = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for i in range(max_new):
            h, _ = self.transformer.hidden(x)
            token = self.transformer.logits(h[:, -1]).argmax(-1)
            new[:, i] = token.masked_fill(ended, PAD)
            ended |= token == END
            if bool(ended.all()):
                break
            x = torch.cat([x, self.transformer.embed(token)[:, None].to(x.dtype)], dim=1)
        return new
