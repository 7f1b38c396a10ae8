"""HF interop: our decoder written as a transformers checkpoint, and transformers checkpoints read into ours,
with equal logits, on small random models (no hub access)."""

import dataclasses
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from latentforge.errors import CheckpointError, ConfigError
from latentforge.interop.hf import export_hf, load_hf
from latentforge.nn.lm import LM, LMConfig

# 67 ids: our embedding and output have 128 rows (model.vocab_multiple=64), transformers' exactly 67.
SHAPE = dict(vocab_size=67, n_layer=2, n_head=4, d_model=32, max_len=40)
VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")
OURS = {
    "llama-gqa-tied": LMConfig(**SHAPE, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-6),
    "llama-unpadded": LMConfig(**SHAPE, vocab_multiple=1),
    "llama-untied-bias": LMConfig(**SHAPE, tie_embeddings=False, bias=True, ffn_hidden=48),
    "gpt2-tied": LMConfig.gpt2(**SHAPE),
    "gpt2-untied": LMConfig.gpt2(**SHAPE, tie_embeddings=False),
}


def scramble(model: torch.nn.Module) -> torch.nn.Module:
    """Random values in every parameter, norms and biases included, so that a mix-up of any two shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif "norm" in name or "ln" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 67, (2, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", OURS)
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, name):
    cfg = OURS[name]
    ours = scramble(LM(cfg))
    out = export_hf(ours, cfg, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM")
    # The padded rows stay behind: transformers sees exactly the vocabulary.
    assert theirs.config.vocab_size == 67 and theirs.get_input_embeddings().weight.shape[0] == 67
    assert theirs.get_output_embeddings().weight.shape[0] == 67
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
    # And back: the same weights, exactly, and zeros in the padded rows.
    back_cfg, state = load_hf(out, cfg.vocab_multiple)
    assert back_cfg.hidden == cfg.hidden and back_cfg.kv_heads == cfg.kv_heads
    assert dataclasses.replace(back_cfg, ffn_hidden=cfg.ffn_hidden, n_kv_heads=cfg.n_kv_heads) == cfg
    for k, v in ours.state_dict().items():
        if k in VOCAB_ROWS:
            assert torch.equal(state[k][:67], v[:67]) and state[k].shape == v.shape and not state[k][67:].any()
        else:
            assert torch.equal(state[k], v), k
    back = LM(back_cfg).eval()
    back.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours(ids))


def hf_llama(tie: bool) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=40,
                                        rope_theta=2000.0, tie_word_embeddings=tie, bos_token_id=None,
                                        eos_token_id=None))


def hf_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=67, n_embd=32, n_layer=2, n_head=4, n_positions=40,
                                      bos_token_id=None, eos_token_id=None))


@pytest.mark.parametrize("name", ["llama-tied", "llama-untied", "gpt2-bin"])
def test_transformers_checkpoints_load_into_ours_with_the_same_logits(tmp_path, name):
    theirs = scramble(hf_gpt2() if name.startswith("gpt2") else hf_llama(tie=name == "llama-tied"))
    theirs.save_pretrained(tmp_path / "hf")
    if name == "gpt2-bin":  # the older pytorch_model.bin format
        (tmp_path / "hf" / "model.safetensors").unlink()
        torch.save(theirs.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    cfg, state = load_hf(tmp_path / "hf")
    assert cfg.kv_heads == (4 if name.startswith("gpt2") else 1)
    ours = LM(cfg).eval()
    ours.load_state_dict(state)
    # A config read from transformers keeps our default padding: 67 ids in 128 rows.
    assert cfg.vocab_multiple == 64 and ours.tok_embeddings.num_embeddings == ours.output.out_features == 128
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_sharded_safetensors_are_read_through_their_index(tmp_path):
    theirs = scramble(hf_llama(tie=False))
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    cfg, state = load_hf(tmp_path / "hf")
    ours = LM(cfg).eval()
    ours.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), theirs(tokens()).logits, atol=1e-5, rtol=1e-5)


def test_the_tokenizer_travels_with_the_export(tmp_path):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainers.BpeTrainer(vocab_size=300))
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    cfg = LMConfig(**{**SHAPE, "vocab_size": tokenizer.get_vocab_size()})
    out = export_hf(LM(cfg), cfg, tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    text = "def f(x): return x"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer.encode(text).ids


def test_export_refuses_to_overwrite_and_replaces_whole_when_asked(tmp_path):
    cfg = OURS["llama-gqa-tied"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export_hf(LM(cfg), cfg, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export_hf(LM(cfg), cfg, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary left behind
    with pytest.raises(ConfigError, match="neither Llama"):
        mixed = LMConfig(**SHAPE, norm="layernorm")
        export_hf(LM(mixed), mixed, tmp_path / "other")


def test_bad_checkpoint_directories_are_one_clear_error(tmp_path):
    hf = tmp_path / "hf"
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_hf(hf)
    hf_llama(tie=True).save_pretrained(hf)
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read weights file .*model.safetensors"):
        load_hf(hf)
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_hf(hf)
    (hf / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read weights file .*pytorch_model.bin"):
        load_hf(hf)
    state = hf_llama(tie=True).state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, hf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no tensor model.layers.1.mlp.up_proj.weight"):
        load_hf(hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3",
                                                                             "rope_theta": 1e4}}))
    with pytest.raises(CheckpointError, match="RoPE scaling 'llama3' is not supported"):
        load_hf(hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(CheckpointError, match="architecture BertForMaskedLM is not supported"):
        load_hf(hf)
    (hf / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_hf(hf)
