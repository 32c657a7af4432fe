"""z kernels: the compiled ops (csrc/) against the pure-PyTorch reference in seedops/reference.py, bit for bit, plus
the statistics z must have and the errors bad input must raise. Speed lives in bench/bench_kernels.py."""
import functools
import math
import os
import subprocess
import sys

import pytest
import torch

import fedkseed
import seedops as F
from seedops import reference as R

ops = torch.ops.fedfull if F.HAVE_COMPILED_OPS else None
compiled = pytest.mark.skipif(not F.HAVE_COMPILED_OPS, reason=f"fedfull_ops not built: {F.COMPILED_OPS_ERROR}")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = [F.GAUSSIAN, F.RADEMACHER]
BIG_SEED = 2**63 - 1
# (seed, offset, n): offsets not a multiple of 4 (nor of the kernels' block sizes), lengths 1 .. 10**6;
# a negative seed is its 64-bit two's complement
CASES = [(0, 0, 1), (0, 3, 2), (BIG_SEED, 1, 7), (12345, 5, 4096), (987654321, 4094, 8195),
         (BIG_SEED, 2**40 + 127, 1000), (-1, 6, 33), (31337, 130, 100_003)]


@functools.lru_cache(maxsize=None)
def ref_z(seed, offset, n, kind):
    return F.z_reference(seed, offset, n, kind)


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (bits(a) != bits(b)).nonzero()
    assert diff.numel() == 0, f"{diff.numel()} elements differ, first at {diff[0].item()}: {a.view(-1)[diff[0]]} vs {b.view(-1)[diff[0]]}"


def simd_levels():
    if not F.HAVE_COMPILED_OPS:
        return [0]
    best = ops.simd_level(-1)
    return list(range(best + 1))


@pytest.fixture
def simd():
    """Run a test on one CPU path (0 scalar, 1 AVX2, 2 AVX-512), then go back to the best one."""
    def use(level):
        assert ops.simd_level(level) == level
    yield use
    ops.simd_level(-1)


# ------------------------------------------------------------------------------------------------------
# the reference itself, against outside oracles
# ------------------------------------------------------------------------------------------------------
def test_philox_known_answers():
    # Random123's published known-answer vectors for philox4x32-10
    vectors = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
               ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
               ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in vectors:
        got = R.philox4x32_10(*[torch.tensor([c]) for c in ctr], *key)
        assert tuple(int(w) for w in got) == want


def test_reference_polynomials_match_libm():
    # our log / sin / cos are polynomials; they must still be accurate, not just reproducible
    x = torch.randint(0, 2**32, (100_000,), generator=torch.Generator().manual_seed(0))
    u = ((x >> 8) + 1).double() / 2**24
    assert torch.allclose(R._minus_two_log_uniform(x).double(), -2 * torch.log(u), rtol=2e-6, atol=1e-6)
    c, s = R._cos_sin_turn(x)
    t = 2 * math.pi * (x >> 8).double() / 2**24
    assert (c.double() - torch.cos(t)).abs().max() < 3e-7 and (s.double() - torch.sin(t)).abs().max() < 3e-7


def test_reference_is_a_function_of_the_global_index():
    z = ref_z(7, 0, 300, F.GAUSSIAN)
    assert_same_bits(F.z_reference(7, 123, 45, F.GAUSSIAN), z[123:168])
    z = ref_z(7, 0, 300, F.RADEMACHER)
    assert_same_bits(F.z_reference(7, 127, 100, F.RADEMACHER), z[127:227])


# ------------------------------------------------------------------------------------------------------
# compiled == reference, bit for bit
# ------------------------------------------------------------------------------------------------------
@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed,offset,n", CASES)
def test_noise_matches_reference(seed, offset, n, kind, simd):
    for level in simd_levels():
        simd(level)
        assert_same_bits(ops.noise(seed, offset, n, kind), ref_z(seed, offset, n, kind))


@compiled
@pytest.mark.parametrize("kind", KINDS)
def test_noise_matches_reference_million(kind):
    assert_same_bits(ops.noise(BIG_SEED, 3, 10**6, kind), ref_z(BIG_SEED, 3, 10**6, kind))


@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,offset,n", CASES[1:7])
def test_perturb_matches_reference(seed, offset, n, dtype, kind, simd):
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    want = p0.clone()
    F.perturb_reference_(want, seed, offset, 0.37, kind)
    for level in simd_levels():
        simd(level)
        got = p0.clone()
        ops.perturb_(got, seed, offset, 0.37, kind)
        assert_same_bits(got, want)


@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_seeds_matches_reference_and_perturb_sequence(dtype, kind, simd):
    n, offset = 10_007, 4093
    seeds = [0, BIG_SEED, 1, 2, 3, 17, 2**40, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    scales = [0.1 * (-1) ** k / (k + 1) for k in range(16)]
    p0 = torch.randn(3, n, generator=torch.Generator().manual_seed(1)).to(dtype)[1]   # a contiguous row
    want = p0.clone()
    F.apply_seeds_reference_(want, seeds, scales, offset, kind)
    for level in simd_levels():
        simd(level)
        got = p0.clone()
        ops.apply_seeds_(got, seeds, scales, offset, kind)
        assert_same_bits(got, want)
    if dtype == torch.float32:   # one rounding vs sixteen: equal within float32 tolerance
        seq = p0.clone()
        for s, c in zip(seeds, scales):
            ops.perturb_(seq, s, offset, c, kind)
        torch.testing.assert_close(seq, want, rtol=1e-5, atol=1e-6)


@compiled
def test_apply_seeds_empty_is_a_no_op():
    p = torch.randn(10)
    q = p.clone()
    ops.apply_seeds_(q, [], [], 0, F.GAUSSIAN)
    assert_same_bits(q, p)


@compiled
@pytest.mark.parametrize("kind", KINDS)
def test_one_and_two_threads_give_the_same_bits(kind):
    before = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2):
            torch.set_num_threads(t)
            p = torch.ones(300_001)
            ops.perturb_(p, 99, 5, 0.5, kind)
            ops.apply_seeds_(p, [1, 2, 3], [0.1, 0.2, 0.3], 5, kind)
            out.append(p)
        assert_same_bits(out[0], out[1])
    finally:
        torch.set_num_threads(before)


@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [1e-3, 0.5])
def test_plus_then_minus_restores_within_one_rounding(scale, kind):
    p0 = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    p = p0.clone()
    ops.perturb_(p, 11, 6, scale, kind)
    ops.perturb_(p, 11, 6, -scale, kind)
    mag = p0.abs() + (scale * ops.noise(11, 6, p0.numel(), kind)).abs()
    ulp = torch.nextafter(mag, torch.tensor(math.inf)) - mag
    assert ((p - p0).abs() <= ulp).all()


# ------------------------------------------------------------------------------------------------------
# z has the distribution it claims
# ------------------------------------------------------------------------------------------------------
def _z(seed, n, kind, offset=0):
    return ops.noise(seed, offset, n, kind) if F.HAVE_COMPILED_OPS else F.z_reference(seed, offset, n, kind)


def _corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_gaussian_moments_and_ks():
    n = 10**6
    z = _z(2024, n, F.GAUSSIAN).double()
    tol = 5 / math.sqrt(n)   # five standard errors
    assert abs(z.mean()) < tol
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**3).mean()) < 5 * math.sqrt(15 / n) and abs((z**4).mean() - 3) < 5 * math.sqrt(96 / n)
    # Kolmogorov-Smirnov against N(0, 1); Phi via erf, spot-checked against math.erf
    zs = z.sort().values
    phi = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    for k in (0, n // 3, n - 1):
        assert abs(phi[k] - 0.5 * (1 + math.erf(zs[k] / math.sqrt(2)))) < 1e-12
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((i / n - phi).max()), float((phi - (i - 1) / n).max()))
    assert d < 1.63 / math.sqrt(n), f"KS statistic {d:.2e} rejects N(0,1) at the 1% level"
    assert abs(float((z.abs() > 3).double().mean()) - 0.0026998) < 5 * math.sqrt(0.0027 / n)


@pytest.mark.parametrize("kind", KINDS)
def test_no_correlation_between_indices_or_seeds(kind):
    n = 400_000
    z = _z(5, n, kind)
    tol = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 4, 5, 32, 128):   # within a counter, across counters, across words
        assert abs(_corr(z[:-lag], z[lag:])) < tol, lag
    for s in (0, 4, 6, 2**32 + 5, BIG_SEED):
        assert abs(_corr(z, _z(s, n, kind))) < tol, s
    if kind == F.GAUSSIAN:   # Box-Muller pairs are independent, not just uncorrelated
        assert abs(_corr(z[:-1] ** 2, z[1:] ** 2)) < tol


def test_rademacher_is_balanced_signs():
    n = 10**6
    z = _z(77, n, F.RADEMACHER)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.double().mean())) < 5 / math.sqrt(n)


# ------------------------------------------------------------------------------------------------------
# torch.library integration and errors
# ------------------------------------------------------------------------------------------------------
@compiled
def test_opcheck():
    p = torch.randn(1000)
    torch.library.opcheck(ops.perturb_.default, (p, 3, 5, 0.25, F.GAUSSIAN))
    torch.library.opcheck(ops.apply_seeds_.default, (p, [1, 2], [0.5, -0.25], 5, F.RADEMACHER))
    torch.library.opcheck(ops.noise_fill_.default, (torch.empty(77), 3, 1, F.GAUSSIAN))
    torch.library.opcheck(ops.noise.default, (3, 1, 77, F.GAUSSIAN))


@compiled
def test_meta_tensors_are_checked_not_computed():
    p = torch.empty(10, device="meta")
    ops.perturb_(p, 1, 0, 1.0, F.GAUSSIAN)
    ops.apply_seeds_(p, [1], [1.0], 0, F.RADEMACHER)
    with pytest.raises(RuntimeError, match="offset"):
        ops.perturb_(p, 1, -1, 1.0, F.GAUSSIAN)


BAD = [
    ("contiguous", lambda f: f.perturb_(torch.zeros(4, 4).t(), 1, 0, 1.0, 0)),
    ("float32, bfloat16 or float16", lambda f: f.perturb_(torch.zeros(4, dtype=torch.int32), 1, 0, 1.0, 0)),
    ("float32, bfloat16 or float16", lambda f: f.apply_seeds_(torch.zeros(4, dtype=torch.int64), [1], [1.0], 0, 0)),
    ("2 seeds but 1 scales", lambda f: f.apply_seeds_(torch.zeros(4), [1, 2], [1.0], 0, 0)),
    ("offset must be >= 0", lambda f: f.perturb_(torch.zeros(4), 1, -3, 1.0, 0)),
    ("offset must be >= 0", lambda f: f.noise(1, -3, 4, 0)),
    ("unknown kind 2", lambda f: f.perturb_(torch.zeros(4), 1, 0, 1.0, 2)),
    ("unknown kind -1", lambda f: f.apply_seeds_(torch.zeros(4), [1], [1.0], 0, -1)),
    ("unknown kind 7", lambda f: f.noise(1, 0, 4, 7)),
]


@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("message,call", BAD, ids=[f"{i}-{m[:12]}" for i, (m, _) in enumerate(BAD)])
def test_bad_input_raises_clear_error(impl, message, call):
    if impl == "compiled":
        if not F.HAVE_COMPILED_OPS:
            pytest.skip("fedfull_ops not built")
        f = ops
    else:
        class f:  # the reference under the ops' names
            perturb_, apply_seeds_, noise = F.perturb_reference_, F.apply_seeds_reference_, F.z_reference
    with pytest.raises((RuntimeError, ValueError), match=message):
        call(f)


def test_seedops_uses_the_compiled_ops_when_built():
    if F.HAVE_COMPILED_OPS:
        assert F.perturb_ is torch.ops.fedfull.perturb_ and F.apply_seeds_ is torch.ops.fedfull.apply_seeds_
    else:
        assert F.perturb_ is F.perturb_reference_


def test_seedops_falls_back_to_the_reference_without_them():
    code = ("import sys; sys.modules['fedfull_ops'] = None\n"   # makes `import fedfull_ops` fail
            "import seedops as F\n"
            "assert not F.HAVE_COMPILED_OPS and F.COMPILED_OPS_ERROR\n"
            "assert (F.noise, F.perturb_, F.apply_seeds_) == (F.z_reference, F.perturb_reference_, F.apply_seeds_reference_)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(F.__file__))))


# ------------------------------------------------------------------------------------------------------
# the multi-tensor ops: one call over a model's parameters
# ------------------------------------------------------------------------------------------------------
def model_like(dtype, sizes=(7, 4096, 1, 33, 100_003, 128, 5)):
    """Tensors of awkward sizes laid end to end in the global index space (offsets not multiples of 4)."""
    torch.manual_seed(0)
    ps = [torch.randn(n).to(dtype) for n in sizes]
    offsets, total = [], 3
    for n in sizes:
        offsets.append(total)
        total += n
    return ps, offsets


@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_ops_equal_the_reference(dtype, kind):
    ps, offsets = model_like(dtype)
    want = [p.clone() for p in ps]
    F.perturb_multi_reference_(want, BIG_SEED, offsets, 0.37, kind)
    got = [p.clone() for p in ps]
    ops.perturb_multi_(got, BIG_SEED, offsets, 0.37, kind)
    for a, b in zip(got, want):
        assert_same_bits(a, b)
    seeds, scales = [0, BIG_SEED, 5, -1], [0.5, -0.25, 0.125, 3e-3]
    want = [p.clone() for p in ps]
    F.apply_seeds_multi_reference_(want, seeds, scales, offsets, kind)
    got = [p.clone() for p in ps]
    ops.apply_seeds_multi_(got, seeds, scales, offsets, kind)
    for a, b in zip(got, want):
        assert_same_bits(a, b)


def shared_memory_cases():
    buf = torch.zeros(100)
    same = torch.zeros(10)
    return [("the same tensor twice", [same, same]), ("overlapping views", [buf[:60], buf[50:]])]


@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("case", [0, 1], ids=["same-tensor", "overlapping-views"])
def test_multi_ops_refuse_tensors_that_share_memory(impl, case):
    """On CPU the tensors would be updated in turn, on CUDA at once: refused on every device, by the reference too."""
    if impl == "compiled" and not F.HAVE_COMPILED_OPS:
        pytest.skip("fedfull_ops not built")
    perturb = ops.perturb_multi_ if impl == "compiled" else F.perturb_multi_reference_
    apply = ops.apply_seeds_multi_ if impl == "compiled" else F.apply_seeds_multi_reference_
    _, ps = shared_memory_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match="share memory"):
        perturb(ps, 1, [0, 200], 1.0, F.GAUSSIAN)
    with pytest.raises((RuntimeError, ValueError), match="share memory"):
        apply(ps, [1], [1.0], [0, 200], F.RADEMACHER)
    buf = torch.zeros(100)
    perturb([buf[:50], buf[50:]], 1, [0, 50], 1.0, F.GAUSSIAN)  # disjoint views of one buffer are fine


@compiled
def test_copy_ops_refuse_a_copy_that_shares_memory():
    c = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="share memory"):
        ops.perturb_copy_multi_([torch.zeros(8), torch.zeros(8)], [c, c], 1, [0, 8], 1.0, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_nan_stays_nan(dtype, kind):
    """The contract covers finite values bit for bit; a NaN's payload is outside it (CPU and GPU produce different
    quiet NaNs), but a NaN weight stays a NaN and its neighbours are unaffected."""
    p = torch.tensor([1.0, float("nan"), -2.0, float("nan")] * 8).to(dtype)
    want = p.clone()
    F.perturb_reference_(want, 5, 3, 0.5, kind)
    for op in ([ops.perturb_] if F.HAVE_COMPILED_OPS else []) + [F.perturb_reference_]:
        got = p.clone()
        op(got, 5, 3, 0.5, kind)
        nan = torch.isnan(p)
        assert torch.isnan(got[nan]).all()
        assert_same_bits(got[~nan], want[~nan])
        if torch.cuda.is_available() and F.HAVE_COMPILED_OPS:
            gpu = p.cuda()
            op(gpu, 5, 3, 0.5, kind)
            assert torch.isnan(gpu.cpu()[nan]).all()
            assert_same_bits(gpu.cpu()[~nan], want[~nan])


COPY_DTYPES = [torch.bfloat16, torch.float16]


@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("copy_dtype", COPY_DTYPES)
def test_copy_ops_equal_the_reference_master_and_copy(copy_dtype, kind, simd):
    """The copy-writing passes (fedkseed --compute_dtype): the float32 weights get exactly perturb_multi_'s /
    apply_seeds_multi_'s bits (so the reference's), and the copy their round-to-nearest-even in its dtype, checked
    against torch's own conversion, on every CPU path."""
    for level in simd_levels():
        simd(level)
        ps, offsets = model_like(torch.float32)
        copies = [torch.full(p.shape, 7.0, dtype=copy_dtype) for p in ps]  # stale values that must all be overwritten
        want = [p.clone() for p in ps]
        F.perturb_multi_reference_(want, BIG_SEED, offsets, 0.37, kind)
        ops.perturb_copy_multi_(ps, copies, BIG_SEED, offsets, 0.37, kind)
        for p, c, w in zip(ps, copies, want):
            assert_same_bits(p, w)
            assert_same_bits(c, w.to(copy_dtype))
        seeds, scales = [0, BIG_SEED, 5, -1], [0.5, -0.25, 0.125, 3e-3]
        F.apply_seeds_multi_reference_(want, seeds, scales, offsets, kind)
        ops.apply_seeds_copy_multi_(ps, copies, seeds, scales, offsets, kind)
        for p, c, w in zip(ps, copies, want):
            assert_same_bits(p, w)
            assert_same_bits(c, w.to(copy_dtype))
        # the Python references the scripts fall back to: the same bits
        ref_ps, ref_copies = [p.clone() for p in ps], [c.clone() for c in copies]
        F.perturb_copy_multi_reference_(ref_ps, ref_copies, 11, offsets, -0.5, kind)
        ops.perturb_copy_multi_(ps, copies, 11, offsets, -0.5, kind)
        F.apply_seeds_copy_multi_reference_(ref_ps, ref_copies, [3], [0.25], offsets, kind)
        ops.apply_seeds_copy_multi_(ps, copies, [3], [0.25], offsets, kind)
        for a, b in zip(ps + copies, ref_ps + ref_copies):
            assert_same_bits(a, b)


@compiled
def test_copy_ops_without_seeds_still_write_the_copy():
    ps, offsets = model_like(torch.float32, sizes=(5, 300))
    copies = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in ps]
    before = [p.clone() for p in ps]
    ops.apply_seeds_copy_multi_(ps, copies, [], [], offsets, F.GAUSSIAN)
    for p, c, b in zip(ps, copies, before):
        assert_same_bits(p, b)
        assert_same_bits(c, b.to(torch.bfloat16))


@compiled
@pytest.mark.parametrize("call, message", [
    (lambda: ops.perturb_copy_multi_([torch.zeros(3)], [], 1, [0], 1.0, 0), "1 tensors but 0 copies"),
    (lambda: ops.perturb_copy_multi_([torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3, dtype=torch.bfloat16)],
                                     1, [0], 1.0, 0), "weights must be float32"),
    (lambda: ops.perturb_copy_multi_([torch.zeros(3)], [torch.zeros(3)], 1, [0], 1.0, 0), "bfloat16 or float16"),
    (lambda: ops.apply_seeds_copy_multi_([torch.zeros(3)], [torch.zeros(4, dtype=torch.float16)], [1], [1.0], [0], 0),
     "size and device"),
])
def test_copy_ops_refuse_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


@compiled
@pytest.mark.parametrize("call, message", [
    (lambda: ops.perturb_multi_([torch.zeros(3)], 1, [0, 4], 1.0, 0), "1 tensors but 2 offsets"),
    (lambda: ops.perturb_multi_([torch.zeros(3), torch.zeros(3, dtype=torch.float16)], 1, [0, 3], 1.0, 0),
     "share one dtype and device"),
    (lambda: ops.apply_seeds_multi_([torch.zeros(3)], [1, 2], [1.0], [0], 0), "2 seeds but 1 scales"),
    (lambda: ops.apply_seeds_multi_([torch.zeros(3)], [1], [1.0], [-1], 0), "offset must be >= 0"),
    (lambda: ops.perturb_multi_([torch.zeros(3)], 1, [0], 1.0, 2), "unknown kind 2"),
])
def test_multi_ops_refuse_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


# ------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): every result bit-identical to the CPU op, which the tests above tie to the
# reference. Sizes cross the grid-stride limit (65535 blocks x 256 threads x 4 elements = 2^26).
# ------------------------------------------------------------------------------------------------------
GRID_STRIDE_ELEMENTS = 65535 * 256 * 4


def assert_cuda_equals_cpu(p0, op, *args):
    """op(tensor, *args) on a CPU copy of p0 and on a CUDA copy: the same bits."""
    want, got = p0.clone(), p0.cuda()
    op(want, *args)
    op(got, *args)
    assert_same_bits(got.cpu(), want)


@cuda
@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype, kind):
    seed, offset, n = BIG_SEED, 4093, 100_003
    assert_same_bits(ops.noise(seed, offset, n, kind, device="cuda").cpu(), ref_z(seed, offset, n, kind))
    p0 = torch.randn(n).to(dtype)
    want = p0.clone()
    F.perturb_reference_(want, seed, offset, 0.37, kind)
    got = p0.cuda()
    ops.perturb_(got, seed, offset, 0.37, kind)
    assert_same_bits(got.cpu(), want)
    seeds, scales = [0, BIG_SEED, 5], [0.5, -0.25, 0.125]
    want = p0.clone()
    F.apply_seeds_reference_(want, seeds, scales, offset, kind)
    got = p0.cuda()
    ops.apply_seeds_(got, seeds, scales, offset, kind)
    assert_same_bits(got.cpu(), want)


@cuda
@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_beyond_the_grid_stride_limit(dtype, kind):
    """One tensor of more than 2^26 elements at an unaligned offset: every thread loops; same bits as the CPU."""
    n, offset = GRID_STRIDE_ELEMENTS + 12_345, 2**33 + 6
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert_cuda_equals_cpu(p0, ops.perturb_, 77, offset, -0.5, kind)
    assert_cuda_equals_cpu(p0, ops.apply_seeds_, [3, 4], [0.25, -1.5], offset, kind)


@cuda
@compiled
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_apply_seeds_with_4096_seeds(kind):
    """A full replay's worth of seeds (K = 4096) over an unaligned slice, float32 sums in seed order."""
    n, offset = 50_001, 1_000_003
    seeds = fedkseed.candidate_seeds(0, 4096)
    scales = [float(x) for x in torch.randn(4096, generator=torch.Generator().manual_seed(2)) * 1e-3]
    assert_cuda_equals_cpu(torch.randn(n), ops.apply_seeds_, seeds, scales, offset, kind)


@cuda
@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_multi_ops_on_a_side_stream(dtype, kind):
    """The multi-tensor ops on a non-default stream (their uploads and launches follow it) equal the CPU ops."""
    ps, offsets = model_like(dtype)
    want = [p.clone() for p in ps]
    ops.perturb_multi_(want, 9, offsets, 0.37, kind)
    ops.apply_seeds_multi_(want, [1, BIG_SEED], [0.5, -2e-3], offsets, kind)
    got = [p.cuda() for p in ps]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.perturb_multi_(got, 9, offsets, 0.37, kind)
        ops.apply_seeds_multi_(got, [1, BIG_SEED], [0.5, -2e-3], offsets, kind)
    stream.synchronize()
    for a, b in zip(got, want):
        assert_same_bits(a.cpu(), b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
@compiled
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_second_device(kind):
    ps, offsets = model_like(torch.float32)
    want = [p.clone() for p in ps]
    ops.apply_seeds_multi_(want, [1, 2], [0.5, -0.25], offsets, kind)
    ops.perturb_(want[1], 5, offsets[1], 0.1, kind)
    got = [p.to("cuda:1") for p in ps]
    ops.apply_seeds_multi_(got, [1, 2], [0.5, -0.25], offsets, kind)
    ops.perturb_(got[1], 5, offsets[1], 0.1, kind)
    assert all(g.device == torch.device("cuda:1") for g in got)
    for a, b in zip(got, want):
        assert_same_bits(a.cpu(), b)


# ------------------------------------------------------------------------------------------------------
# masked ops (fedkseed --mask): z at a fixed set of each tensor's indices, the dense z's bits there
# ------------------------------------------------------------------------------------------------------
def random_masks(ps, density, seed=0):
    """Per tensor a sorted int64 set of ~density of its indices (at least one), with runs and gaps of every size."""
    g = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.randperm(p.numel(), generator=g)[:max(1, int(density * p.numel()))]).values for p in ps]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("density", [0.001, 0.05, 1.0])
def test_masked_z_is_the_dense_z_at_the_mask(kind, density):
    """The outside oracle: z_reference over the whole range, indexed; the masked reference computes each element from
    its own counter (and, compiled, from a dense block where the mask is thick: both paths are exercised here)."""
    seed, offset, n = BIG_SEED, 4093, 30_011
    idx = random_masks([torch.empty(n)], density)[0]
    want = ref_z(seed, offset, n, kind)[idx]
    assert_same_bits(F.z_masked_reference(seed, offset, idx, kind), want)
    if F.HAVE_COMPILED_OPS:
        assert_same_bits(F.noise_masked(seed, offset, idx, kind), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.002, 0.2])
def test_masked_ops_equal_the_dense_ops_at_the_mask_and_leave_the_rest(dtype, kind, density):
    """perturb_masked_multi_ and apply_seeds_masked_multi_ (reference and compiled): at the mask the bits of the
    dense op (reference), elsewhere the tensor as it was."""
    ps, offsets = model_like(dtype)
    masks = random_masks(ps, density)
    seeds, scales = [1, BIG_SEED, 7], [0.5, -2e-3, 0.125]
    impls = [("reference", F.perturb_masked_multi_reference_, F.apply_seeds_masked_multi_reference_)]
    if F.HAVE_COMPILED_OPS:
        impls.append(("compiled", ops.perturb_masked_multi_, ops.apply_seeds_masked_multi_))
    for name, perturb, apply in impls:
        for dense_op, masked_op, args in (
                (lambda t, o: F.perturb_reference_(t, 9, o, 0.37, kind), perturb, (9, offsets, 0.37, kind)),
                (lambda t, o: F.apply_seeds_reference_(t, seeds, scales, o, kind), apply,
                 (seeds, scales, offsets, kind))):
            got = [p.clone() for p in ps]
            masked_op(got, [], masks, *args)
            for p, g, m, off in zip(ps, got, masks, offsets):
                dense = p.clone()
                dense_op(dense, off)
                keep = torch.ones(p.numel(), dtype=torch.bool)
                keep[m] = False
                assert_same_bits(g.view(-1)[m], dense.view(-1)[m])
                assert_same_bits(g.view(-1)[keep], p.view(-1)[keep])


@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
def test_masked_ops_with_copies_equal_the_reference(kind, copy_dtype):
    """The compute copy written at the mask in the same pass: compiled == reference, float32 weights and copies."""
    ps, offsets = model_like(torch.float32)
    masks = random_masks(ps, 0.05, seed=3)
    copies = [p.to(copy_dtype) for p in ps]
    want, want_c = [p.clone() for p in ps], [c.clone() for c in copies]
    got, got_c = [p.clone() for p in ps], [c.clone() for c in copies]
    F.perturb_masked_multi_reference_(want, want_c, masks, 5, offsets, 0.3, kind)
    F.apply_seeds_masked_multi_reference_(want, want_c, masks, [2, 3], [0.1, -0.2], offsets, kind)
    ops.perturb_masked_multi_(got, got_c, masks, 5, offsets, 0.3, kind)
    ops.apply_seeds_masked_multi_(got, got_c, masks, [2, 3], [0.1, -0.2], offsets, kind)
    for a, b, ca, cb in zip(got, want, got_c, want_c):
        assert_same_bits(a, b)
        assert_same_bits(ca, cb)


@compiled
@pytest.mark.parametrize("mask, message", [
    (torch.tensor([5, 3]), "strictly increasing indices in [0, 10)"),
    (torch.tensor([2, 2]), "strictly increasing"),
    (torch.tensor([10]), "in [0, 10)"),
    (torch.tensor([-1]), "in [0, 10)"),
    (torch.tensor([1.0, 2.0]), "must be a contiguous 1-D int64 tensor"),
])
def test_masked_ops_refuse_a_bad_mask(mask, message):
    """An index outside the tensor, twice, or out of order would update an element twice or outside: refused."""
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ops.perturb_masked_multi_([torch.zeros(10)], [], [mask], 1, [0], 0.5, F.GAUSSIAN)
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        F.perturb_masked_multi_reference_([torch.zeros(10)], [], [mask], 1, [0], 0.5, F.GAUSSIAN)


def test_mask_of_takes_each_tensors_top_fraction_ties_to_the_lower_index():
    scores = [torch.tensor([3.0, 1.0, 3.0, 2.0, 0.0, 3.0]), torch.tensor([[1.0, 5.0], [5.0, 1.0]])]
    got = F.mask_of(scores, 0.34)  # ceil(0.34 * 6) = 3, ceil(0.34 * 4) = 2
    assert [m.tolist() for m in got] == [[0, 2, 5], [1, 2]]
    assert [m.tolist() for m in F.mask_of(scores, 0.01)] == [[0], [1]]  # at least one, the first of the largest
    assert all(m.dtype == torch.int64 for m in got)


@cuda
@compiled
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_masked_ops_match_the_cpu(dtype, kind):
    ps, offsets = model_like(dtype)
    masks = random_masks(ps, 0.05, seed=4)
    want = [p.clone() for p in ps]
    ops.perturb_masked_multi_(want, [], masks, 9, offsets, 0.37, kind)
    ops.apply_seeds_masked_multi_(want, [], masks, [1, BIG_SEED], [0.5, -2e-3], offsets, kind)
    got = [p.cuda() for p in ps]
    ops.perturb_masked_multi_(got, [], [m.cuda() for m in masks], 9, offsets, 0.37, kind)
    ops.apply_seeds_masked_multi_(got, [], [m.cuda() for m in masks], [1, BIG_SEED], [0.5, -2e-3], offsets, kind)
    for a, b in zip(got, want):
        assert_same_bits(a.cpu(), b)
    idx = masks[1].cuda()
    assert_same_bits(F.noise_masked(9, offsets[1], idx, kind).cpu(), F.z_masked_reference(9, offsets[1], masks[1], kind))
