"""In-kernel Gaussian noise shared by the kernels (Philox4x32-10 + Box-Muller, cosine branch).

Element ``i`` of a launch draws from counter ``(i, noise_offset, 0, 0)`` under the 64-bit seed:
``noise_offset = 0`` is exactly ``tl.randn(seed, i)``; a sampler advances ``noise_offset`` every
step so that no two steps reuse a stream. ``fastddpm.reference.philox_randn`` is the same
stream in torch integer ops.
"""
import triton
import triton.language as tl


@triton.jit
def philox_normal(seed, noise_offset, offsets):
    """Normals for int ``offsets`` (low 32 bits used) under int64 ``seed`` and ``noise_offset``."""
    counter = offsets.to(tl.uint32)
    zero = counter * 0
    stream = zero + noise_offset.to(tl.uint32)
    word0, word1, _, _ = tl.philox(seed, counter, stream, zero, zero)
    normal, _ = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(word0), tl.uint_to_uniform_float(word1))
    return normal


@triton.jit
def block_offsets(BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """Flat element offsets of this program; int64 only when the tensor needs it."""
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)
