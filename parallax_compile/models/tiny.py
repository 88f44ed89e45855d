"""Tiny random Hugging Face models, built from a config in well under a second: one per attention
family the passes must handle. Hidden size 64, 2 layers, 4 heads, vocab 128, weights drawn
under a fixed seed (the global RNG is left alone).

| family  | class                       | what its attention exercises                          |
|---------|-----------------------------|-------------------------------------------------------|
| gpt2    | GPT2LMHeadModel             | fused c_attn Conv1D, learned positions                |
| llama   | LlamaForCausalLM            | GQA 4:2, RoPE                                         |
| qwen3   | Qwen3ForCausalLM            | GQA 4:2, RMSNorm on q and k                           |
| mistral | MistralForCausalLM          | GQA 4:2, sliding window 8 (< sequence length)         |
| bert    | BertModel                   | bidirectional encoder, right padding                  |
| t5      | T5ForConditionalGeneration  | no scaling, relative position bias, cross-attention   |
| gemma3  | Gemma3ForCausalLM (text)    | GQA, q/k norm, sliding window 8 on layer 0, scale 1/4 |
| gpt_neox | GPTNeoXForCausalLM         | fused QKV laid out per head (q features strided), partial rotary (1/2) |
| phi3    | Phi3ForCausalLM             | fused qkv_proj sliced, GQA 4:2, partial rotary (1/2)  |
| opt     | OPTForCausalLM              | scale folded into q_proj's output, `view(bsz, -1, H, D)` |
| falcon  | FalconForCausalLM           | `x @ W.T` projection, fused QKV, MQA (not AttentionInterface) |
| bloom   | BloomForCausalLM (eager)    | fused QKV per head, ALiBi by 3-D baddbmm, views around the softmax |
| gpt_neo | GPTNeoForCausalLM (eager)   | no scaling, fill value through `detach_`, local window 8 on layer 1 |
| gemma2  | Gemma2ForCausalLM (eager)   | logit soft-capping (a reported skip), sliding window 8 |

Decoder-only LMs get the last row left-padded, encoders right-padded (see :mod:`.hf`). Bloom and
GPT-Neo (and Gemma 2, for its soft-capping) have no ``sdpa`` implementation in transformers 5 (:data:`IMPLEMENTATIONS`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch

from .hf import decoder_inputs, finish_inputs, random_inputs, require_transformers
from .loaded import LoadedModel

__all__ = ["IMPLEMENTATIONS", "TINY_FAMILIES", "tiny_hf_model"]

_COMMON = dict(vocab_size=128, max_position_embeddings=64)
_DECODER = dict(
    **_COMMON,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    pad_token_id=0,
)


def _gpt2(t: Any) -> tuple[Any, str, str]:
    cfg = t.GPT2Config(
        vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1
    )
    return cfg, "AutoModelForCausalLM", "causal"


def _llama(t: Any) -> tuple[Any, str, str]:
    return t.LlamaConfig(**_DECODER), "AutoModelForCausalLM", "causal"


def _qwen3(t: Any) -> tuple[Any, str, str]:
    return t.Qwen3Config(**_DECODER), "AutoModelForCausalLM", "causal"


def _mistral(t: Any) -> tuple[Any, str, str]:
    return t.MistralConfig(**_DECODER, sliding_window=8), "AutoModelForCausalLM", "causal"


def _bert(t: Any) -> tuple[Any, str, str]:
    cfg = t.BertConfig(
        **_COMMON,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=0,
    )
    return cfg, "AutoModel", "encoder"


def _t5(t: Any) -> tuple[Any, str, str]:
    cfg = t.T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=1,
    )
    return cfg, "AutoModelForSeq2SeqLM", "seq2seq"


def _gemma3(t: Any) -> tuple[Any, str, str]:
    cfg = t.Gemma3TextConfig(
        **_DECODER,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    )
    return cfg, "AutoModelForCausalLM", "causal"


def _gpt_neox(t: Any) -> tuple[Any, str, str]:
    cfg = t.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5, pad_token_id=0)
    return cfg, "AutoModelForCausalLM", "causal"


def _phi3(t: Any) -> tuple[Any, str, str]:
    cfg = t.Phi3Config(**{k: v for k, v in _DECODER.items() if k != "head_dim"}, partial_rotary_factor=0.5,
                       bos_token_id=1, eos_token_id=1)
    return cfg, "AutoModelForCausalLM", "causal"


def _opt(t: Any) -> tuple[Any, str, str]:
    cfg = t.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                      eos_token_id=1)
    return cfg, "AutoModelForCausalLM", "causal"


def _falcon(t: Any) -> tuple[Any, str, str]:
    cfg = t.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         multi_query=True, new_decoder_architecture=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1)
    return cfg, "AutoModelForCausalLM", "causal"


def _bloom(t: Any) -> tuple[Any, str, str]:
    # initializer_range 0.2 (not 0.02): with 0.02 at width 64 a step of 1e-3 on the probe gains
    # moves the logits by about fp32 rounding, and the continuity check cannot measure it.
    cfg = t.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1,
                        eos_token_id=1, initializer_range=0.2)
    return cfg, "AutoModelForCausalLM", "causal"


def _gpt_neo(t: Any) -> tuple[Any, str, str]:
    cfg = t.GPTNeoConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                         attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return cfg, "AutoModelForCausalLM", "causal"


def _gemma2(t: Any) -> tuple[Any, str, str]:
    cfg = t.Gemma2Config(**_DECODER, sliding_window=8, query_pre_attn_scalar=16)
    return cfg, "AutoModelForCausalLM", "causal"


TINY_FAMILIES: dict[str, Callable[[Any], tuple[Any, str, str]]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "bert": _bert,
    "t5": _t5,
    "gemma3": _gemma3,
    "gpt_neox": _gpt_neox,
    "phi3": _phi3,
    "opt": _opt,
    "falcon": _falcon,
    "bloom": _bloom,
    "gpt_neo": _gpt_neo,
    "gemma2": _gemma2,
}

IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {f: ("eager", "sdpa") for f in TINY_FAMILIES}
"""The attention implementations each family has in transformers 5."""
IMPLEMENTATIONS.update(bloom=("eager",), gpt_neo=("eager",), gemma2=("eager",))


def tiny_hf_model(
    family: str,
    attn_implementation: str = "sdpa",
    *,
    seq_len: int | None = None,
    batch_size: int = 2,
    seed: int = 0,
) -> LoadedModel:
    """A tiny random model of ``family`` (one of :data:`TINY_FAMILIES`) with
    ``attn_implementation`` (``"eager"``, ``"sdpa"`` or a registered name) and random-id inputs
    ``[batch_size, seq_len]`` (``seq_len`` default 20); t5 adds ``decoder_input_ids``
    ``[batch_size, seq_len // 2 + 1]``. Same ``seed``, same weights and inputs for every
    implementation, so their outputs can be compared at ``valid_positions``."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    transformers = require_transformers()
    config, auto_name, kind = TINY_FAMILIES[family](transformers)
    seq_len = seq_len or 20
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (
            getattr(transformers, auto_name)
            .from_config(copy.deepcopy(config), attn_implementation=attn_implementation, dtype=torch.float32)
            .eval()
        )
    causal = kind == "causal"
    raw = random_inputs(
        config.vocab_size,
        batch_size,
        seq_len,
        padding_side="left" if causal else "right",
        pad_token_id=config.pad_token_id,
        seed=seed,
    )
    if family == "bert":
        raw["token_type_ids"] = torch.zeros_like(raw["input_ids"])
    inputs, dims, valid = finish_inputs(raw, causal=causal)
    if "position_ids" not in inspect.signature(model.forward).parameters:  # Bloom (ALiBi)
        inputs.pop("position_ids", None)
        dims.pop("position_ids", None)
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = decoder_inputs(config, batch_size, seq_len // 2 + 1, seed)
        dims["decoder_input_ids"] = {0: "batch", 1: "dec_seq"}
        inputs["use_cache"] = False
        valid = None  # the logits are the decoder's, which is not padded
    pad = "left" if causal else "right"
    cls_name = type(model).__name__
    return LoadedModel(
        spec=f"tiny-{family}-{attn_implementation}",
        model=model,
        example_inputs=inputs,
        dynamic_dims=dims,
        valid_positions=valid,
        description=(
            f"tiny random {cls_name} ({attn_implementation} attention), "
            f"random ids [{batch_size}, {seq_len}], last row {pad}-padded"
        ),
    )
