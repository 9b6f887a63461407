"""Triton kernels of fastddpm's per-step ops, shipped as ``fastddpm.kernels``.

One op a file, the launcher beside the kernel. Launchers take already-validated tensors
(``fastddpm.ops`` checks arguments and dispatches); set ``TRITON_INTERPRET=1`` before importing
this package to run the kernels on CPU tensors through Triton's interpreter (``fastddpm.ops`` imports
the other flavour beside it when a call needs it).
"""
from .q_sample import q_sample
from .reverse_step import reverse_step
from .timestep_embedding import timestep_embedding

__all__ = ["q_sample", "reverse_step", "timestep_embedding", "is_interpreted"]


def is_interpreted() -> bool:
    """Whether this import of the kernels runs in Triton's interpreter (decided when it was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .reverse_step import _reverse_step_kernel

    return isinstance(_reverse_step_kernel, InterpretedFunction)
