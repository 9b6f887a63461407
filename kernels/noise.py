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
drawn in, and no two steps share a stream. The sine and cosine of the angle share one short
range reduction and two polynomials (``_sincos``) instead of libdevice's general ones: the same
numbers within a few ulp, at a fraction of the instructions. (The GPU's approximate ``lg2``,
tried first, loses all relative accuracy of ``log u`` for ``u`` near 1: errors up to 8e-5 in a
normal, measured on an H100.)
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
TWO_OVER_PI = tl.constexpr(0.6366197723675814)
PI_OVER_2_HI = tl.constexpr(1.5707963705062866)  # float32(pi / 2)
PI_OVER_2_LO = tl.constexpr(-4.371138828673793e-08)  # pi / 2 - PI_OVER_2_HI
SIN_C3 = tl.constexpr(-1.6666654611e-1)
SIN_C5 = tl.constexpr(8.3321608736e-3)
SIN_C7 = tl.constexpr(-1.9515295891e-4)
COS_C4 = tl.constexpr(4.166664568298827e-2)
COS_C6 = tl.constexpr(-1.388731625493765e-3)
COS_C8 = tl.constexpr(2.443315711809948e-5)
GROUP_SIZE = 4  # normals per Philox call = elements per row of the 2-D layout
# Launch shape of the elementwise kernels (benchmarks/tune.py sweeps them on a GPU).
DEFAULT_BLOCK = 4096
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
def _sincos(theta):
    """sin and cos of ``theta`` in [0, 2 pi]: one shared reduction to [-pi/4, pi/4] by the nearest
    multiple of pi/2 (Cody-Waite, two constants), then minimax polynomials (Cephes' sinf/cosf
    coefficients). Within about 2 ulp of the exact values of the same float32 angle, and far
    cheaper than libdevice's sinf/cosf, whose range reduction serves any angle."""
    q = (theta * TWO_OVER_PI + 0.5).to(tl.int32)  # round to nearest: the argument is >= 0.5
    quadrant = q.to(tl.float32)
    r = theta - quadrant * PI_OVER_2_HI
    r = r - quadrant * PI_OVER_2_LO
    r2 = r * r
    # (Tensors on the left of every constant: the interpreter's constexpr arithmetic would wrap
    # the tensor otherwise.)
    sin_r = r + r * r2 * (r2 * (r2 * SIN_C7 + SIN_C5) + SIN_C3)
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (r2 * (r2 * COS_C8 + COS_C6) + COS_C4)
    q = q & 3
    sin_t = tl.where(q == 0, sin_r, tl.where(q == 1, cos_r, tl.where(q == 2, -sin_r, -cos_r)))
    cos_t = tl.where(q == 0, cos_r, tl.where(q == 1, -sin_r, tl.where(q == 2, -cos_r, sin_r)))
    return sin_t, cos_t


@triton.jit
def _box_muller(u_radius, u_angle):
    """The cosine and sine normals of one uniform pair."""
    radius = tl.sqrt(-2.0 * tl.log(tl.maximum(u_radius, MIN_UNIFORM)))
    sin_t, cos_t = _sincos(u_angle * TWO_PI)
    return radius * cos_t, radius * sin_t


@triton.jit
def philox_normals(seed, stream, sample, group):
    """The four normals of counter ``(group, sample, stream, 0)`` (int tensors of one shape)."""
    c0 = group.to(tl.uint32)
    c1 = sample.to(tl.uint32)
    c2 = c0 * 0 + stream.to(tl.uint32)
    w0, w1, w2, w3 = philox4x32(seed, c0, c1, c2, c0 * 0)
    z0, z1 = _box_muller(_uniform(w0), _uniform(w1))
    z2, z3 = _box_muller(_uniform(w2), _uniform(w3))
    return z0, z1, z2, z3


@triton.jit
def pick(z0, z1, z2, z3, word):
    """Normal number ``word`` (0..3, broadcast against the normals) of the four."""
    return tl.where(word == 0, z0, tl.where(word == 1, z1, tl.where(word == 2, z2, z3)))


@triton.jit
def layout_2d(ROWS: tl.constexpr, ROW: tl.constexpr, INDEX_64: tl.constexpr):
    """This program's elements as ``ROWS`` rows of ``ROW`` consecutive flat elements (``ROW``: 4
    for 4-byte storage, 8 for 2-byte, so that a row is one 128-bit access).

    Returns ``(rows [ROWS, 1], offsets [ROWS, ROW])``: the global row numbers (flat // ROW) and
    the flat offsets."""
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    rows = (pid * ROWS + tl.arange(0, ROWS))[:, None]
    return rows, rows * ROW + tl.arange(0, ROW)[None, :]


@triton.jit
def batch_position(rows, offs, per_sample, ROW: tl.constexpr, ALIGNED: tl.constexpr):
    """The batch position of each row ([ROWS, 1]; ``ALIGNED``: ``per_sample % ROW == 0``, so no
    row straddles two samples) or of each element ([ROWS, ROW])."""
    if ALIGNED:
        return rows // (per_sample // ROW)
    else:
        return offs // per_sample


@triton.jit
def sample_noise(seed_ptr, stream_ptr, index_base_ptr, rows, offs, sample, per_sample,
                 ROW: tl.constexpr, ALIGNED: tl.constexpr):
    """The stream's normal for each flat offset in ``offs`` ([ROWS, ROW], from layout_2d), with
    ``sample`` from :func:`batch_position`.

    ``ALIGNED``: a row holds ``ROW // 4`` whole Philox groups of one sample, so that many calls
    serve the row; otherwise each element runs its own call and keeps one word."""
    seed = tl.load(seed_ptr)
    stream = tl.load(stream_ptr)
    index = sample + tl.load(index_base_ptr)
    if ALIGNED:
        group = rows * (ROW // GROUP) - sample * (per_sample // GROUP)
        column = tl.arange(0, ROW)[None, :]
        z0, z1, z2, z3 = philox_normals(seed, stream, index, group)
        if ROW == GROUP:
            return pick(z0, z1, z2, z3, column)
        else:
            y0, y1, y2, y3 = philox_normals(seed, stream, index, group + 1)
            return tl.where(column < GROUP, pick(z0, z1, z2, z3, column), pick(y0, y1, y2, y3, column - GROUP))
    else:
        within = offs - sample * per_sample
        z0, z1, z2, z3 = philox_normals(seed, stream, index, within // GROUP)
        return pick(z0, z1, z2, z3, within % GROUP)


def row_length(element_size: int) -> int:
    """Elements a thread holds contiguously: one 128-bit access (4 in float32, 8 in 16-bit)."""
    return max(GROUP_SIZE, 16 // element_size)
