"""The decoder LM (nn/lm.py): masks, grouped-query attention, the KV cache, generation, the loss and FLOPs."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentforge.config import build_dataclass
from latentforge.errors import ConfigError
from latentforge.nn.generate import generate
from latentforge.nn.lm import LM, LMConfig, attention_mask, forward_flops
from latentforge.nn.lm_loss import lm_loss

LLAMA = dict(vocab_size=61, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_len=48, rope_theta=500.0)
FAMILIES = {"llama": LMConfig(**LLAMA), "gpt2": LMConfig.gpt2(vocab_size=61, n_layer=2, n_head=4, d_model=32,
                                                              max_len=48)}


def build(cfg: LMConfig, seed: int = 0) -> LM:
    """A model with weight matrices large enough that greedy decoding does not repeat one token."""
    torch.manual_seed(seed)
    model = LM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_equal_each_document_alone(family):
    model = build(FAMILIES[family])
    lengths = [3, 6, 4]
    docs = [torch.randint(0, 61, (n,)) for n in lengths]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(ids, doc_ids=doc_ids, positions=positions)[0]
    alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # Without doc_ids the later documents read the earlier ones: the mask is what keeps them apart.
    assert not torch.allclose(model(ids, positions=positions)[0, 3:], alone[3:], atol=1e-3)


def test_attention_mask_is_causal_within_documents_and_open_over_the_prefix():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1]])
    mask = attention_mask(5, 0, doc_ids, None, torch.device("cpu"))[0, 0]
    expected = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert mask.int().tolist() == expected
    prefix = attention_mask(4, 0, None, torch.tensor([2, 0]), torch.device("cpu"))[:, 0]
    assert prefix[0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert prefix[1].int().tolist() == torch.ones(4, 4).tril().int().tolist()
    assert attention_mask(4, 0, None, None, torch.device("cpu")) is None  # SDPA's own causal kernel


def test_prefix_lm_reads_the_whole_prefix_and_stays_causal_after_it():
    model = build(FAMILIES["llama"])
    ids = torch.randint(0, 61, (1, 10))
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 61  # inside a prefix of 5
    base, other = model(ids, prefix_len=5), model(changed, prefix_len=5)
    assert not torch.allclose(base[0, 0], other[0, 0], atol=1e-4)  # position 0 sees position 3
    later = ids.clone()
    later[0, 7] = (ids[0, 7] + 1) % 61  # after the prefix: nothing before it may see it
    torch.testing.assert_close(model(later, prefix_len=5)[0, :7], base[0, :7])
    # A prefix of one token is plain causal attention; per-row prefixes act row by row.
    torch.testing.assert_close(model(ids, prefix_len=1), model(ids), atol=1e-5, rtol=1e-5)
    rows = model(torch.cat([ids, ids]), prefix_len=torch.tensor([5, 1]))
    torch.testing.assert_close(rows[0], base[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[1], model(ids)[0], atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads():
    gqa = build(FAMILIES["llama"])
    attn = gqa.layers[0].attention
    assert attn.wq.weight.shape == (32, 32) and attn.wk.weight.shape == attn.wv.weight.shape == (16, 32)
    mha = LM(LMConfig(**{**LLAMA, "n_kv_heads": 0})).eval()
    state = gqa.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("wk.weight", "wv.weight")):
            # kv head j serves query heads 2j and 2j+1
            state[key] = value.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    ids = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)
    cache = gqa.new_cache()
    gqa(ids, cache=cache)
    assert cache.k[0].shape == (2, 2, 48, 8) and cache.length == 9


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_gives_the_full_forward_logits(family):
    model = build(FAMILIES[family])
    ids = torch.randint(0, 61, (2, 12))
    for prefix in (None, 4):
        full = model(ids, prefix_len=prefix)
        cache = model.new_cache()
        steps = [model(ids[:, :5], prefix_len=prefix, cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefix", [False, True])
def test_cached_and_uncached_generation_pick_the_same_tokens(family, prefix):
    model = build(FAMILIES[family])
    prompt = torch.randint(0, 61, (2, 6))
    greedy = generate(model, prompt, 14, temperature=0, prefix=prefix)
    assert torch.equal(greedy, generate(model, prompt, 14, temperature=0, use_cache=False, prefix=prefix))
    assert len(set(greedy[0].tolist())) >= 3  # a real sequence, not one token repeated
    sampled = generate(model, prompt, 14, temperature=0.8, top_k=20, top_p=0.9, seed=7, prefix=prefix)
    assert torch.equal(sampled, generate(model, prompt, 14, temperature=0.8, top_k=20, top_p=0.9, seed=7,
                                         use_cache=False, prefix=prefix))


def test_generation_is_a_function_of_the_seed():
    model = build(FAMILIES["llama"])
    prompt = torch.tensor([1, 2, 3])
    torch.manual_seed(1)
    a = generate(model, prompt, 16, temperature=1.0, seed=3)
    torch.manual_seed(2)  # the global RNG plays no part
    assert torch.equal(a, generate(model, prompt, 16, temperature=1.0, seed=3))
    assert not torch.equal(a, generate(model, prompt, 16, temperature=1.0, seed=4))
    assert a.shape == (16,) and model.training is False


def test_generation_stops_at_eos_and_filters_tokens():
    model = build(FAMILIES["llama"])
    prompt = torch.tensor([[5, 6, 7]])
    free = generate(model, prompt, 12, temperature=0)
    eos = int(free[0, 4])
    first = free[0].tolist().index(eos)
    stopped = generate(model, prompt, 12, temperature=0, eos_id=eos)
    assert stopped[0].tolist() == free[0, :first + 1].tolist()
    # top_k=1 and a tiny top_p both leave only the most likely token: sampling becomes greedy.
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_k=1, seed=5), free)
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_p=1e-6, seed=5), free)


def test_generation_refuses_bad_arguments():
    model = build(FAMILIES["llama"])
    with pytest.raises(ConfigError, match="max_len=48"):
        generate(model, torch.zeros(40, dtype=torch.long), 9)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, torch.zeros(4, dtype=torch.long), 4, top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, torch.zeros(4, dtype=torch.long), 4, temperature=-1.0)


def test_loss_ignores_unscored_tokens_and_adds_the_z_loss_in_float32():
    logits = torch.randn(2, 5, 11) * 3
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    loss, metrics = lm_loss(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 11), labels.view(-1), ignore_index=-100))
    assert metrics["tokens"].item() == 8
    z = torch.logsumexp(logits, -1)[labels != -100].square().mean()
    with_z, metrics = lm_loss(logits, labels, z_loss=1e-2)
    torch.testing.assert_close(with_z, loss + 1e-2 * z)
    torch.testing.assert_close(metrics["z_loss"], z)
    bf16, _ = lm_loss(logits.bfloat16(), labels, z_loss=1e-2)
    assert bf16.dtype == torch.float32
    nothing, _ = lm_loss(logits, torch.full_like(labels, -100))
    assert nothing.item() == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_flops_match_the_flop_counter(family):
    cfg = FAMILIES[family]
    model = LM(cfg)
    # The math kernel is made of counted matrix products (the CPU's fused kernel goes uncounted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 16, dtype=torch.long))
    # Model FLOPs: the head's 61 vocabulary rows, not the 64 the padded matmul computes.
    assert cfg.padded_vocab == 64
    assert forward_flops(cfg, 16) == counter.get_total_flops() - 2 * 16 * cfg.d_model * (64 - 61)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("loss_logits", ["sliced", "padded"])
def test_a_padded_vocabulary_computes_what_the_unpadded_one_does(family, tie, loss_logits):
    """vocab_multiple pads the embedding and output rows (61 -> 64): the logits are the vocab_size ones, and
    the loss and every gradient equal those of the unpadded model holding the first 61 rows; the padded
    rows get no gradient, tied or not (no input reads them, no logit of theirs is scored). The same with
    padded=True, what the lm loss reads: all 64 rows, the padded ones at -inf."""
    padded = build(dataclasses.replace(FAMILIES[family], tie_embeddings=tie, vocab_multiple=64)).train()
    plain = LM(dataclasses.replace(FAMILIES[family], tie_embeddings=tie, vocab_multiple=1)).train()
    assert padded.tok_embeddings.num_embeddings == padded.output.out_features == 64
    assert plain.tok_embeddings.num_embeddings == 61
    plain.load_state_dict({k: v[:61] if k in ("tok_embeddings.weight", "output.weight") else v
                           for k, v in padded.state_dict().items()})
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, model in (("padded", padded), ("plain", plain)):
        logits = model(ids, padded=loss_logits == "padded")
        if name == "padded" and loss_logits == "padded":
            assert logits.shape == (2, 12, 64) and torch.isneginf(logits[..., 61:]).all()
        else:
            assert logits.shape == (2, 12, 61)
        losses[name], _ = lm_loss(logits, ids.roll(-1, dims=1))
        losses[name].backward()
    torch.testing.assert_close(losses["padded"], losses["plain"])
    grads = dict(plain.named_parameters())
    for name, p in padded.named_parameters():
        rows = 61 if name in ("tok_embeddings.weight", "output.weight") else None
        torch.testing.assert_close(p.grad[:rows], grads[name].grad, msg=name)
        if rows:
            assert torch.count_nonzero(p.grad[61:]) == 0, name


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.n_kv_heads must divide n_head=4"):
        build_dataclass(LMConfig, {"n_head": 4, "n_kv_heads": 3}, "model")
    with pytest.raises(ConfigError, match="model.norm must be one of"):
        build_dataclass(LMConfig, {"norm": "batchnorm"}, "model")
    with pytest.raises(ConfigError, match=r"model.vocab_multiple must be >= 1 \(got 0\)"):
        build_dataclass(LMConfig, {"vocab_multiple": 0}, "model")
    assert LMConfig(d_model=96).hidden == 256 and LMConfig.gpt2(d_model=96).hidden == 384


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_packed_forward_under_bf16_on_cuda():
    model = build(FAMILIES["llama"]).cuda()
    ids = torch.randint(0, 61, (4, 48), device="cuda")
    doc_ids = (torch.arange(48, device="cuda") // 16).expand(4, 48)
    positions = (torch.arange(48, device="cuda") % 16).expand(4, 48)
    eager = model(ids, doc_ids=doc_ids, positions=positions)
    compiled = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = compiled(ids, doc_ids=doc_ids, positions=positions)
        loss, _ = lm_loss(fast, ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert (fast.float() - eager).norm() / eager.norm() < 0.05  # bf16 rounding, not another mask
