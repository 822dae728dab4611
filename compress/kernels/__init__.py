"""Triton kernels for compressed weights. Each file: @triton.jit kernel(s), a host wrapper that
checks shapes and launches, and a PyTorch *_ref computing the same thing. Importing a kernel
file needs triton; compress.runtime.modules imports them only when triton is importable."""
