"""The grid dVAE: a grid -> N discrete codes -> the grid.

Encoder: a bidirectional transformer over the grid's cells with 2-D RoPE (its own base per axis)
and a learned embedding of each cell's position.
Pooling: N learned latent queries read the encoded grid (attention pooling) into N slots.
Codebook: each slot becomes one discrete code (nn.codebooks: gumbel, reinmax, softmax, vq, fsq).
Decoder: learned per-cell queries attend to each other (2-D RoPE) and read the codes; a head
gives each cell's logits. The code is the only path from input to output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latentforge.nn.blocks import DecoderBlock, EncoderBlock, LatentBlock
from latentforge.nn.codebooks import CodebookOutput, build_codebook
from latentforge.nn.rope import grid_positions, rope_2d_tables
from latentforge.nn.transformer import TransformerShape


class GridDVAE(nn.Module):
    def __init__(self, vocab_in: int, vocab_out: int, grid_size: int, d_model: int, n_head: int, mlp_ratio: float,
                 dropout: float, encoder_layers: int, pool_layers: int, decoder_layers: int, latents: int,
                 codebook: str, codebook_size: int, codebook_options: dict, rope_base_row: float,
                 rope_base_col: float, patch_slots: bool = False):
        super().__init__()
        self.grid_size = grid_size
        cells = grid_size * grid_size
        shape = TransformerShape(vocab_size=vocab_in, n_head=n_head, d_model=d_model, mlp_ratio=mlp_ratio,
                                 dropout=dropout, max_len=cells)
        self.embed = nn.Embedding(vocab_in, d_model)
        # Absolute cell positions: RoPE makes the encoder's attention position-aware, but only relative
        # positions, and attention pooling (no RoPE) would read a bag of cells with no idea where each was.
        self.cell_positions = nn.Parameter(torch.empty(cells, d_model))
        self.encoder = nn.ModuleList(EncoderBlock(shape) for _ in range(encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model)
        self.latent_queries = nn.Parameter(torch.empty(latents, d_model))
        self.pool = nn.ModuleList(LatentBlock(shape) for _ in range(pool_layers))
        self.pool_norm = nn.LayerNorm(d_model)
        self.codebook = build_codebook(codebook, d_model, codebook_size, **codebook_options)
        self.cell_queries = nn.Parameter(torch.empty(cells, d_model))
        self.decoder = nn.ModuleList(DecoderBlock(shape, causal=False) for _ in range(decoder_layers))
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
        for stack, branches in ((self.encoder, 2), (self.pool, 3), (self.decoder, 3)):
            for name, p in stack.named_parameters():
                if name.endswith(("proj.weight", "down.weight")):
                    nn.init.normal_(p, std=0.02 / (branches * max(len(stack), 1)) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def latents(self) -> int:
        return self.latent_queries.shape[0]

    def encode(self, grids: Tensor, temperature: float = 1.0, hardness: float = 1.0) -> CodebookOutput:
        """Token grids (B, S, S) -> the codebook's output for the N latent slots."""
        x = self.embed(grids.flatten(1)) + self.cell_positions
        for block in self.encoder:
            x = block(x, self.rope_cos, self.rope_sin)
        x = self.encoder_norm(x)
        h = self.latent_queries.expand(len(grids), -1, -1)
        for block in self.pool:
            h = block(h, x)
        return self.codebook(self.pool_norm(h), temperature, hardness)

    def decode(self, z: Tensor) -> Tensor:
        """Quantized slots (B, N, D) -> per-cell logits (B, S*S, vocab_out)."""
        x = self.cell_queries.expand(len(z), -1, -1)
        if self.slot_of_cell is not None:
            x = x + z[:, self.slot_of_cell].to(x.dtype)
        for block in self.decoder:
            x = block(x, self.rope_cos, self.rope_sin, z)
        return self.head(self.norm(x))

    def forward(self, grids: Tensor, temperature: float = 1.0, hardness: float = 1.0) -> tuple[Tensor, CodebookOutput]:
        out = self.encode(grids, temperature, hardness)
        return self.decode(out.z), out


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
