"""parallax-compile: find the attention in a PyTorch model and rewrite it into Parallax form."""

from .op import parallax_attention

__all__ = ["parallax_attention"]
__version__ = "0.1.0"
