"""Triton kernels of fastddpm's per-step ops, shipped as ``fastddpm.kernels``.

One op a file, the launcher beside the kernel. Launchers take already-validated tensors
(``fastddpm.ops`` checks arguments and dispatches); set ``TRITON_INTERPRET=1`` before importing
this package to run the kernels on CPU tensors through Triton's interpreter.
"""
from .q_sample import q_sample
from .reverse_step import reverse_step
from .timestep_embedding import timestep_embedding

__all__ = ["q_sample", "reverse_step", "timestep_embedding"]
