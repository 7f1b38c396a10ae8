"""Hugging Face checkpoints in and out: our decoder (nn/lm.py) as transformers' LlamaForCausalLM or
GPT2LMHeadModel, with the same logits.

The two layouts differ in names only, with two exceptions: GPT-2 stores its linear layers as Conv1D,
(in, out) where torch's Linear is (out, in), and fuses q, k and v into one c_attn matrix. RoPE needs no
permutation: both we and transformers' Llama rotate the two halves of each head (channel i with i + D/2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from latentforge.errors import CheckpointError, ConfigError
from latentforge.nn.lm import LM, LMConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
LLAMA_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
LLAMA_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
               "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
GPT2_TOP = {"tok_embeddings": "transformer.wte", "pos_embeddings": "transformer.wpe", "norm": "transformer.ln_f",
            "output": "lm_head"}
GPT2_LAYER = {"attention.wo": "attn.c_proj", "feed_forward.w1": "mlp.c_fc", "feed_forward.w2": "mlp.c_proj",
              "attention_norm": "ln_1", "ffn_norm": "ln_2"}
GPT2_QKV = ("attention.wq", "attention.wk", "attention.wv")
# Our tensors with a row per token id: padded to cfg.padded_vocab rows here, exactly vocab_size in transformers.
VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")


def hf_family(cfg: LMConfig) -> str:
    """llama or gpt2: the transformers architecture whose computation equals this config's."""
    switches = (cfg.norm, cfg.mlp, cfg.positions)
    if switches == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    if switches == ("layernorm", "gelu", "learned") and cfg.bias and cfg.kv_heads == cfg.n_head:
        return "gpt2"
    raise ConfigError(f"model (norm={cfg.norm}, mlp={cfg.mlp}, positions={cfg.positions}, bias={cfg.bias}) is "
                      "neither Llama (rmsnorm, swiglu, rope) nor GPT-2 (layernorm, gelu, learned, bias, no GQA): "
                      "transformers has no model with its computation")


def _split(name: str) -> tuple[str | None, str, str]:
    """`layers.3.attention.wq.weight` -> ("3", "attention.wq", "weight"); `norm.weight` -> (None, "norm", ...)."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        module, param = rest.rsplit(".", 1)
        return index, module, param
    module, param = name.rsplit(".", 1)
    return None, module, param


def _hf_name(name: str, family: str) -> tuple[str, bool]:
    """Our parameter's name in the transformers model, and whether it is stored transposed (GPT-2's Conv1D)."""
    index, module, param = _split(name)
    if family == "llama":
        return (f"model.layers.{index}.{LLAMA_LAYER[module]}.{param}" if index is not None
                else f"{LLAMA_TOP[module]}.{param}"), False
    if index is None:
        return f"{GPT2_TOP[module]}.{param}", False
    return f"transformer.h.{index}.{GPT2_LAYER[module]}.{param}", param == "weight" and "norm" not in module


def to_hf_state(cfg: LMConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the transformers model's (a tied output head is stored once, as the embedding;
    the padded vocabulary rows are left out)."""
    family = hf_family(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        index, module, param = _split(name)
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if name in VOCAB_ROWS:
            tensor = tensor[: cfg.vocab_size]
        if family == "gpt2" and module in GPT2_QKV:
            if module == "attention.wq":
                fused = torch.cat([state[f"layers.{index}.{m}.{param}"] for m in GPT2_QKV])
                out[f"transformer.h.{index}.attn.c_attn.{param}"] = fused.t() if param == "weight" else fused
            continue
        hf_name, transposed = _hf_name(name, family)
        out[hf_name] = tensor.t() if transposed else tensor
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def from_hf_state(cfg: LMConfig, hf: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The transformers model's state dict -> ours, checked name by name and shape by shape against LM(cfg).
    The vocabulary rows get zero rows up to cfg.padded_vocab: no input reads them and their logits are
    sliced off."""
    family = hf_family(cfg)
    with torch.device("meta"):
        expected = LM(cfg).state_dict()
    if family == "gpt2":
        # The original GPT-2 checkpoints name the body without the `transformer.` prefix.
        hf = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in hf.items()}
    state: dict[str, torch.Tensor] = {}

    def fetch(key: str) -> torch.Tensor:
        if key not in hf:
            raise CheckpointError(f"{source}: the weights have no tensor {key}")
        return hf[key]

    for name, reference in expected.items():
        index, module, param = _split(name)
        if name == "output.weight" and cfg.tie_embeddings:
            tensor = fetch(_hf_name("tok_embeddings.weight", family)[0])
        elif family == "gpt2" and module in GPT2_QKV:
            fused = fetch(f"transformer.h.{index}.attn.c_attn.{param}")
            fused = fused.t() if param == "weight" else fused
            tensor = fused.chunk(3, dim=0)[GPT2_QKV.index(module)]
        else:
            key, transposed = _hf_name(name, family)
            tensor = fetch(key).t() if transposed else fetch(key)
        if name in VOCAB_ROWS and tensor.shape[0] == cfg.vocab_size:
            tensor = F.pad(tensor, (0, 0, 0, cfg.padded_vocab - cfg.vocab_size))
        if tensor.shape != reference.shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config says "
                                  f"{tuple(reference.shape)}")
        state[name] = tensor.contiguous()
    return state


# ----------------------------------------------------------------------------- configs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def config_from_hf(hf: dict[str, Any], path: Path) -> LMConfig:
    """Our config for a transformers config.json of a Llama or GPT-2 model; anything we would compute
    differently (RoPE scaling, another activation, another head size ...) is refused by name."""
    model_type = hf.get("model_type")

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what} is not supported (supported: Llama and GPT-2 as transformers "
                               "writes them)")

    try:
        if model_type == "llama":
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise refuse(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
            if hf.get("hidden_act", "silu") != "silu":
                raise refuse(f"hidden_act {hf['hidden_act']!r}")
            if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
                raise refuse("attention_bias without mlp_bias (or the reverse)")
            heads, d = hf["num_attention_heads"], hf["hidden_size"]
            if hf.get("head_dim") not in (None, d // heads):
                raise refuse(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
            cfg = LMConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads,
                           n_kv_heads=hf.get("num_key_value_heads") or heads, d_model=d,
                           ffn_hidden=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
                           norm_eps=hf.get("rms_norm_eps", 1e-6),
                           rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                           bias=bool(hf.get("attention_bias", False)),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
        elif model_type == "gpt2":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise refuse(f"activation_function {hf['activation_function']!r}")
            if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
                raise refuse("GPT-2 attention scaled other than by 1/sqrt(head size)")
            cfg = LMConfig.gpt2(vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                                d_model=hf["n_embd"], ffn_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
                                max_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        else:
            names = hf.get("architectures") or [model_type]
            raise refuse(f"architecture {', '.join(map(str, names))}")
    except KeyError as e:
        raise CheckpointError(f"{path}: no {e.args[0]} in this {model_type} config") from None
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg


def _hf_config(cfg: LMConfig, dtype: torch.dtype):
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, dtype=dtype, architectures=[ARCHITECTURES[hf_family(cfg)]])
    if hf_family(cfg) == "llama":
        return LlamaConfig(hidden_size=cfg.d_model, intermediate_size=cfg.hidden, num_hidden_layers=cfg.n_layer,
                           num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                           max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
                           rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                           attention_bias=cfg.bias, mlp_bias=cfg.bias, hidden_act="silu",
                           attention_dropout=cfg.dropout, **common)
    return GPT2Config(n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.hidden,
                      n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                      attn_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, resid_pdrop=cfg.dropout, **common)


# ----------------------------------------------------------------------------- files


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    """The tokenizer's files beside the weights, so AutoTokenizer.from_pretrained(out) finds them."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer directory {tokenizer_dir} has no tokenizer.json")
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, out / path.name)
    if not (out / "tokenizer_config.json").exists():
        # A tokenizer saved by the `tokenizers` library alone: transformers wraps it as a fast tokenizer.
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def export_hf(model: nn.Module, cfg: LMConfig, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Write `model` as a transformers checkpoint directory (config.json + model.safetensors, and the
    tokenizer's files when given) that AutoModelForCausalLM.from_pretrained loads with the same logits.
    The directory appears whole or not at all; an existing one is replaced only with overwrite=True."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty: choose another directory (or overwrite it)")
    tensors = to_hf_state(cfg, model.state_dict())
    dtype = next(iter(tensors.values())).dtype
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _hf_config(cfg, dtype).save_pretrained(tmp)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"weights file {path} is missing") from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot read weights file {path}: {(str(e) or type(e).__name__).splitlines()[0]}") \
            from None


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: one safetensors or .bin file, or shards listed by an index."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _load_file(path)
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path} has no weight_map")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_file(directory / shard))
        return tensors
    raise CheckpointError(f"{directory} has no weights ({', '.join(WEIGHT_FILES)})")


def load_hf(directory: str | Path, vocab_multiple: int = LMConfig.vocab_multiple
            ) -> tuple[LMConfig, dict[str, torch.Tensor]]:
    """Our config and state dict for a local transformers Llama or GPT-2 checkpoint directory; the tensors
    keep their stored dtype (load_state_dict casts them to the model's). The checkpoint has no padded
    vocabulary rows: vocab_multiple is the padding of the model the state is for."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a transformers checkpoint: config.json and "
                              "weights)")
    cfg = config_from_hf(_read_json(path / "config.json"), path / "config.json")
    cfg = dataclasses.replace(cfg, vocab_multiple=vocab_multiple)
    return cfg, from_hf_state(cfg, read_hf_weights(path), path)
