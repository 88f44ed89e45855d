"""Serve converted models from vLLM (needs the ``vllm`` extra: ``pip install 'parallax-compile[vllm]'``).

:func:`register` is the ``vllm.general_plugins`` entry point (vLLM runs it in every process): it
registers the Parallax attention backend (``PARALLAX``) and the Parallax model classes under their
own architecture names (:data:`ARCHITECTURES`), by string, so nothing is imported until vLLM loads
such a model. It is idempotent.

A directory written by ``parallax_compile.hf.upgrade`` + ``save_pretrained`` keeps its
transformers ``architectures`` (e.g. ``LlamaForCausalLM``) and adds ``parallax_probes``; vLLM picks
the Parallax class with ``hf_overrides=parallax_compile.vllm.hf_overrides(path)`` (``vllm.LLM``) or
``--hf-overrides '{"architectures": ["ParallaxLlamaForCausalLM"]}'`` (the server). A directory whose
``config.json`` already names a Parallax architecture needs nothing.

Every vLLM internal the plugin touches is named in :mod:`parallax_compile.vllm._compat` (written for
vLLM 0.32.0).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ARCHITECTURES", "BACKEND_CLASS", "hf_overrides", "parallax_architecture", "register"]

ARCHITECTURES = {
    "LlamaForCausalLM": "ParallaxLlamaForCausalLM",
    "MistralForCausalLM": "ParallaxMistralForCausalLM",
    "Qwen3ForCausalLM": "ParallaxQwen3ForCausalLM",
    "Gemma3ForCausalLM": "ParallaxGemma3ForCausalLM",
}
"""transformers architecture -> the Parallax architecture the plugin registers for it."""

BACKEND_CLASS = "parallax_compile.vllm.backend.ParallaxAttentionBackend"
_MODELS = "parallax_compile.vllm.models"


def parallax_architecture(config: dict) -> str:
    """The Parallax architecture for a converted model's ``config.json`` (a dict). Raises
    ``ValueError`` (one line) when it has no ``parallax_probes`` or an unsupported architecture."""
    if not config.get("parallax_probes"):
        raise ValueError("config.json has no `parallax_probes`: not a model converted by parallax-compile")
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURES.values():
            return arch
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(f"architectures {config.get('architectures')} not supported by the parallax vLLM "
                     "plugin; "
                     f"supported: {', '.join(ARCHITECTURES)}")


def hf_overrides(path) -> dict:
    """``{"architectures": [Parallax architecture]}`` for the converted model directory ``path``
    (pass as ``vllm.LLM(model=path, hf_overrides=...)`` or ``--hf-overrides``)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return {"architectures": [parallax_architecture(config)]}


def register() -> None:
    """Register the ``PARALLAX`` attention backend and the Parallax model architectures with vLLM
    (idempotent; the ``vllm.general_plugins`` entry point)."""
    from ._compat import AttentionBackendEnum, ModelRegistry, register_backend

    if "PARALLAX" not in AttentionBackendEnum.__members__:
        register_backend("PARALLAX", BACKEND_CLASS)
    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{_MODELS}:{arch}")
