"""Hugging Face integration: a converted transformers model is still that transformers model.

* :func:`upgrade` -- find the attention sites with the graph passes, add zero probes ``r_proj`` to
  the owning attention modules, switch to the ``parallax`` attention implementation, verify.
* :func:`from_pretrained` -- load a directory written by ``save_pretrained`` after :func:`upgrade`
  (the probes come back).
* :func:`save_hf` / :func:`verify_hf` -- the ``parallax-compile convert`` / ``verify`` format for
  Hugging Face causal LMs.
* :func:`register` -- register ``"parallax"`` in transformers' ``AttentionInterface``
  (``import parallax_compile`` does it when transformers is already imported; the functions here
  always do).

Needs the ``models`` extra (transformers).
"""

from .attention import ATTN_IMPLEMENTATION, parallax_attention_forward, register
from .saving import is_hf_dir, save_hf, verify_hf
from .upgrade import (NotUpgradable, add_probes, find_probe_sites, from_pretrained, is_hf_model, remove_probes,
                      upgrade)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "NotUpgradable",
    "add_probes",
    "find_probe_sites",
    "from_pretrained",
    "is_hf_dir",
    "is_hf_model",
    "parallax_attention_forward",
    "register",
    "remove_probes",
    "save_hf",
    "upgrade",
    "verify_hf",
]
