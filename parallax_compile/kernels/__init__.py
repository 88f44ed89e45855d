"""Implementations of the Parallax op: ``chunked`` (portable PyTorch, every device) and, next to
it, the Triton kernels registered for CUDA."""
