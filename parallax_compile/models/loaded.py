"""The one thing every loader returns: a model ready to run plus example inputs for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["LoadedModel"]


@dataclass
class LoadedModel:
    """A model in eval mode (fp32, CPU for the built-ins) with inputs to run it on.

    * ``spec``: the string :func:`~parallax_compile.models.load_model` took; loading it again gives
      the same model and inputs.
    * ``example_inputs``: keyword inputs, ``model(**example_inputs)``; tensors plus flags such as
      ``use_cache=False``.
    * ``dynamic_dims``: per tensor input, ``{dim: name}`` of the dims that may vary (``"batch"``,
      ``"seq"``; ``"dec_seq"`` for a decoder's own length). Inputs that are absent are static;
      ``None`` (factories without ``dynamic_dims``): dims 0 and 1 of every tensor input.
    * ``valid_positions``: bool ``[B, L]`` of the non-padding positions of the model's main output
      (``logits`` / ``last_hidden_state``; for encoder-decoders the decoder's positions), or
      ``None`` when nothing is padded. Compare outputs only there: eager attention over a fully
      masked (padding) row gives the mean of V, SDPA gives 0.
    """

    spec: str
    model: torch.nn.Module
    example_inputs: dict[str, Any]
    dynamic_dims: dict[str, dict[int, str]] | None = field(default_factory=dict)
    valid_positions: Tensor | None = None
    description: str = ""

    def run(self) -> Any:
        """``model(**example_inputs)`` under ``torch.no_grad()``."""
        with torch.no_grad():
            return self.model(**self.example_inputs)
