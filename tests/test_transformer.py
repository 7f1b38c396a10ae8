"""The engine's transformer (nn/transformer.py) with a padded vocabulary: the logits, loss and gradients of
the unpadded model, in the model itself and in the multiply decoder that reads its head; and the residual
stream's dtype under autocast (model.residual), in it and in nn/lm.py's decoder."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import train_refused

from latentforge.nn.lm import LM, LMConfig
from latentforge.nn.transformer import Transformer, TransformerShape
from latentforge.tasks.multiply.decoder import DecoderLM

SHAPE = TransformerShape(vocab_size=19, n_layer=2, n_head=2, d_model=32, max_len=16)
VOCAB_ROWS = ("embed.weight", "head.weight")


def padded_and_plain(tie: bool) -> tuple[Transformer, Transformer]:
    """A model with 19 ids padded to 64 rows, whose padded rows are large enough to win every argmax and
    swamp every softmax they entered, and the unpadded model holding its first 19 rows."""
    torch.manual_seed(0)
    padded = Transformer(dataclasses.replace(SHAPE, tie_embeddings=tie, vocab_multiple=64))
    with torch.no_grad():
        for name in VOCAB_ROWS:
            getattr(padded, name.split(".")[0]).weight[19:] *= 1000
    plain = Transformer(dataclasses.replace(SHAPE, tie_embeddings=tie))
    plain.load_state_dict({k: v[:19] if k in VOCAB_ROWS else v for k, v in padded.state_dict().items()})
    return padded, plain


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("loss_logits", ["sliced", "padded"])
def test_a_padded_vocabulary_computes_what_the_unpadded_one_does(tie, loss_logits):
    """The loss over the sliced logits, and over all 64 rows with the padded ones at -inf (padded=True, what
    the losses use), equal the unpadded model's, gradients too."""
    padded, plain = padded_and_plain(tie)
    assert padded.embed.num_embeddings == padded.head.out_features == 64 and plain.embed.num_embeddings == 19
    tokens = torch.randint(0, 19, (3, 10), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model in (("padded", padded), ("plain", plain)):
        logits = model(tokens, padded=loss_logits == "padded")
        if name == "padded" and loss_logits == "padded":
            assert logits.shape == (3, 10, 64) and torch.isneginf(logits[..., 19:]).all()
            torch.testing.assert_close(logits[..., :19], model(tokens))
        else:
            assert logits.shape == (3, 10, 19)
        losses[name] = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        losses[name].backward()
    torch.testing.assert_close(losses["padded"], losses["plain"])
    grads = dict(plain.named_parameters())
    for name, p in padded.named_parameters():
        rows = 19 if name in VOCAB_ROWS else None
        torch.testing.assert_close(p.grad[:rows], grads[name].grad, msg=name)
        if rows:  # no input reads the padded rows and no logit of theirs is scored
            assert torch.count_nonzero(p.grad[19:]) == 0, name


def test_learned_positions_are_the_only_positions_the_model_sees():
    """positions=learned (GPT-2's): one embedding row per position added to the input, and no RoPE. With the
    rows zeroed, one layer of causal attention sees its prefix as a set: reordering the tokens before the last
    leaves the last output as it is (RoPE would change it); with the rows, it does not."""
    torch.manual_seed(0)
    one_layer = dataclasses.replace(SHAPE, n_layer=1)
    model = Transformer(dataclasses.replace(one_layer, positions="learned"))
    assert model.pos_embed.weight.shape == (16, 32) and model.rope_cos is None
    tokens = torch.randperm(19)[:10][None]
    reordered = torch.cat([tokens[:, :9].flip(1), tokens[:, 9:]], 1)
    logits = model(tokens)
    assert not torch.allclose(logits[0, -1], model(reordered)[0, -1], atol=1e-4)
    _, kept = model.hidden(model.embed(tokens), keep=(0,))  # the first block's input: what a layer-0 probe reads
    torch.testing.assert_close(kept[0], model.embed(tokens) + model.pos_embed.weight[:10])
    logits.sum().backward()
    assert model.pos_embed.weight.grad[:10].abs().sum(1).gt(0).all() and model.pos_embed.weight.grad[10:].eq(0).all()
    with torch.no_grad():
        model.pos_embed.weight.zero_()
    torch.testing.assert_close(model(tokens)[0, -1], model(reordered)[0, -1])
    rope = Transformer(one_layer)  # the same check fails with rotary positions
    assert not torch.allclose(rope(tokens)[0, -1], rope(reordered)[0, -1], atol=1e-4)
    with pytest.raises(ValueError, match="longer than model.max_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_the_multiply_decoder_scores_and_generates_over_the_vocabulary_only():
    padded, plain = padded_and_plain(tie=True)
    decoders = []
    for transformer in (padded, plain):
        decoder = DecoderLM(transformer.shape, probe_layers=(1,)).eval()
        decoder.transformer = transformer.eval()
        decoders.append(decoder)
    tokens = torch.randint(0, 19, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (logits, probes), (plain_logits, _) = (d(tokens, with_probes=True) for d in decoders)
        assert logits.shape == (2, 6, 19) and probes[1].shape == (2, 6)
        torch.testing.assert_close(logits, plain_logits)
        # Greedy decoding picks among the 19 ids: the padded rows would win every argmax.
        assert torch.equal(decoders[0].generate(tokens, 5), decoders[1].generate(tokens, 5))


@pytest.mark.parametrize("overrides, message", [
    (["model.vocab_multiple=0"], "error: model.vocab_multiple must be >= 1 (got 0)"),
    (["task.variant=latent", "model.vocab_multiple=64"],
     "error: model.vocab_multiple does not apply to task.variant=latent (its model has a head of its own); "
     "remove it"),
    (["task.variant=latent", "model.positions=learned"],
     "error: model.positions does not apply to task.variant=latent (its encoder-decoder has RoPE only); remove it"),
    (["model.positions=absolute"], "error: model.positions must be one of 'rope', 'learned' (got 'absolute')"),
])
def test_bad_model_options_are_one_line_and_leave_nothing(cli, runs_dir, overrides, message):
    train_refused(cli, runs_dir, "multiply/tiny", overrides, message)



def test_the_residual_option_reaches_the_model_and_the_latent_variant_refuses_it():
    from latentforge.config import load_config
    from latentforge.errors import ConfigError
    from latentforge.nn.transformer import TransformerConfig

    assert TransformerConfig(residual="autocast").shape(vocab_size=10, max_len=8).residual == "autocast"
    assert load_config("multiply/tiny", ["model.residual=autocast"]).model.residual == "autocast"
    with pytest.raises(ConfigError, match="model.residual.*task.variant=latent"):
        load_config("multiply/latent", ["model.residual=autocast"])


def residual_pair(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights with the residual stream in fp32 and in the autocast dtype."""
    torch.manual_seed(0)
    if kind == "transformer":
        return Transformer(SHAPE), Transformer(dataclasses.replace(SHAPE, residual="autocast"))
    shape = {"vocab_size": 19, "n_layer": 2, "n_head": 2, "d_model": 32, "max_len": 16}
    make = LMConfig.gpt2 if kind == "gpt2" else LMConfig
    return LM(make(**shape)), LM(make(**shape, residual="autocast"))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # RMSNorm's unfused bf16 path
@pytest.mark.parametrize("kind", ["transformer", "gpt2", "llama"])
def test_an_autocast_residual_carries_the_stream_in_bf16_and_trains_as_fp32_does(kind):
    """residual=autocast: under bf16 autocast every block's output (the residual stream, so its gradient too) is
    bf16, and the loss and gradients stay within bf16's rounding of the fp32 stream's; without autocast
    nothing changes."""
    fp32, bf16 = residual_pair(kind)
    bf16.load_state_dict(fp32.state_dict())
    tokens = torch.randint(0, 19, (4, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bf16(tokens), fp32(tokens), rtol=0, atol=0)
    losses, streams = {}, {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        blocks = model.blocks if kind == "transformer" else model.layers
        hooks = [b.register_forward_hook(lambda _, __, out, name=name: streams.setdefault(name, set()).add(out.dtype))
                 for b in blocks]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
        for hook in hooks:
            hook.remove()
        losses[name] = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())
        losses[name].backward()
    assert streams == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert losses["bf16"] != losses["fp32"]  # the stream really is rounded
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=1e-2, atol=1e-2)
    for (name, p), q in zip(bf16.named_parameters(), fp32.parameters()):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, rtol=0.1, atol=2e-3, msg=name)
