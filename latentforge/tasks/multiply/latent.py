"""An encoder-decoder with a latent bottleneck: the answer is decoded from a few learned latents that read the question.

Also scheduled sampling (Bengio et al. 2015), which trains the decoder on some of its own predictions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn.blocks import DecoderBlock, EncoderBlock, LatentBlock
from latentforge.nn.rope import rope_tables
from latentforge.nn.transformer import TransformerShape


class LatentTransformer(nn.Module):
    """Question (B, Tq) and decoder inputs (B, Ta) -> next-token logits (B, Ta, vocab).

    A bidirectional encoder reads the question; `latents` learned vectors cross-attend to it for `latent_layers`
    blocks; a causal decoder writes the answer while cross-attending to a memory. The bottleneck factor f decides
    what that memory is:
      - f == 1: the latents only, a true bottleneck: the decoder sees the question only through the k latents.
      - f < 1: [latents ; encoder output], with an additive attention bias log(1 - f) on the encoder-output keys.
        f = 0 puts both on an equal footing; as f -> 1 the encoder's share of every softmax shrinks by (1 - f),
        so a curriculum can raise f to fade the direct route out continuously into the f == 1 model.
    Padded question positions (pad_id, right padding) are masked out as keys everywhere.
    """

    def __init__(self, vocab_size: int, pad_id: int, d_model: int, n_head: int, mlp_ratio: float, dropout: float,
                 max_len: int, encoder_layers: int, latent_layers: int, decoder_layers: int, latents: int,
                 bottleneck: float):
        super().__init__()
        assert 0.0 <= bottleneck <= 1.0, "bottleneck must be in [0, 1]"
        self.pad_id = pad_id
        self.max_len = max_len
        self.bottleneck = bottleneck
        # The blocks read only the width fields of the shape; depths are per stack below.
        shape = TransformerShape(vocab_size=vocab_size, n_head=n_head, d_model=d_model, mlp_ratio=mlp_ratio,
                                 dropout=dropout, max_len=max_len)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderBlock(shape) for _ in range(encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model)
        self.latents = nn.Parameter(torch.empty(latents, d_model))
        self.latent_blocks = nn.ModuleList(LatentBlock(shape) for _ in range(latent_layers))
        self.latent_norm = nn.LayerNorm(d_model)
        self.decoder = nn.ModuleList(DecoderBlock(shape) for _ in range(decoder_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        cos, sin = rope_tables(max_len, d_model // n_head, shape.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.latents, std=0.02)
        # GPT-2's scaled init of the residual projections, per residual stream: std / sqrt(branches added to it).
        for stack, branches in ((self.encoder, 2), (self.latent_blocks, 3), (self.decoder, 3)):
            for name, p in stack.named_parameters():
                if name.endswith(("proj.weight", "down.weight")):
                    nn.init.normal_(p, std=0.02 / (branches * len(stack)) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def encode(self, question: Tensor) -> tuple[Tensor, Tensor | None]:
        """question (B, Tq) -> (memory (B, S, C) for the decoder, its additive attention bias (B, 1, 1, S) or None)."""
        assert question.shape[1] <= self.max_len, "question is longer than max_len"
        keep = (question != self.pad_id)[:, None, None, :]
        x = self.drop(self.embed(question))
        for block in self.encoder:
            x = block(x, self.rope_cos, self.rope_sin, keep)
        x = self.encoder_norm(x)
        z = self.latents.expand(len(question), -1, -1)
        for block in self.latent_blocks:
            z = block(z, x, keep)
        z = self.latent_norm(z)
        if self.bottleneck == 1:
            return z, None
        encoder_bias = torch.where(keep, math.log(1 - self.bottleneck), float("-inf"))
        latent_bias = encoder_bias.new_zeros(*encoder_bias.shape[:-1], z.shape[1])
        return torch.cat([z, x], dim=1), torch.cat([latent_bias, encoder_bias], dim=-1)

    def decode(self, inputs: Tensor, memory: Tensor, bias: Tensor | None) -> Tensor:
        """Decoder inputs (B, Ta) -> logits (B, Ta, vocab), cross-attending to an encoded question."""
        assert inputs.shape[1] <= self.max_len, "decoder inputs are longer than max_len"
        x = self.drop(self.embed(inputs))
        for block in self.decoder:
            x = block(x, self.rope_cos, self.rope_sin, memory, bias)
        return self.head(self.norm(x))

    def forward(self, question: Tensor, inputs: Tensor) -> Tensor:
        """question (B, Tq) token ids right-padded with pad_id; inputs (B, Ta) decoder inputs (first token is the
        start token EQUALS, then the answer digits) -> logits (B, Ta, vocab_size)."""
        return self.decode(inputs, *self.encode(question))

    @torch.no_grad()
    def generate(self, question: Tensor, start: Tensor, max_new: int, end_id: int) -> Tensor:
        """Greedy decoding: start (B, 1) -> (B, max_new) new tokens; encode the question once; stop early when
        every row has produced end_id (fill the remaining columns with pad_id)."""
        memory, bias = self.encode(question)
        tokens = start
        done = torch.zeros(len(start), dtype=torch.bool, device=start.device)
        for _ in range(max_new):
            next_token = self.decode(tokens, memory, bias)[:, -1].argmax(-1).masked_fill(done, self.pad_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            done |= next_token == end_id
            if done.all():
                break
        new = tokens[:, start.shape[1]:]
        return F.pad(new, (0, max_new - new.shape[1]), value=self.pad_id)


def scheduled_inputs(model: LatentTransformer, question: Tensor, inputs: Tensor, teacher_prob: float) -> Tensor:
    """Scheduled sampling, the parallel two-pass approximation: keep each input token with probability teacher_prob,
    else replace it by the model's greedy prediction of it from the teacher-forced prefix. The start token is kept.

    The prediction pass runs in eval mode (no dropout), so the model sees the mistakes it makes when decoding and
    the coin flips are the only draws from the global RNG, which the engine saves and restores for exact resume.
    """
    if teacher_prob >= 1:
        return inputs
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = model(question, inputs).argmax(-1)
    model.train(was_training)
    keep = torch.rand(inputs[:, 1:].shape, device=inputs.device) < teacher_prob
    return torch.cat([inputs[:, :1], torch.where(keep, inputs[:, 1:], predicted[:, :-1])], dim=1)
