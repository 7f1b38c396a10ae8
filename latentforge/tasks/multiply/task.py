"""The `multiply` task: ways a small transformer can learn a x b = c, with and without a chain of
thought, all trained on the same generated pairs and scored by the same evaluator.

Variants (task.variant): nocot (answer only), cot (explicit chain), icot-si (the chain removed
stage by stage), latent (encoder -> k latent tokens -> decoder), pause (k thought tokens,
optionally continuous), aux-probe (answer only plus probes regressing the running sums).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from latentforge.config import Config, TaskConfig, require, require_evaluated_metric
from latentforge.engine.schedules import ScalarSchedule
from latentforge.engine.task import Task
from latentforge.errors import ConfigError, DataError
from latentforge.nn.losses import cross_entropy
from latentforge.nn.transformer import TransformerConfig
from latentforge.tasks.multiply.data import (
    MAX_OPERAND_DIGITS,
    Examples,
    MultiplyBatches,
    MultiplyData,
    OperandSpace,
    column_totals,
    from_digits,
    read_icot_file,
)
from latentforge.tasks.multiply.decoder import DecoderLM
from latentforge.tasks.multiply.latent import LatentTransformer, scheduled_inputs
from latentforge.tasks.multiply.layout import (
    ANSWER,
    END,
    IGNORE,
    PAD,
    VOCAB_SIZE,
    answer_tokens,
    build_sequences,
    chain_length,
    chain_tokens,
    extract_answer,
    render,
    sequence_length,
)
from latentforge.track.progress import tracked

ICOT_DIR = Path(__file__).parent / "icot"
ICOT_SIZES = (4, 5, 7, 9, 11)
Variant = Literal["nocot", "cot", "icot-si", "latent", "pause", "aux-probe"]


@dataclass
class InternalizeConfig:
    """icot-si: chain tokens removed from the left, `remove_per_stage` more at each stage."""

    remove_per_stage: int = 8
    # A stage lasts stage_steps optimizer steps, or stage_epochs epochs of data.epoch_size pairs.
    stage_steps: int = 0
    stage_epochs: float = 0.0
    # Removal smoothing: each example drops o extra tokens, P(o) proportional to exp(-smoothing * o); 0 = off.
    smoothing: float = 0.0
    # Clear the optimizer's moments at each stage boundary (as the ICoT-SI paper does).
    reset_optimizer: bool = True

    def validate(self) -> None:
        require(self.remove_per_stage >= 1, "remove_per_stage", f"must be >= 1 (got {self.remove_per_stage})")
        require(self.stage_steps >= 0 and self.stage_epochs >= 0, "stage_steps",
                "and stage_epochs must be >= 0")
        require((self.stage_steps > 0) != (self.stage_epochs > 0), "stage_steps",
                f"or stage_epochs: set exactly one of them > 0 (got {self.stage_steps}, {self.stage_epochs})")
        require(self.smoothing >= 0, "smoothing", f"must be >= 0 (got {self.smoothing})")


@dataclass
class MultiplyTaskConfig(TaskConfig):
    variant: Variant = "nocot"
    internalize: InternalizeConfig = field(default_factory=lambda: InternalizeConfig(stage_steps=1000))
    # latent: probability of feeding the true previous answer digit to the decoder (scheduled sampling).
    teacher_forcing: ScalarSchedule = field(default_factory=ScalarSchedule)
    # aux-probe: weight of the probes' mean squared error in the loss (a number, or a schedule over the steps).
    probe_weight: ScalarSchedule = field(default_factory=lambda: ScalarSchedule(start=1.0, end=1.0))

    def validate(self) -> None:
        super().validate()
        pw = self.probe_weight
        require(pw.start >= 0 and pw.end >= 0, "probe_weight", f"must be >= 0 (got {pw.start}, {pw.end})")
        tf = self.teacher_forcing
        require(0 <= tf.start <= 1 and 0 <= tf.end <= 1, "teacher_forcing",
                f"start and end are probabilities in [0, 1] (got {tf.start}, {tf.end})")


@dataclass
class MultiplyModelConfig(TransformerConfig):
    max_len: int = 64
    # pause: thought tokens between the question and the answer; continuous feeds back hidden states.
    thoughts: int = 0
    continuous: bool = False
    # latent: n_layer decoder blocks read `latents` learned tokens refined by latent_layers blocks
    # from an encoder_layers encoder; bottleneck 1 = the decoder sees only the latents, < 1 also
    # the encoder's memory (its attention weight scaled by 1 - bottleneck).
    latents: int = 8
    encoder_layers: int = 2
    latent_layers: int = 2
    bottleneck: float = 1.0
    # aux-probe: the residual stream after these blocks (1 = first) is probed for the running sums.
    probe_layers: list[int] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        for key in ("max_len", "latents", "encoder_layers"):
            require(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        require(self.thoughts >= 0, "thoughts", f"must be >= 0 (got {self.thoughts})")
        require(self.latent_layers >= 0, "latent_layers", f"must be >= 0 (got {self.latent_layers})")
        require(0 <= self.bottleneck <= 1, "bottleneck", f"must be in [0, 1] (got {self.bottleneck})")
        for layer in self.probe_layers:
            require(1 <= layer <= self.n_layer, "probe_layers",
                    f"must name blocks 1..{self.n_layer} (got {self.probe_layers})")


@dataclass
class MultiplyDataConfig:
    # Inclusive [min, max] digit counts of each operand.
    digits_a: tuple[int, int] = (1, 2)
    digits_b: tuple[int, int] = (1, 2)
    # Held-out pairs, never trained on (with holdout_commuted, b*a is held out with a*b).
    test_size: int = 1000
    holdout_commuted: bool = True
    # Least-significant digit first, as in the implicit-CoT papers.
    reverse: bool = True
    # Zero-pad operands to their widest and the answer to the sum of the widths (the
    # implicit-CoT layout): every example aligns, which small models learn far faster.
    fixed_width: bool = True
    # Splits evaluated during training; `train` is a sample of the training pairs.
    eval_splits: list[str] = field(default_factory=lambda: ["test"])
    train_eval_size: int = 1000
    # The public implicit-CoT sets of this run's N x N (valid, test): splits icot_valid, icot_test. N is the
    # operands' largest digit count, so [1, N] x [1, N] (a mix of shorter products) is evaluated on them too.
    # Every public set's pairs are kept out of the training data.
    icot_sets: list[str] = field(default_factory=list)
    # With icot_sets, a mix also gets the public sets of each shorter size M that both operands reach, as
    # splits icot_valid_MxM and icot_test_MxM (evaluated with `latentforge eval --split`, or listed in
    # eval_splits), their pairs kept out of training too.
    icot_shorter: bool = True
    # Extra evaluation sets from implicit-CoT files: {split name: path}.
    eval_files: dict[str, str] = field(default_factory=dict)
    eval_batch_size: int = 1000
    # Pairs per epoch where the pairs are sampled, not enumerated (the papers' 808k training files).
    epoch_size: int = 808_000
    seed: int = 1234
    # Training batches made together in one pass of the data kernels (the same batches as one at a time).
    chunk_batches: int = 256

    # Runs saved before icot_shorter existed trained with only their N x N sets held out: they resume so.
    old_run_values: ClassVar[dict[str, Any]] = {"icot_shorter": False}

    def __post_init__(self) -> None:
        # Absolute paths, so the saved config evaluates and reruns from any directory.
        if isinstance(self.eval_files, dict):
            self.eval_files = {k: str(Path(v).expanduser().resolve()) if isinstance(v, str) else v
                               for k, v in self.eval_files.items()}

    def validate(self) -> None:
        for key in ("digits_a", "digits_b"):
            low, high = getattr(self, key)
            require(1 <= low <= high <= MAX_OPERAND_DIGITS, key,
                    f"must be [min, max] with 1 <= min <= max <= {MAX_OPERAND_DIGITS} (got {[low, high]})")
        require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (got {self.seed})")
        for key in ("test_size", "train_eval_size", "eval_batch_size", "epoch_size", "chunk_batches"):
            require(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        size = OperandSpace(self.digits_a, self.digits_b).size
        require(self.test_size <= size // 2, "test_size",
                f"must be at most half of the {size} possible pairs (got {self.test_size})")
        for name in self.icot_sets:
            require(name in ("valid", "test"), "icot_sets", f"items must be valid or test (got {name!r})")
        if self.icot_sets:
            n = self.digits_a[1]
            require(self.digits_a[1] == self.digits_b[1] == n and n in ICOT_SIZES, "icot_sets",
                    f"needs digits_a and digits_b up to the same N in {list(ICOT_SIZES)}, the sizes of the public "
                    f"sets (got {list(self.digits_a)}, {list(self.digits_b)}); set data.icot_sets=[] otherwise")
        for name in self.eval_files:
            require(name not in ("test", "train") and not name.startswith("icot_") and "/" not in name,
                    "eval_files", f"split name {name!r} must not be test, train, icot_* or contain '/'")

    def shorter_icot_sizes(self) -> list[int]:
        """The public sizes below N that both operands reach (with icot_shorter)."""
        low = max(self.digits_a[0], self.digits_b[0])
        return [m for m in ICOT_SIZES if low <= m < self.digits_a[1]] if self.icot_shorter else []

    def files(self) -> dict[str, str]:
        """Every evaluation file by split name."""
        n = self.digits_a[1]
        public = {f"icot_{s}" + (f"_{m}x{m}" if m < n else ""): str(ICOT_DIR / f"{m}_by_{m}" / f"{s}.txt")
                  for m in [n, *self.shorter_icot_sizes()] for s in self.icot_sets}
        return {**public, **self.eval_files}


def chain_and_thoughts(cfg: Config) -> tuple[bool, int]:
    """What the variant puts between question and answer: the chain (cot, icot-si), thought tokens (pause)."""
    return cfg.task.variant in ("cot", "icot-si"), cfg.model.thoughts if cfg.task.variant == "pause" else 0


# Options that only one variant reads: setting them for another is a mistake worth a clear error.
VARIANT_OPTIONS = {
    "pause": [("model", "thoughts"), ("model", "continuous")],
    "latent": [("model", "latents"), ("model", "encoder_layers"), ("model", "latent_layers"),
               ("model", "bottleneck"), ("task", "teacher_forcing")],
    "aux-probe": [("model", "probe_layers"), ("task", "probe_weight")],
    "icot-si": [("task", "internalize")],
}


class Multiply(Task):
    name = "multiply"
    TaskConfig = MultiplyTaskConfig
    ModelConfig = MultiplyModelConfig
    DataConfig = MultiplyDataConfig

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        d = cfg.data
        self.variant = cfg.task.variant
        self.with_chain, self.thoughts = chain_and_thoughts(cfg)
        self.length = sequence_length(d.digits_a[1], d.digits_b[1], self.with_chain, self.thoughts)
        # Read the evaluation files now: a bad file stops the run before any training, and their
        # pairs are kept out of the training data.
        self._eval_sets = {split: read_icot_file(path).widened(d.digits_a[1], d.digits_b[1]).to(self.device)
                           for split, path in d.files().items()}
        exclude = None
        if self._eval_sets:
            sets = list(self._eval_sets.values())
            exclude = (torch.cat([from_digits(e.a).cpu() for e in sets]),
                       torch.cat([from_digits(e.b).cpu() for e in sets]))
        self.data = MultiplyData(d.digits_a, d.digits_b, d.test_size, d.holdout_commuted, d.seed, exclude)
        self.stream: MultiplyBatches | None = None
        self.stage_steps = self._stage_steps()

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        d, m, variant = cfg.data, cfg.model, cfg.task.variant
        defaults = {"model": MultiplyModelConfig(), "task": MultiplyTaskConfig()}
        for owner, options in VARIANT_OPTIONS.items():
            for section, key in options:
                if owner != variant and getattr(getattr(cfg, section), key) != getattr(defaults[section], key):
                    raise ConfigError(f"{section}.{key} applies to task.variant={owner} only "
                                      f"(this run is {variant}); remove it")
        require(variant != "latent" or m.vocab_multiple == 1, "model.vocab_multiple",
                "does not apply to task.variant=latent (its model has a head of its own); remove it")
        require(variant != "latent" or m.positions == "rope", "model.positions",
                "does not apply to task.variant=latent (its encoder-decoder has RoPE only); remove it")
        require(variant != "latent" or m.residual == "fp32", "model.residual",
                "does not apply to task.variant=latent (its encoder-decoder keeps an fp32 stream); remove it")
        if variant == "pause":
            require(m.thoughts >= 1, "model.thoughts", "must be >= 1 for task.variant=pause")
        if variant == "aux-probe":
            require(bool(m.probe_layers), "model.probe_layers", "must name at least one block for aux-probe")
        length = sequence_length(d.digits_a[1], d.digits_b[1], *chain_and_thoughts(cfg))
        require(length <= m.max_len, "model.max_len",
                f"must be >= {length}, the longest sequence of data.digits_a/digits_b (got {m.max_len})")
        splits = ["test", "train", *d.files()]
        for split in d.eval_splits:
            if split not in splits:
                why = ("; icot_*_MxM needs data.icot_sets, data.icot_shorter and both operands' fewest digits <= M"
                       if re.fullmatch(r"icot_\w+_\d+x\d+", split) else "")
                raise ConfigError(f"data.eval_splits: unknown split {split!r} (splits: {', '.join(splits)}){why}")
        require_evaluated_metric(cfg.checkpoint.metric, d.eval_splits, "test/exact_match")

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        m = self.cfg.model
        if self.variant == "latent":
            return LatentTransformer(
                vocab_size=VOCAB_SIZE, pad_id=PAD, d_model=m.d_model, n_head=m.n_head, mlp_ratio=m.mlp_ratio,
                dropout=m.dropout, max_len=m.max_len, encoder_layers=m.encoder_layers,
                latent_layers=m.latent_layers, decoder_layers=m.n_layer, latents=m.latents, bottleneck=m.bottleneck)
        shape = m.shape(VOCAB_SIZE, m.max_len)
        probes = tuple(m.probe_layers) if self.variant == "aux-probe" else ()
        return DecoderLM(shape, continuous=self.variant == "pause" and m.continuous, probe_layers=probes)

    # ------------------------------------------------------------------ icot-si schedule
    def _stage_steps(self) -> int:
        cfg = self.cfg.task.internalize
        if cfg.stage_steps:
            return cfg.stage_steps
        pairs_per_step = self.cfg.train.batch_size * self.cfg.train.grad_accum
        epoch = self.data.train_size or self.cfg.data.epoch_size
        return max(1, math.ceil(cfg.stage_epochs * epoch / pairs_per_step))

    def removed_at(self, step: int) -> int:
        """Chain tokens removed from the left for the update at `step` (before smoothing)."""
        if self.variant != "icot-si":
            return 0
        return (step // self.stage_steps) * self.cfg.task.internalize.remove_per_stage

    def new_stage(self, step: int) -> bool:
        """icot-si: a stage starts here, while chain tokens are still left to remove."""
        if self.variant != "icot-si" or step == 0 or step % self.stage_steps:
            return False
        d = self.cfg.data
        # The chain and its `#`: once that many tokens are removed there are no stages left.
        return self.removed_at(step - 1) < chain_length(d.digits_a[1], d.digits_b[1]) + 1

    def reset_optimizer(self, step: int) -> bool:
        return self.new_stage(step) and self.cfg.task.internalize.reset_optimizer

    def last_step(self) -> int:
        """The step the model was last trained at (the end of training for a loaded run): the
        evaluation loss uses that step's layout (for icot-si, its stage)."""
        if self.stream is None:
            return max(self.cfg.train.steps - 1, 0)
        return max(self.stream.index // self.cfg.train.grad_accum - 1, 0)

    # ------------------------------------------------------------------ batches
    def train_batches(self) -> MultiplyBatches:
        d = self.cfg.data
        # icot-si draws its removal smoothing, latent its teacher forcing and aux-probe a scheduled probe
        # weight per step; the rest do not.
        stepless = self.variant in ("nocot", "cot", "pause") or (
            self.variant == "aux-probe" and self.cfg.task.probe_weight.kind == "constant")
        self.stream = MultiplyBatches(self.data, self.cfg.train.batch_size, d.fixed_width,
                                      lambda ex, index: self.make_batch(ex, index // self.cfg.train.grad_accum),
                                      self.device, d.chunk_batches, stepless)
        return self.stream

    def make_batch(self, ex: Examples, step: int, smooth: bool = True) -> dict[str, Any]:
        """What the model trains on at `step`: token rows and targets, and the variant's extras."""
        d = self.cfg.data
        chain = removed = None
        if self.with_chain:
            chain = chain_tokens(ex, d.reverse)
            removed = torch.full((len(ex),), self.removed_at(step), dtype=torch.int64, device=self.device)
            smoothing = self.cfg.task.internalize.smoothing
            if self.variant == "icot-si" and smooth and smoothing > 0:
                # P(o) ~ exp(-smoothing * o): the floor of an exponential variable with that rate.
                u = torch.rand(len(ex), device=self.device).clamp(min=1e-12)
                removed = removed + torch.floor(-torch.log(u) / smoothing).long()
        seqs = build_sequences(ex, d.reverse, self.length, chain, removed, self.thoughts)
        if self.variant == "latent":
            return self._latent_batch(ex, seqs.tokens, step)
        inputs, targets = seqs.training_pair()
        batch: dict[str, Any] = {"inputs": inputs, "targets": targets}
        if self.variant == "icot-si":
            batch["removed"] = removed.float().mean()
        if self.variant == "aux-probe":
            batch["probe_targets"] = self._probe_targets(ex, seqs.prompt_len, inputs.shape[1])
            if self.cfg.task.probe_weight.kind != "constant":
                # A fill, not a copy from the host: no sync, and a CUDA graph replays it from the batch.
                batch["probe_weight"] = torch.full((), self.cfg.task.probe_weight.value(step), device=self.device)
        return batch

    def _latent_batch(self, ex: Examples, tokens: torch.Tensor, step: int) -> dict[str, Any]:
        """Question `a * b` (PAD after it) for the encoder; `= c` -> `c <end>` for the decoder."""
        width_q = self.cfg.data.digits_a[1] + self.cfg.data.digits_b[1] + 1
        q_len = ex.len_a + ex.len_b + 1
        positions = torch.arange(width_q, device=self.device)[None]
        question = tokens[:, :width_q].masked_fill(positions >= q_len[:, None], PAD)
        width_c = ex.c.shape[1] + 2
        index = (q_len[:, None] + torch.arange(width_c, device=self.device)[None]).clamp(max=tokens.shape[1] - 1)
        decoder = tokens.gather(1, index)
        targets = decoder[:, 1:].masked_fill(decoder[:, 1:] == PAD, IGNORE)
        p = self.cfg.task.teacher_forcing.value(step)
        # A Python float: scheduled sampling reads it on the host every step without a device sync.
        return {"question": question, "inputs": decoder[:, :-1], "targets": targets, "teacher_forcing": p}

    def _probe_targets(self, ex: Examples, prompt_len: torch.Tensor, width: int) -> torch.Tensor:
        """At the input position that predicts answer digit k: column k's running sum (scaled to
        about [0, 1]); NaN elsewhere."""
        totals = column_totals(ex.a, ex.b).float() / (81.0 * min(ex.a.shape[1], ex.b.shape[1]))
        out = torch.full((len(ex), width), float("nan"), device=self.device)
        k = torch.arange(totals.shape[1], device=self.device)[None]
        offset = k if self.cfg.data.reverse else ex.len_c[:, None] - 1 - k
        position = prompt_len[:, None] + offset - 1
        valid = k < ex.len_c[:, None]
        out.scatter_(1, torch.where(valid, position, width - 1).clamp(max=width - 1),
                     torch.where(valid, totals, float("nan")))
        return out

    # ------------------------------------------------------------------ loss
    def loss(self, model: nn.Module, batch: dict[str, Any]):
        targets = batch["targets"]
        metrics: dict[str, torch.Tensor] = {}
        probes: dict[int, torch.Tensor] = {}
        if self.variant == "latent":
            p = batch["teacher_forcing"]
            inputs = scheduled_inputs(model, batch["question"], batch["inputs"], p)
            logits = model(batch["question"], inputs)
            metrics["teacher_forcing"] = torch.tensor(p, device=self.device)
        elif self.variant == "aux-probe":
            logits, probes = model(batch["inputs"], with_probes=True)
        else:
            logits = model(batch["inputs"])
        loss = cross_entropy(logits, targets, ignore_index=IGNORE)
        scored = targets != IGNORE
        metrics["answer_token_acc"] = ((logits.argmax(-1) == targets) & scored).sum() / scored.sum()
        if "removed" in batch:
            metrics["removed_tokens"] = batch["removed"]
        if probes:
            target = batch["probe_targets"]
            # A masked mean, not boolean indexing: no data-dependent shape, so no host-device sync.
            known = ~target.isnan()
            errors = [((p.float() - target.nan_to_num()) ** 2 * known).sum() / known.sum() for p in probes.values()]
            mse = torch.stack(errors).mean()
            metrics["token_loss"], metrics["probe_mse"] = loss.detach(), mse.detach()
            weight = batch.get("probe_weight", self.cfg.task.probe_weight.start)
            if "probe_weight" in batch:
                metrics["probe_weight"] = weight
            loss = loss + weight * mse
        return loss, metrics

    def loss_weight(self, batch: dict[str, Any]) -> torch.Tensor:
        return (batch["targets"] != IGNORE).sum()

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return batch["inputs"].numel() + (batch["question"].numel() if "question" in batch else 0)

    # ------------------------------------------------------------------ evaluation
    def eval_splits(self) -> list[str]:
        return ["test", "train", *self.cfg.data.files()]

    def training_eval_splits(self) -> list[str]:
        return list(self.cfg.data.eval_splits)

    def eval_examples(self, split: str) -> Examples:
        if split not in self._eval_sets:
            if split == "test":
                ex = self.data.examples(*self.data.test, self.device)
            else:
                d = self.cfg.data
                sampler = MultiplyBatches(self.data, d.train_eval_size, d.fixed_width, lambda ex, i: ex, self.device)
                ex = self.data.examples(*sampler.pairs(0), self.device)
            self._eval_sets[split] = ex
        return self._eval_sets[split]

    def generate(self, model: nn.Module, ex: Examples) -> torch.Tensor:
        """Greedy output after the prompt for examples of one operand layout (what the model writes:
        the chain and `#` if it learned one, then the answer and <end>)."""
        d = self.cfg.data
        answer_width = ex.c.shape[1] + 1
        if self.variant == "latent":
            batch = self._latent_batch(ex, build_sequences(ex, d.reverse, self.length).tokens, 0)
            return model.generate(batch["question"], batch["inputs"][:, :1], answer_width, END)
        seqs = build_sequences(ex, d.reverse, self.length, thoughts=self.thoughts)
        prompt = seqs.tokens[:, : int(seqs.prompt_len[0])]
        chain = chain_length(int(ex.len_a[0]), int(ex.len_b[0])) + 1 if self.with_chain else 0
        return model.generate(prompt, chain + answer_width)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Greedy-decode every answer: exact match and token accuracy, overall and per a x b length;
        the chain tokens written before the answer; the teacher-forced loss at the current stage."""
        d = self.cfg.data
        ex = self.eval_examples(split)
        layout = ex.fixed_width() if d.fixed_width else ex
        expected = answer_tokens(layout, d.reverse)
        target_len = layout.len_c + 1
        scored = torch.arange(expected.shape[1], device=self.device)[None] < target_len[:, None]
        correct = torch.zeros(len(ex), device=self.device)
        # Per answer digit, in the order written (least significant first with data.reverse): where the
        # carries are longest, the middle digits, is where answer-only models fail (Bai et al. 2025).
        digit_hits = torch.zeros(expected.shape[1], device=self.device)
        is_digit = torch.arange(expected.shape[1], device=self.device)[None] < layout.len_c[:, None]
        loss_sum = torch.zeros((), device=self.device)
        loss_weight = torch.zeros((), device=self.device)
        chain_sum = torch.zeros((), dtype=torch.int64, device=self.device)
        step = self.last_step()
        # Rows with the same operand layout share a prompt length and decode together.
        lengths = torch.stack([layout.len_a, layout.len_b], 1)
        groups = [((layout.len_a == la) & (layout.len_b == lb)).nonzero().squeeze(1)
                  for la, lb in torch.unique(lengths, dim=0).tolist()]
        chunks = [chunk for rows in groups for chunk in rows.split(d.eval_batch_size)]
        for chunk in tracked(chunks, f"eval {split}"):
            sub = layout.select(chunk)
            generated = self.generate(model, sub)
            got = extract_answer(generated, expected.shape[1])
            marked = (generated == ANSWER).any(1)
            chain_sum += torch.where(marked, (generated == ANSWER).int().argmax(1), 0).sum()
            right = got == expected[chunk]
            correct[chunk] = (right & scored[chunk]).sum(1).float()
            digit_hits += (right & is_digit[chunk]).sum(0).float()
            batch = self.make_batch(sub, step, smooth=False)
            if self.variant == "latent":
                batch["teacher_forcing"] = 1.0
            loss, _ = self.loss(model, batch)
            weight = self.loss_weight(batch)
            loss_sum += loss.float() * weight
            loss_weight += weight
        exact = correct == target_len
        metrics = {
            f"{split}/loss": float(loss_sum / loss_weight),
            f"{split}/token_acc": float(correct.sum() / target_len.sum()),
            f"{split}/exact_match": float(exact.float().mean()),
            # Tokens written before the answer: 0 means no chain of thought at inference.
            f"{split}/chain_tokens": float(chain_sum) / len(ex),
        }
        # Buckets by the operands' own lengths (not their padded layout).
        buckets = torch.stack([ex.len_a, ex.len_b], 1)
        for la, lb in torch.unique(buckets, dim=0).tolist():
            rows = (ex.len_a == la) & (ex.len_b == lb)
            metrics[f"{split}/exact_match/{la}x{lb}"] = float(exact[rows].float().mean())
            metrics[f"{split}/token_acc/{la}x{lb}"] = float(correct[rows].sum() / target_len[rows].sum())
        digits = is_digit.sum(0)
        for k in range(int((digits > 0).sum())):
            metrics[f"{split}/digit_acc/{k}"] = float(digit_hits[k] / digits[k])
        metrics[f"{split}/examples"] = float(len(ex))
        return metrics

    # ------------------------------------------------------------------ predict and FLOPs
    def parse_question(self, text: str) -> Examples:
        match = re.fullmatch(r"\s*(\d+)\s*[*x×]\s*(\d+)\s*", text)
        if not match:
            raise DataError(f"cannot read {text!r}: write two whole numbers, e.g. 1234*5678")
        d = self.cfg.data
        numbers = []
        for digits, (low, high), key in ((match[1], d.digits_a, "digits_a"), (match[2], d.digits_b, "digits_b")):
            value = int(digits)
            length = len(str(value))
            if not low <= length <= high:
                raise DataError(f"{value} has {length} digits; this model learned operands of {low} to {high} "
                                f"digits (data.{key})")
            numbers.append(value)
        ex = Examples.from_ints(torch.tensor([numbers[0]], device=self.device),
                                torch.tensor([numbers[1]], device=self.device), d.digits_a[1], d.digits_b[1])
        return ex.fixed_width() if d.fixed_width else ex

    @torch.no_grad()
    def predict(self, model: nn.Module, text: str) -> dict[str, str]:
        ex = self.parse_question(text)
        a, b = int(from_digits(ex.a)), int(from_digits(ex.b))
        generated = self.generate(model, ex)[0].tolist()
        chain, answer = [], generated
        if ANSWER in generated:
            at = generated.index(ANSWER)
            chain, answer = generated[:at], generated[at + 1:]
        answer = answer[: answer.index(END)] if END in answer else answer
        digits = [t for t in answer if t < 10]
        lines = {"question": f"{a} * {b}"}
        if self.with_chain or self.variant == "pause":
            lines["chain"] = render(chain) if self.with_chain else f"{self.thoughts} thought tokens"
        if len(digits) != len(answer) or not digits:
            lines["answer"] = f"(not a number: {render(answer)})"
        else:
            value = int("".join(map(str, digits[::-1] if self.cfg.data.reverse else digits)))
            lines["answer"] = str(value)
        lines["true"] = str(a * b)
        lines["correct"] = "yes" if lines["answer"] == lines["true"] else "no"
        return lines

    def flops_per_example(self, model: nn.Module) -> float:
        """Forward FLOPs over one example of the widest layout in a single pass: what a decoder with
        a key-value cache spends to write the answer (and chain) after reading the question."""
        d = self.cfg.data
        ex = Examples.from_ints(torch.ones(1, dtype=torch.int64, device=self.device),
                                torch.ones(1, dtype=torch.int64, device=self.device),
                                d.digits_a[1], d.digits_b[1]).fixed_width()
        # The layout of the trained model: for icot-si, that of the last step (chain internalized).
        batch = self.make_batch(ex, max(self.cfg.train.steps - 1, 0), smooth=False)
        was_training = model.training
        model.eval()
        # Counted with autograd on: the flop counter's module tracker trips over no-grad views of parameters.
        with FlopCounterMode(display=False) as counter:
            if self.variant == "latent":
                model(batch["question"], batch["inputs"])
            else:
                model.transformer(batch["inputs"])
        model.train(was_training)
        return float(counter.get_total_flops())


TASK = Multiply
