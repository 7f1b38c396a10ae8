"""The grid dVAE: a grid -> N discrete codes -> the grid.

Encoder: a bidirectional transformer over the grid's cells with 2-D RoPE (its own base per axis)
and a learned embedding of each cell's position.
Pooling: N learned latent queries read the encoded grid (attention pooling) into N slots.
Codebook: each slot becomes one discrete code (nn.codebooks: gumbel, reinmax, softmax, vq, fsq).
Decoder: learned per-cell queries attend to each other (2-D RoPE) and read the codes; a head
gives each cell's logits. The code is the only path from input to output.

Slots can be tied to cells, so that each code carries its own cells from the start:
- patch_slots: slot k to the k-th fixed patch of the S x S canvas (4 x 2 cells for 128 slots on 32 x 32);
- grid_slots: the first two codes are the grid's height - 1 and width - 1, and the other N - 2 slots
  split the grid's own cells, in reading order, into even runs (at most ceil(h * w / (N - 2)) cells). A
  10 x 10 grid then has one slot per cell rather than the 15 slots of canvas patches that it covers, and
  the decoder knows which cells are padding, so it never spends capacity on them.
  pack_slots (with grid_slots): a slot starts from a linear map of its run's cells laid side by side, and
  the decoder unpacks each code into one vector per place in the run, rather than a slot starting from the
  mean of its cells and every cell of the run reading the same code. A mean of two cells cannot tell
  (red, blue) from (blue, red), so without packing a code that must carry two cells is slow to learn.

miss_slots (with grid_slots and autoregressive): rather than even runs, code k belongs to the run of cells that
ends at the k-th cell a fixed context rule mispredicts (context.py). Its slot starts from that cell and its place
in the run (with pack_slots: from the run's cells side by side); each cell reads its run's code (its own place's
vector), its place in the run and the rule's guess, all known from the cells before it. A grid costs codes only
where it is hard to predict. miss_above_cells > 0 keeps even runs for grids of at most that many cells (even
runs of up to two cells fit any grid, and the presets get 99.9% of those grids back; the miss layout asks each
code for more).

miss_pair_rank (with miss_slots and the adaptive context): a code names its misses by their rank among the
context's choices (1: its second choice), and holds two where the first is ranked at most miss_pair_rank: a run
ends at a miss ranked above it, at its second miss, or after miss_run cells (context.paired_miss_runs). The
encoder reads each cell's rank, and the head names ranks, which the context's choices turn into colours. A code
then names one of (9 - R) L + R L (L - 1) 9 / 2 + R L + 1 kinds of run (R = miss_pair_rank, L = miss_run): 406 at
R = 1, L = 9, where one miss to a code, named by its colour, is one of 11 L. Counted on the held-out grids, such
codes hold 96.8% of them against 95.4% with dvae/arc-vq-miss's (python -m bench.dvae.layout_reach).

miss_interval (with miss_slots and the adaptive context): a code is an interval of codebook_size values that each
cell splits among its ranks by the context's probabilities, keeping its own rank's share; a run ends at the cell
that leaves fewer values than there are colours (context.interval_runs). A code then holds many likely cells or a few
unlikely ones, and never more than codebook_size contents for what the decoder knows; its meaning depends on the
probabilities it is read with, so the encoder and the decoder read each cell's split and the values left. The head
names ranks, as with miss_pair_rank. Counted with every code right, these codes hold 98.4% of the held-out grids, and
0.990 of the held-out cells come back decoded from the decoder's own guesses (python -m bench.dvae.capacity); trained
(dvae/arc-vq-interval), they are not learned (docs/results/dvae.md).

autoregressive: the decoder also reads the grid's earlier cells (reading order over the canvas): each cell's
query adds the colours of its left and upper neighbours, and its self-attention is causal. Trained with the
true cells (teacher forcing), it reconstructs by greedy decoding (`advance`). The codes then need to carry only
what the cells before cannot predict: a row that repeats the one above costs its codes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn.blocks import DecoderBlock, EncoderBlock, LatentBlock
from latentforge.nn.codebooks import CodebookOutput, build_codebook
from latentforge.nn.rope import grid_positions, rope_2d_tables
from latentforge.nn.transformer import TransformerShape
from latentforge.tasks.dvae.context import (
    AXIS_REACH,
    NO_GUESS,
    AdaptiveContext,
    MissLayout,
    colour_ranks,
    context_guesses,
    inside_cells,
    interval_run_bound,
    interval_runs,
    interval_shares,
    miss_layout,
    paired_miss_runs,
    shape_code_values,
    symmetry_axes,
)


class GridDVAE(nn.Module):
    def __init__(self, vocab_in: int, vocab_out: int, grid_size: int, d_model: int, n_head: int, mlp_ratio: float,
                 dropout: float, encoder_layers: int, pool_layers: int, decoder_layers: int, latents: int,
                 codebook: str, codebook_size: int, codebook_options: dict, rope_base_row: float,
                 rope_base_col: float, patch_slots: bool = False, grid_slots: bool = False,
                 pack_slots: bool = False, autoregressive: bool = False, miss_slots: bool = False,
                 miss_run: int = 32, miss_above_cells: int = 0, context_rule: Tensor | None = None,
                 adaptive_context: AdaptiveContext | None = None, miss_axes: bool = False,
                 miss_pair_rank: int = 0, miss_interval: bool = False, pad_id: int | None = None):
        super().__init__()
        if patch_slots and grid_slots:
            raise ValueError("patch_slots and grid_slots tie slots to cells in two different ways; choose one")
        if grid_slots and (latents < 3 or codebook_size < grid_size):
            raise ValueError(f"grid_slots needs latents >= 3 and codebook_size >= the grid size {grid_size} "
                             f"(two codes are the grid's height and width); got {latents} and {codebook_size}")
        if pack_slots and not grid_slots:
            raise ValueError("pack_slots lays out the runs of cells that grid_slots gives each slot; "
                             "set model.grid_slots=true too")
        if miss_slots and not (grid_slots and autoregressive and (context_rule is None) != (adaptive_context is None)):
            raise ValueError("miss_slots lays the grid slots out by what a decoder reading earlier cells mispredicts "
                             "(and needs one context: the fitted rule or the adaptive one): set grid_slots and "
                             "autoregressive")
        if miss_axes != (adaptive_context is not None and adaptive_context.axes) or (
                miss_axes and codebook_size < shape_code_values(grid_size, True)):
            raise ValueError(f"miss_axes carries each grid's symmetry axes in its two shape codes for the adaptive "
                             f"context to mirror about: it needs an adaptive context fitted with axes and "
                             f"codebook_size >= {shape_code_values(grid_size, True)} (got {codebook_size})")
        if miss_pair_rank and (not miss_slots or adaptive_context is None
                               or not 0 < miss_pair_rank < adaptive_context.colours - 1):
            raise ValueError(f"miss_pair_rank names misses by their rank under the adaptive context: it needs "
                             f"model.miss_context=adaptive and a rank in [1, colours - 2] (got {miss_pair_rank})")
        colours = 10 if adaptive_context is None else adaptive_context.colours
        if miss_interval and (not miss_slots or adaptive_context is None or miss_pair_rank
                              or codebook_size <= colours or miss_run < interval_run_bound(codebook_size, colours)):
            raise ValueError(f"miss_interval splits each code's values by the adaptive context's probabilities: it "
                             f"needs model.miss_slots=true, model.miss_context=adaptive, model.miss_pair_rank=0, "
                             f"codebook_size > {colours} and miss_run >= "
                             f"{interval_run_bound(max(codebook_size, colours + 1), colours)} (the longest run a code "
                             f"of {codebook_size} values holds; got {miss_run})")
        cells = grid_size * grid_size
        # The slots the codebook fills (grid_slots: all but the two shape codes).
        slots = latents - 2 if grid_slots else latents
        if miss_slots and not (0 <= miss_above_cells <= cells and math.ceil(miss_above_cells / slots) <= miss_run):
            raise ValueError(f"miss_above_cells must be in [0, {cells}] and leave even runs of at most miss_run "
                             f"({miss_run}) cells on {slots} slots (got {miss_above_cells})")
        self.grid_size, self.grid_slots, self.pack_slots, self.pad_id = grid_size, grid_slots, pack_slots, pad_id
        self.autoregressive, self.miss_slots, self.miss_run = autoregressive, miss_slots, miss_run
        self.miss_above_cells, self.miss_axes, self.miss_pair_rank = miss_above_cells, miss_axes, miss_pair_rank
        self.miss_interval, self.codebook_size = miss_interval, codebook_size
        shape = TransformerShape(vocab_size=vocab_in, n_head=n_head, d_model=d_model, mlp_ratio=mlp_ratio,
                                 dropout=dropout, max_len=cells)
        self.embed = nn.Embedding(vocab_in, d_model)
        # Absolute cell positions: RoPE makes the encoder's attention position-aware, but only relative
        # positions, and attention pooling (no RoPE) would read a bag of cells with no idea where each was.
        self.cell_positions = nn.Parameter(torch.empty(cells, d_model))
        self.encoder = nn.ModuleList(EncoderBlock(shape) for _ in range(encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model)
        self.latent_queries = nn.Parameter(torch.empty(slots, d_model))
        self.pool = nn.ModuleList(LatentBlock(shape) for _ in range(pool_layers))
        self.pool_norm = nn.LayerNorm(d_model)
        self.codebook = build_codebook(codebook, d_model, codebook_size, **codebook_options)
        self.cell_queries = nn.Parameter(torch.empty(cells, d_model))
        if grid_slots:
            # A cell's place within its slot's run of cells, and the grid's shape as one memory token.
            self.run_length = miss_run if miss_slots else math.ceil(cells / slots)
            if pack_slots:
                self.pack = nn.Linear(self.run_length * d_model, d_model, bias=False)
                self.unpack = nn.Linear(d_model, self.run_length * d_model, bias=False)
            else:
                self.offset_embed = nn.Embedding(self.run_length, d_model)
            self.height_embed = nn.Embedding(grid_size, d_model)
            self.width_embed = nn.Embedding(grid_size, d_model)
        if autoregressive:
            # The colours of a cell's left and upper neighbours (an edge token, id vocab_out, past the grid's edge).
            self.left_colour = nn.Embedding(vocab_out + 1, d_model)
            self.upper_colour = nn.Embedding(vocab_out + 1, d_model)
        if miss_slots:
            # The rule's guess for each cell, and where a run ends (its place, and whether the rule missed there).
            self.guess_colour = nn.Embedding(vocab_out + 1, d_model)
            self.run_end = nn.Embedding(2 * miss_run, d_model)
            self.register_buffer("context_rule", None if context_rule is None else context_rule.to(torch.uint8))
            self.adaptive_context = adaptive_context
        if self.names_ranks:
            # The rank of each input cell's colour among the context's choices (one more id: no colour, a mask).
            self.rank_embed = nn.Embedding(adaptive_context.colours + 1, d_model)
        if miss_interval:
            # How each cell splits the values its code has left (the log share of each rank) and how many are left.
            self.interval_split = nn.Linear(adaptive_context.colours, d_model, bias=False)
            self.interval_left = nn.Embedding(codebook_size + 1, d_model)
        self.decoder = nn.ModuleList(DecoderBlock(shape, causal=autoregressive) for _ in range(decoder_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_out, bias=False)
        rows, cols = grid_positions(grid_size, grid_size, torch.device("cpu"))
        # patch_slots: slot k also feeds the cells of the k-th patch of the grid directly (added to their
        # queries), a short path that makes each code carry its patch from the start.
        self.register_buffer("slot_of_cell", patch_slot_map(grid_size, latents) if patch_slots else None,
                             persistent=False)
        cos, sin = rope_2d_tables(rows, cols, d_model // n_head, rope_base_row, rope_base_col)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # GPT-style small init everywhere but the codebook, which keeps its own: logits of order 1, so
        # the codes carry information from the start instead of drowning in Gumbel noise.
        for name, module in self.named_modules():
            if not name.startswith("codebook"):
                self._init_weights(module)
        nn.init.normal_(self.latent_queries, std=0.02)
        nn.init.normal_(self.cell_queries, std=0.02)
        # Unit-scale input embeddings: at GPT's 0.02 the cells' content is so faint after pooling that every
        # grid maps to the same codes within a few hundred steps (docs/results/dvae.md); at 1.0 it is not.
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.cell_positions, std=1.0)
        if miss_slots:
            # The rule's guess is most cells' answer: as loud as the cells' own colours.
            nn.init.normal_(self.guess_colour.weight, std=1.0)
        if miss_interval:
            # What a code means depends on these: as loud as the colours too (a log share is up to about -9).
            nn.init.normal_(self.interval_split.weight, std=1.0 / adaptive_context.colours)
            nn.init.normal_(self.interval_left.weight, std=1.0)
        for stack, branches in ((self.encoder, 2), (self.pool, 3), (self.decoder, 3)):
            for name, p in stack.named_parameters():
                if name.endswith(("proj.weight", "down.weight")):
                    nn.init.normal_(p, std=0.02 / (branches * max(len(stack), 1)) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def names_ranks(self) -> bool:
        """Whether codes and the head name ranks among the adaptive context's choices rather than colours."""
        return bool(self.miss_pair_rank) or self.miss_interval

    def interval_inputs(self, layout: MissLayout) -> Tensor:
        """miss_interval: (B, S*S, D) what each cell knows of its code's interval, its split and the values left."""
        return self.interval_split(layout.split.to(self.interval_split.weight.dtype)) + self.interval_left(layout.left)

    @property
    def slots(self) -> int:
        """The codes that carry a grid's cells (with grid_slots, all but its two shape codes)."""
        return self.latent_queries.shape[0]

    @property
    def latents(self) -> int:
        """N: the codes that store a grid (with grid_slots, its two shape codes included)."""
        return self.slots + (2 if self.grid_slots else 0)

    def grid_shapes(self, grids: Tensor) -> Tensor:
        """(B, 2) heights and widths of padded grids (content at the top left, pad_id elsewhere)."""
        if self.pad_id is None:
            return grids.new_full((len(grids), 2), self.grid_size)
        real = grids != self.pad_id
        return torch.stack([real[:, :, 0].sum(1), real[:, 0, :].sum(1)], 1)

    def encode(self, grids: Tensor, temperature: float = 1.0, hardness: float = 1.0,
               shapes: Tensor | None = None, layout: MissLayout | None = None) -> CodebookOutput:
        """Token grids (B, S, S) -> the codebook's output for the slots it fills (grid_slots: given the grids'
        (B, 2) shapes; miss_slots: the `layout` of the grids the decoder reads, the grids' own if None)."""
        x = self.embed(grids.flatten(1)) + self.cell_positions
        for block in self.encoder:
            x = block(x, self.rope_cos, self.rope_sin)
        x = self.encoder_norm(x)
        h = self.latent_queries.expand(len(grids), -1, -1)
        if self.miss_slots and layout is None:
            layout = self.layout(grids, shapes, self.grid_axes(grids, shapes))
        if self.names_ranks:
            # The codes name ranks, so the encoder reads each cell's rank (a masked cell's is unknown).
            colours = layout.choices.shape[-1]
            tokens = grids.flatten(1)
            x = x + self.rank_embed(torch.where(tokens < colours, colour_ranks(layout.choices, tokens), colours))
        if self.miss_interval:
            x = x + self.interval_inputs(layout).to(x.dtype)
        if self.pack_slots:
            # Each slot starts from its own cells side by side (zeros past the run's end), then pools the grid.
            slot, offset = layout[:2] if self.miss_slots else grid_slot_layout(shapes, self.grid_size, h.shape[1])
            cells = run_cells(slot, offset, h.shape[1], self.run_length)  # (B, slots * run_length)
            padded = torch.cat([x, x.new_zeros(len(x), 1, x.shape[2])], 1)
            runs = padded.gather(1, cells.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            h = h + self.pack(runs.view(len(x), h.shape[1], -1))
        elif self.miss_slots:
            # Each slot starts from the cell that ends its run (its colour is what the code must carry), and that
            # cell's place in the run; then pools the grid.
            ends = (x + self.run_end(layout.offset + self.miss_run * layout.missed.long())).to(x.dtype)
            at = torch.where(layout.end, layout.slot, h.shape[1]).unsqueeze(-1).expand_as(ends)
            h = h + x.new_zeros(len(x), h.shape[1] + 1, x.shape[2]).scatter_add(1, at, ends)[:, :-1]
        elif self.grid_slots:
            # Each slot starts from the mean of its own cells, then pools the whole grid.
            slot, _ = grid_slot_layout(shapes, self.grid_size, h.shape[1])
            members = F.one_hot(slot, h.shape[1] + 1)[..., :-1].to(x.dtype)  # (B, cells, slots)
            h = h + members.transpose(1, 2) @ x / members.sum(1).clamp(min=1).unsqueeze(-1)
        for block in self.pool:
            h = block(h, x)
        return self.codebook(self.pool_norm(h), temperature, hardness)

    def decode(self, z: Tensor, shapes: Tensor | None = None, context: Tensor | None = None,
               layout: MissLayout | None = None, axes: Tensor | None = None) -> Tensor:
        """Quantized slots (B, N, D) -> per-cell logits (B, S*S, vocab_out); grid_slots also needs the grids'
        (B, 2) shapes, and then pins every cell outside a grid to padding and every cell inside to a colour.
        autoregressive: `context` (B, S, S) is the grid whose earlier cells each cell's logits read (miss_slots: its
        `layout`, computed here if None, about the grids' symmetry `axes` with miss_axes)."""
        x = self.cell_queries.expand(len(z), -1, -1)
        if self.autoregressive:
            x = x + self.neighbour_colours(context)
        memory = z
        if self.slot_of_cell is not None:
            x = x + z[:, self.slot_of_cell].to(x.dtype)
        if self.grid_slots:
            if self.miss_slots:
                layout = self.layout(context, shapes, axes) if layout is None else layout
                slot, offset, guess = layout.slot, layout.offset, layout.guess
                x = x + self.guess_colour(torch.where(guess == NO_GUESS, self.guess_colour.num_embeddings - 1, guess))
                if self.miss_interval:
                    x = x + self.interval_inputs(layout).to(x.dtype)
            else:
                slot, offset = grid_slot_layout(shapes, self.grid_size, z.shape[1])
            if self.pack_slots:
                # Code k unpacks into one vector per place of its run; cell i reads its own place's vector.
                places = self.unpack(z.to(x.dtype)).view(len(z), -1, z.shape[2])  # (B, slots * run_length, D)
                padded = torch.cat([places, places.new_zeros(len(z), 1, z.shape[2])], 1)
                index = torch.where(slot < z.shape[1], slot * self.run_length + offset, places.shape[1])
            else:
                padded = torch.cat([z, z.new_zeros(len(z), 1, z.shape[2])], 1)  # slot index N-2: outside the grid
                index = slot
                x = x + self.offset_embed(offset)
            x = x + padded.gather(1, index.unsqueeze(-1).expand(-1, -1, z.shape[2])).to(x.dtype)
            shape_token = self.height_embed(shapes[:, 0] - 1) + self.width_embed(shapes[:, 1] - 1)
            memory = torch.cat([z, shape_token.unsqueeze(1).to(z.dtype)], 1)
        for block in self.decoder:
            x = block(x, self.rope_cos, self.rope_sin, memory)
        logits = self.head(self.norm(x))
        if self.names_ranks:
            # The head names ranks, as the codes do: colour c takes the logit of its rank among the context's choices.
            colours = layout.choices.shape[-1]
            by_colour = logits[..., :colours].gather(-1, layout.choices.argsort(-1))
            logits = torch.cat([by_colour, logits[..., colours:]], -1)
        if self.grid_slots and self.pad_id is not None:
            outside = ~inside_cells(shapes, self.grid_size).unsqueeze(-1)
            is_pad = torch.arange(logits.shape[-1], device=logits.device) == self.pad_id
            logits = logits.masked_fill(outside != is_pad, PINNED_LOGIT)
        return logits

    def layout(self, grids: Tensor, shapes: Tensor, axes: Tensor | None = None) -> MissLayout:
        """miss_slots: context.miss_layout of (B, S, S) grids with this model's context (the fitted rule or the
        adaptive one) and slots, or with miss_pair_rank context.paired_miss_runs' runs by the adaptive context's
        ranks, or with miss_interval context.interval_runs' by its probabilities; a grid of at most miss_above_cells
        cells keeps grid_slot_layout's even runs instead (a run ends at its last cell). Its shape codes say which, so
        the decoder knows it before the first cell."""
        if self.names_ranks:
            probs, choices = self.adaptive_context.ranked(grids, shapes, axes)
            inside = inside_cells(shapes, self.grid_size)
            rank = colour_ranks(choices, grids.flatten(1))
            missed, guess = inside & (rank > 0), torch.where(inside, choices[..., 0], NO_GUESS)
            if self.miss_interval:
                slot, offset, end, left = interval_runs(probs, rank, inside, self.slots, self.codebook_size)
                shares = interval_shares(probs, left.clamp(min=probs.shape[-1])).to(probs.dtype)
                split = torch.where(inside.unsqueeze(-1), (shares / left.clamp(min=1).unsqueeze(-1)).log(), 0.0)
                layout = MissLayout(slot, offset, end, missed, guess, choices, split, left)
            else:
                runs = paired_miss_runs(rank, inside, self.slots, self.miss_run, self.miss_pair_rank)
                layout = MissLayout(*runs, missed, guess, choices)
        else:
            guess = context_guesses(grids, shapes, self.context_rule) if self.adaptive_context is None \
                else self.adaptive_context.guesses(grids, shapes, axes)
            layout = miss_layout(grids, shapes, guess, self.slots, self.miss_run)
        slot, offset, end, split, left = layout.slot, layout.offset, layout.end, layout.split, layout.left
        if self.miss_above_cells:
            even = self.keeps_even_runs(shapes).unsqueeze(1)
            even_slot, even_offset = grid_slot_layout(shapes, self.grid_size, self.slots)
            last = torch.zeros_like(slot[:, :1]).expand(-1, self.slots + 1).scatter_reduce(
                1, even_slot, even_offset, "amax")  # each run's last place
            even_end = inside_cells(shapes, self.grid_size) & (even_offset == last.gather(1, even_slot))
            slot, offset = torch.where(even, even_slot, slot), torch.where(even, even_offset, offset)
            end = torch.where(even, even_end, end)
            if self.miss_interval:  # no interval in the even runs
                split, left = torch.where(even.unsqueeze(-1), 0.0, split), torch.where(even, 0, left)
        return MissLayout(slot, offset, end, layout.missed, layout.guess, layout.choices, split, left)

    def grid_axes(self, grids: Tensor, shapes: Tensor | None) -> Tensor | None:
        """miss_axes: the (B, 2) symmetry axes of (B, S, S) grids (context.symmetry_axes), which their shape codes
        carry; else None."""
        return symmetry_axes(grids, shapes) if self.miss_axes else None

    def keeps_even_runs(self, shapes: Tensor) -> Tensor:
        """(B,): whether each grid of these (B, 2) shapes keeps even runs under miss_slots (miss_above_cells)."""
        return shapes[:, 0] * shapes[:, 1] <= self.miss_above_cells

    def neighbour_colours(self, context: Tensor) -> Tensor:
        """(B, S, S) grids -> (B, S*S, D): each cell's left and upper neighbours' colours, both earlier cells."""
        edge = self.left_colour.num_embeddings - 1
        left = F.pad(context[:, :, :-1], (1, 0), value=edge)
        upper = F.pad(context[:, :-1, :], (0, 0, 1, 0), value=edge)
        return self.left_colour(left.flatten(1)) + self.upper_colour(upper.flatten(1))

    def forward(self, grids: Tensor, temperature: float = 1.0, hardness: float = 1.0,
                context: Tensor | None = None) -> tuple[Tensor, CodebookOutput]:
        """Grids (B, S, S) -> per-cell logits and the codebook's output. autoregressive: each cell's logits read
        the earlier cells of `context` (teacher forcing): the grids themselves if None, the unmasked targets where
        the grids are masked inputs."""
        shapes = self.grid_shapes(grids) if self.grid_slots else None
        context = grids if context is None else context
        # One layout for the encoder and the decoder, about the true grid's axes.
        layout = self.layout(context, shapes, self.grid_axes(context, shapes)) if self.miss_slots else None
        out = self.encode(grids, temperature, hardness, shapes, layout)
        return self.decode(out.z, shapes, context, layout), out

    @torch.no_grad()
    def generate(self, z: Tensor, shapes: Tensor | None = None, start: Tensor | None = None,
                 axes: Tensor | None = None) -> Tensor:
        """Quantized slots -> the (B, S*S) grids they decode to: each cell's argmax colour. autoregressive:
        greedy decoding in reading order, by Jacobi iteration (`advance`), from the first guess `start` ((B, S, S);
        padding if None)."""
        if not self.autoregressive:
            return self.decode(z, shapes).argmax(-1)
        S = self.grid_size
        first_guess = 0 if self.pad_id is None else self.pad_id
        grids = torch.full((len(z), S, S), first_guess, dtype=torch.long, device=z.device) if start is None \
            else start.clone()
        self.advance(Decoding(grids, z, shapes, axes))
        return grids.flatten(1)

    @property
    def most_passes(self) -> int:
        """The Jacobi passes that settle any grid: after t passes the first t cells are final, and one more pass
        confirms the last."""
        return self.grid_size ** 2 + 1

    def advance(self, decoding: Decoding, passes: int | None = None) -> Tensor:
        """Up to `passes` (most_passes if None) Jacobi passes of greedy decoding, in place: every pass predicts all
        cells in parallel from the last pass's grid, and a grid is final once a pass changes nothing in it. A cell
        reads only earlier cells, so after t passes the first t cells are final whatever the first guess: the fixed
        point is exactly the greedy decoding, and a good guess only reaches it sooner. (Exactly, where a cell's
        logits do not depend on how many grids share a pass; on a GPU in bf16 another batch size may round a
        near-tie differently.) Returns the indices of the grids the last pass changed."""
        S = self.grid_size
        active = torch.arange(len(decoding.z), device=decoding.z.device)
        for _ in range(self.most_passes if passes is None else passes):
            part = decoding[active]
            new = self.decode(part.z, part.shapes, part.grids, axes=part.axes).argmax(-1).view(-1, S, S)
            changed = (new != part.grids).flatten(1).any(1)
            decoding.grids[active] = new
            active = active[changed]
            if not len(active):
                break
        return active

    def decoding(self, grids: Tensor, logits: Tensor, z: Tensor) -> Decoding:
        """The greedy decoding of the codes z of `grids` (autoregressive), started from the forward pass's argmax
        (its logits read the true earlier cells): where that gives the grid back, one pass confirms it."""
        shapes = self.grid_shapes(grids) if self.grid_slots else None
        return Decoding(logits.argmax(-1).view_as(grids), z, shapes, self.grid_axes(grids, shapes))

    def reconstruction(self, grids: Tensor, logits: Tensor, z: Tensor) -> Tensor:
        """The (B, S*S) grids that the codes z of `grids` decode to, given the forward pass's logits: their argmax,
        or, where the decoder is autoregressive (its logits read the true earlier cells), its greedy decoding."""
        if not self.autoregressive:
            return logits.argmax(-1)
        decoding = self.decoding(grids, logits, z)
        self.advance(decoding)
        return decoding.grids.flatten(1)

    def code_sequence(self, grids: Tensor, codes: Tensor) -> Tensor:
        """What stores each grid: its N codes (with grid_slots, height - 1 and width - 1 first; with miss_axes
        each plus grid_size times its symmetry axis's offset + AXIS_REACH)."""
        if not self.grid_slots:
            return codes
        shapes = self.grid_shapes(grids)
        shape_codes = shapes - 1
        if self.miss_axes:
            shape_codes = shape_codes + self.grid_size * (self.grid_axes(grids, shapes) + AXIS_REACH)
        return torch.cat([shape_codes, codes], 1)

    def decode_codes(self, sequence: Tensor) -> Tensor:
        """(B, N) code sequences (as code_sequence gives them) -> the (B, S*S) grids they decode to."""
        if not self.grid_slots:
            return self.generate(self.codebook.embed(sequence))
        shape_codes = sequence[:, :2]
        axes = shape_codes // self.grid_size - AXIS_REACH if self.miss_axes else None
        return self.generate(self.codebook.embed(sequence[:, 2:]), shape_codes % self.grid_size + 1, axes=axes)


@dataclass
class Decoding:
    """Greedy decodings under way: each grid's current guess (B, S, S) and what it is decoded from. Those of
    several batches can be joined (`joined`), so that the long Jacobi tails of the few grids decoded wrong (up to a
    pass per cell) share their passes rather than each batch running its own."""
    grids: Tensor
    z: Tensor
    shapes: Tensor | None = None
    axes: Tensor | None = None

    def __getitem__(self, index: Tensor | slice) -> Decoding:
        return Decoding(*(None if t is None else t[index] for t in (self.grids, self.z, self.shapes, self.axes)))

    @staticmethod
    def joined(parts: list[Decoding]) -> Decoding:
        fields = zip(*((p.grids, p.z, p.shapes, p.axes) for p in parts))
        return Decoding(*(None if ts[0] is None else torch.cat(ts) for ts in fields))


# The logit of a colour a cell cannot have (padding inside a grid, a colour outside it): exp() of it is 0
# next to any real logit, in bf16 too.
PINNED_LOGIT = -1e4


def grid_slot_layout(shapes: Tensor, grid_size: int, slots: int) -> tuple[Tensor, Tensor]:
    """For (B, 2) grid shapes: the slot of each canvas cell, (B, S*S), with `slots` for cells outside the
    grid, and each cell's offset within its slot's run. The h * w cells of a grid, in reading order, are
    split into `slots` runs as even as can be (floor or ceil of h * w / slots cells; one or none per slot
    when the grid has fewer cells than slots): every code carries a share, none more than it must."""
    rows, cols = grid_positions(grid_size, grid_size, shapes.device)
    heights, widths = shapes[:, :1], shapes[:, 1:]
    inside = (rows < heights) & (cols < widths)
    cells = heights * widths
    index = rows * widths + cols  # the cell's place in the grid's reading order
    slot = index * slots // cells
    first = (slot * cells + slots - 1) // slots  # the first cell of that slot's run
    return torch.where(inside, slot, slots), torch.where(inside, index - first, 0)


def run_cells(slot: Tensor, offset: Tensor, slots: int, run_length: int) -> Tensor:
    """From grid_slot_layout's (B, S*S) slot and offset of each cell: (B, slots * run_length), the canvas
    index of the cell at place j of slot k's run at k * run_length + j, and S*S where the run is shorter."""
    batch, cells = slot.shape
    place = torch.where(slot < slots, slot * run_length + offset, slots * run_length)
    index = torch.full((batch, (slots + 1) * run_length), cells, dtype=torch.long, device=slot.device)
    index.scatter_(1, place, torch.arange(cells, device=slot.device).expand(batch, -1))
    return index[:, :slots * run_length]


def cells_per_code(shapes: Tensor, slots: int) -> Tensor:
    """For (B, 2) grid shapes: the most of a grid's own cells one of `slots` codes must carry,
    ceil(h * w / slots) (what grid_slot_layout gives each slot's run)."""
    cells = shapes[:, 0].long() * shapes[:, 1].long()
    return (cells + slots - 1) // slots


def patch_slot_map(grid_size: int, slots: int) -> Tensor:
    """The slot of each cell (row-major) when `slots` slots tile the grid in equal rectangular
    patches: rows x cols of patches with rows the largest divisor of `slots` up to its square root
    that divides the grid, e.g. 32 x 32 cells and 128 slots -> 8 x 16 patches of 4 x 2 cells."""
    for patch_rows in range(int(slots**0.5), 0, -1):
        patch_cols = slots // patch_rows
        if slots % patch_rows == 0 and grid_size % patch_rows == 0 and grid_size % patch_cols == 0:
            rows, cols = grid_positions(grid_size, grid_size, torch.device("cpu"))
            return (rows // (grid_size // patch_rows)) * patch_cols + cols // (grid_size // patch_cols)
    raise ValueError(f"{slots} latent slots cannot tile a {grid_size} x {grid_size} grid in equal patches; "
                     f"set model.patch_slots=false or model.latents to a number that can")
