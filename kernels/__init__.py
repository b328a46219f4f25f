"""Triton kernels of ddpm-serve, each beside a plain-PyTorch twin with the same signature."""
