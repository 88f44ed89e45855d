"""Hugging Face integration: a converted transformers model is still that transformers model.

* :func:`upgrade` -- find the attention sites with the graph passes, add zero probes ``r_proj`` to
  the owning attention modules, switch to the ``parallax`` attention implementation, verify.
* :func:`from_pretrained` -- load a directory written by ``save_pretrained`` after :func:`upgrade`
  (the probes come back).
* :mod:`.auto` -- the ``Parallax<Base>`` transformers classes (``model_type = "parallax"``) that
  ``AutoModelForCausalLM.from_pretrained`` returns for a converted directory, with the probes;
* :func:`save_hf` / :func:`verify_hf` -- the Hugging Face kind of conversion directory (what
  ``parallax_compile.save`` / ``verify`` call for these models).
* :func:`register` -- register ``"parallax"`` in transformers' ``AttentionInterface`` and
  ``model_type = "parallax"`` in ``AutoConfig`` (``import parallax_compile`` does it as soon as
  transformers is imported).

Needs the ``models`` extra (transformers).
"""

from .attention import ATTN_IMPLEMENTATION, parallax_attention_forward
from .auto import parallax_classes, register, to_parallax
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
    "parallax_classes",
    "register",
    "remove_probes",
    "save_hf",
    "to_parallax",
    "upgrade",
    "verify_hf",
]
