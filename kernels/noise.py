"""In-kernel Gaussian noise shared by the kernels, and the 2-D element layout that goes with it.

The stream (``fastddpm.reference.philox_randn`` is the same in torch integer ops):

* key: the 64-bit seed (low word, high word);
* counter: ``(e // 4, n, s, 0)`` for element ``e`` (row-major, within its sample) of sample ``n``
  (the sample's global index: ``index_base`` + its position in the batch) at stream ``s`` (the
  ``noise_offset``: 0 for x_T, ``k + 1`` for sampling step ``k``);
* one Philox4x32-10 call gives four words, two uniform pairs ``(u0, u1)``, ``(u2, u3)`` through
  Triton's uint -> [0, 1) map, and Box-Muller turns each pair into two normals (cosine, then sine
  branch): element ``e`` takes normal ``e % 4``.

So one Philox call serves four elements, a sample's noise does not depend on the batch it is
drawn in, and no two steps share a stream. ``FAST_MATH`` (compiled kernels only: the interpreter
has no inline assembly) uses the GPU's approximate ``lg2``/``sin``/``cos`` instructions on a
reduced angle instead of libdevice's range-reduced ones: the same stream, each normal within
about 1e-6 absolute of the exact formula.
"""
import triton
import triton.language as tl

# Philox4x32 constants (Salmon et al., SC'11): round multipliers and Weyl key increments.
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
# Triton's uint32 -> [0, 1) scale (the largest float with (2**31 - 1) * scale < 1), and the
# smallest u0 fed to the logarithm.
UINT_TO_UNIFORM = tl.constexpr(4.6566127342e-10)
MIN_UNIFORM = tl.constexpr(1.0e-7)
TWO_PI = tl.constexpr(6.283185307179586)
PI = tl.constexpr(3.141592653589793)
LN2 = tl.constexpr(0.6931471805599453)
GROUP_SIZE = 4  # normals per Philox call = elements per row of the 2-D layout
# Launch shape of the elementwise kernels (benchmarks/tune.py sweeps them on a GPU).
DEFAULT_BLOCK = 1024
DEFAULT_NUM_WARPS = 4
GROUP = tl.constexpr(GROUP_SIZE)


@triton.jit
def philox4x32(seed, c0, c1, c2, c3):
    """Philox4x32-10 of uint32 counters under the int64 ``seed``; returns the four words."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        a, b = c0, c2
        c0 = tl.umulhi(b, PHILOX_ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(a, PHILOX_ROUND_A) ^ c3 ^ k1
        c1 = b * PHILOX_ROUND_B
        c3 = a * PHILOX_ROUND_A
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def _uniform(word):
    signed = word.to(tl.int32, bitcast=True)
    folded = tl.where(signed < 0, -signed - 1, signed)
    return folded.to(tl.float32) * UINT_TO_UNIFORM


@triton.jit
def _approx(x, OP: tl.constexpr):
    return tl.inline_asm_elementwise(OP + ".approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _box_muller(u_radius, u_angle, FAST_MATH: tl.constexpr):
    """The cosine and sine normals of one uniform pair."""
    u_radius = tl.maximum(u_radius, MIN_UNIFORM)
    if FAST_MATH:
        radius = tl.sqrt(-2.0 * LN2 * _approx(u_radius, "lg2"))
        # cos/sin(2 pi u) = -cos/sin(2 pi u - pi), an angle in [-pi, pi) where the approximate
        # instructions are accurate to about 2**-21 absolute.
        angle = TWO_PI * u_angle - PI
        return -radius * _approx(angle, "cos"), -radius * _approx(angle, "sin")
    else:
        radius = tl.sqrt(-2.0 * tl.log(u_radius))
        angle = TWO_PI * u_angle
        return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def philox_normals(seed, stream, sample, group, FAST_MATH: tl.constexpr):
    """The four normals of counter ``(group, sample, stream, 0)`` (int tensors of one shape)."""
    c0 = group.to(tl.uint32)
    c1 = sample.to(tl.uint32)
    c2 = c0 * 0 + stream.to(tl.uint32)
    w0, w1, w2, w3 = philox4x32(seed, c0, c1, c2, c0 * 0)
    z0, z1 = _box_muller(_uniform(w0), _uniform(w1), FAST_MATH)
    z2, z3 = _box_muller(_uniform(w2), _uniform(w3), FAST_MATH)
    return z0, z1, z2, z3


@triton.jit
def pick(z0, z1, z2, z3, word):
    """Normal number ``word`` (0..3, broadcast against the normals) of the four."""
    return tl.where(word == 0, z0, tl.where(word == 1, z1, tl.where(word == 2, z2, z3)))


@triton.jit
def layout_2d(ROWS: tl.constexpr, INDEX_64: tl.constexpr):
    """This program's elements as ``ROWS`` rows of ``GROUP`` consecutive flat elements.

    Returns ``(rows [ROWS, 1], offsets [ROWS, GROUP])``: the global row numbers (flat // GROUP) and
    flat offsets. Rows are contiguous in memory, so loads stay vectorised."""
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    rows = (pid * ROWS + tl.arange(0, ROWS))[:, None]
    return rows, rows * GROUP + tl.arange(0, GROUP)[None, :]


@triton.jit
def sample_noise(seed_ptr, stream_ptr, index_base_ptr, rows, offs, sample, per_sample,
                 ALIGNED: tl.constexpr, FAST_MATH: tl.constexpr):
    """The stream's normal for each flat offset in ``offs`` ([ROWS, GROUP], rows from layout_2d),
    with ``sample`` the batch position of each element (or of each row when ``ALIGNED``).

    ``ALIGNED``: ``per_sample % GROUP == 0``, so a row never straddles two samples and one Philox
    call serves the whole row; otherwise each element runs its own call and keeps one word."""
    seed = tl.load(seed_ptr)
    stream = tl.load(stream_ptr)
    base = tl.load(index_base_ptr)
    if ALIGNED:
        group = rows - sample * (per_sample // GROUP)
        word = tl.arange(0, GROUP)[None, :]
    else:
        within = offs - sample * per_sample
        group = within // GROUP
        word = within % GROUP
    z0, z1, z2, z3 = philox_normals(seed, stream, sample + base, group, FAST_MATH)
    return pick(z0, z1, z2, z3, word)
