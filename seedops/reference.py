"""The Python definition of z and of every op: the contract the compiled kernels (csrc/) meet bit for bit.

z is a pure function of (seed, i), i being the element's global index (parameter offset in
`model.named_parameters()` order, trainable only, + flat index in that parameter):
  Philox4x32-10, key = the 64-bit seed, counter = i // 4, lane i % 4 of its four 32-bit words;
  gaussian:   Box-Muller on the word pairs (x0, x1) and (x2, x3), with our own polynomial log/sin/cos made of
              IEEE + - * / and sqrt only, so every device rounds them identically;
  rademacher: one bit per element: counter i // 128, word (i // 32) % 4, bit i % 32 -> -1 if set else +1.
Masked z (fedkseed --mask): for a fixed set M of each tensor's indices, z_M(seed, i) = z(seed, i) on M and nothing
elsewhere: the masked ops update only M, with the dense ops' arithmetic, so the bits on M are the dense ops'.
These functions are slow and readable; csrc/ computes the same float32 bits fast (AVX-512/AVX2/scalar on the CPU,
and CUDA), and tests/test_kernels.py checks them against each other bit for bit.
"""
import torch

GAUSSIAN, RADEMACHER = 0, 1
_M32 = 0xFFFFFFFF


def _f32(x):
    return torch.tensor(x, dtype=torch.float32)  # constants as float32, so every op is a float32 op


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding uint32 words -> 4 output words.
    A 32x32-bit product can exceed int64 and wrap, but its low 64 bits stay exact: mask after shifting."""
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = ((p1 >> 32) & _M32) ^ c1 ^ k0, p1 & _M32, ((p0 >> 32) & _M32) ^ c3 ^ k1, p0 & _M32
    return c0, c1, c2, c3


def _philox(seed: int, counters):  # counter (i // 4 or i // 128) as (low, high, 0, 0); key = seed as uint64
    seed &= 0xFFFFFFFFFFFFFFFF
    zero = torch.zeros_like(counters)
    return philox4x32_10(counters & _M32, counters >> 32, zero, zero, seed & _M32, seed >> 32)


def _minus_two_log_uniform(x):  # x: uint32 words (int64) -> -2 log u, u = ((x >> 8) + 1) / 2^24 in (0, 1]
    u = ((x >> 8) + 1).float() * _f32(2.0**-24)
    b = u.view(torch.int32).long()
    e = (b >> 23) - 127  # u = m 2^e ...
    mb = (b & 0x7FFFFF) | 0x3F800000
    big = mb > 0x3FB504F3  # ... with m in [sqrt(1/2), sqrt(2)]
    mb, e = torch.where(big, mb - 0x800000, mb), e + big.long()
    f = mb.int().view(torch.float32) - _f32(1.0)
    s = f / (_f32(2.0) + f)  # log m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + s^7/7 + s^9/9), |s| <= 0.1716
    s2 = s * s
    t = s2 * (_f32(0.666666667) + s2 * (_f32(0.4) + s2 * (_f32(0.285714286) + s2 * _f32(0.222222222))))
    logm = (s + s) + s * t
    ef = e.float()  # ln 2 = hi + lo, hi with few bits so e * hi is exact
    return _f32(-2.0) * (ef * _f32(0.693359375) + (ef * _f32(-2.12194440e-4) + logm))


def _cos_sin_turn(x):  # x: uint32 words -> (cos, sin) of 2 pi k / 2^24, k = x >> 8
    k = x >> 8
    qf = (k + (1 << 21)) >> 22  # nearest quarter turn (0..4) ...
    a = (k - (qf << 22)).float() * _f32(3.74507028e-07)  # ... and the rest, |a| <= pi/4 (2 pi / 2^24 per step)
    q = qf & 3
    a2 = a * a
    sp = a + a * (a2 * (_f32(-1.66666667e-1) + a2 * (_f32(8.33333333e-3) + a2 * (_f32(-1.98412698e-4) + a2 * _f32(2.75573192e-6)))))
    cp = _f32(1.0) + a2 * (_f32(-0.5) + a2 * (_f32(4.16666667e-2) + a2 * (_f32(-1.38888889e-3) + a2 * (_f32(2.48015873e-5) + a2 * _f32(-2.75573192e-7)))))
    odd = (q & 1) == 1  # quarter turns: (c, s) -> (-s, c) -> (-c, -s) -> (s, -c)
    c, s = torch.where(odd, sp, cp), torch.where(odd, cp, sp)
    c = torch.where((q == 1) | (q == 2), -c, c)
    s = torch.where(q >= 2, -s, s)
    return c, s


def _check(op, p=None, offset=0, kind=0, seeds=(), scales=()):  # the compiled ops raise the same messages
    if p is not None and p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fedfull.{op}: tensor must be float32, bfloat16 or float16, got {p.dtype}")
    if p is not None and not p.is_contiguous():
        raise ValueError(f"fedfull.{op}: tensor must be contiguous; call .contiguous() or pass the parameter itself")
    if len(seeds) != len(scales):
        raise ValueError(f"fedfull.{op}: got {len(seeds)} seeds but {len(scales)} scales; they must have the same length")
    if offset < 0:
        raise ValueError(f"fedfull.{op}: offset must be >= 0, got {offset}")
    if kind not in (GAUSSIAN, RADEMACHER):
        raise ValueError(f"fedfull.{op}: unknown kind {kind} (0 = gaussian, 1 = rademacher)")


def z_reference(seed: int, offset: int, n: int, kind: int, device=None) -> torch.Tensor:
    """float32 z(seed, i) for i in [offset, offset + n): shape (n,)."""
    _check("noise", offset=offset, kind=kind)
    if n <= 0:
        return torch.zeros(max(n, 0), dtype=torch.float32, device=device)
    if kind == GAUSSIAN:
        c_first = offset // 4
        x0, x1, x2, x3 = _philox(seed, torch.arange(c_first, (offset + n - 1) // 4 + 1))
        r01, r23 = torch.sqrt(_minus_two_log_uniform(x0).double()).float(), torch.sqrt(_minus_two_log_uniform(x2).double()).float()
        # (sqrt in float64 then rounded = IEEE sqrtf; torch's float32 sqrt is not always correctly rounded)
        c01, s01 = _cos_sin_turn(x1)
        c23, s23 = _cos_sin_turn(x3)
        z = torch.stack([r01 * c01, r01 * s01, r23 * c23, r23 * s23], dim=1).view(-1)  # z[4 c + lane]
        z = z[offset - 4 * c_first : offset - 4 * c_first + n]
    else:
        i = torch.arange(offset, offset + n)
        c_first = offset // 128
        words = torch.stack(_philox(seed, torch.arange(c_first, (offset + n - 1) // 128 + 1)), dim=1).view(-1)
        bit = (words[(i >> 5) - 4 * c_first] >> (i & 31)) & 1
        z = (1 - 2 * bit).float()
    return z.to(device) if device is not None else z


def perturb_reference_(p: torch.Tensor, seed: int, offset: int, scale: float, kind: int) -> None:
    """p.view(-1)[j] += scale * z(seed, offset + j): float32 arithmetic, rounded once to p.dtype."""
    _check("perturb_", p, offset, kind)
    flat = p.view(-1)
    z = z_reference(seed, offset, flat.numel(), kind, flat.device)
    flat.copy_((flat.float() + _f32(scale).to(flat.device) * z).to(p.dtype))


def apply_seeds_reference_(p: torch.Tensor, seeds, scales, offset: int, kind: int) -> None:
    """p.view(-1)[j] += sum_s scales[s] * z(seeds[s], offset + j): one float32 sum in seed order, one rounding."""
    _check("apply_seeds_", p, offset, kind, seeds, scales)
    flat = p.view(-1)
    acc = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    for s, c in zip(seeds, scales):
        acc = acc + _f32(c).to(flat.device) * z_reference(s, offset, flat.numel(), kind, flat.device)
    flat.copy_((flat.float() + acc).to(p.dtype))


def _check_disjoint(op, tensors):  # the compiled multi ops refuse tensors that share memory on every device
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"fedfull.{op}: two of the tensors share memory (the same tensor twice, or overlapping "
                         "views); each element may be updated once per call")


def perturb_multi_reference_(params, seed: int, offsets, scale: float, kind: int) -> None:
    """perturb_ over a list of tensors, each at its global offset: what one pass over a model does."""
    _check_disjoint("perturb_multi_", params)
    for p, off in zip(params, offsets):
        perturb_reference_(p, seed, off, scale, kind)


def apply_seeds_multi_reference_(params, seeds, scales, offsets, kind: int) -> None:
    """apply_seeds_ over a list of tensors, each at its global offset."""
    _check_disjoint("apply_seeds_multi_", params)
    for p, off in zip(params, offsets):
        apply_seeds_reference_(p, seeds, scales, off, kind)


def perturb_copy_multi_reference_(params, copies, seed: int, offsets, scale: float, kind: int) -> None:
    """perturb_multi_ on float32 `params`, then each copy <- its tensor rounded to nearest even (the copy's dtype,
    bfloat16 or float16): the compute copy the forwards read (--compute_dtype). The float32 bits are perturb_'s."""
    _check_disjoint("perturb_copy_multi_", list(params) + list(copies))
    perturb_multi_reference_(params, seed, offsets, scale, kind)
    for c, p in zip(copies, params):
        c.copy_(p)


def apply_seeds_copy_multi_reference_(params, copies, seeds, scales, offsets, kind: int) -> None:
    """apply_seeds_multi_ on float32 `params`, then each copy <- its tensor rounded to nearest even."""
    _check_disjoint("apply_seeds_copy_multi_", list(params) + list(copies))
    apply_seeds_multi_reference_(params, seeds, scales, offsets, kind)
    for c, p in zip(copies, params):
        c.copy_(p)


def z_masked_reference(seed: int, offset: int, idx: torch.Tensor, kind: int) -> torch.Tensor:
    """float32 z(seed, offset + idx[k]) for each k (idx: int64 local indices): the dense z at those indices, computed
    from their own counters (i // 4 and lane i % 4; rademacher: counter i // 128, word (i // 32) % 4, bit i % 32)."""
    _check("noise_masked", offset=offset, kind=kind)
    i = idx.to(torch.int64).cpu() + offset
    if i.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=idx.device)
    if kind == GAUSSIAN:
        x = torch.stack(_philox(seed, i >> 2), dim=1)  # [m, 4] words of each element's counter
        lane = i & 3
        pair = (lane >> 1) * 2  # the Box-Muller pair of the lane: words (0, 1) or (2, 3)
        rows = torch.arange(len(i))
        r = torch.sqrt(_minus_two_log_uniform(x[rows, pair]).double()).float()
        c, s_ = _cos_sin_turn(x[rows, pair + 1])
        z = torch.where((lane & 1) == 1, r * s_, r * c)
    else:
        words = torch.stack(_philox(seed, i >> 7), dim=1)  # [m, 4]
        bit = (words[torch.arange(len(i)), (i >> 5) & 3] >> (i & 31)) & 1
        z = (1 - 2 * bit).float()
    return z.to(idx.device)


def _check_mask(op, p, idx):
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(f"fedfull.{op}: a mask must be a 1-D int64 tensor of indices, got {idx.dtype} {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel() or (idx.numel() > 1 and not
                                                                              bool((idx[1:] > idx[:-1]).all()))):
        raise ValueError(f"fedfull.{op}: a mask must hold strictly increasing indices in [0, {p.numel()})")


def perturb_masked_multi_reference_(params, copies, masks, seed: int, offsets, scale: float, kind: int) -> None:
    """For each tensor p and its mask idx: p.view(-1)[idx] += scale * z(seed, offset + idx), float32 arithmetic rounded
    once to p.dtype (perturb_'s); nothing else changes. copies ([] or one per tensor): each rounded at the mask."""
    _check_disjoint("perturb_masked_multi_", list(params) + list(copies))
    for t, (p, idx, off) in enumerate(zip(params, masks, offsets)):
        _check("perturb_masked_multi_", p, off, kind)
        _check_mask("perturb_masked_multi_", p, idx)
        flat = p.view(-1)
        z = z_masked_reference(seed, off, idx, kind)
        flat[idx] = (flat[idx].float() + _f32(scale).to(flat.device) * z).to(p.dtype)
        if copies:
            copies[t].view(-1)[idx] = flat[idx].to(copies[t].dtype)


def apply_seeds_masked_multi_reference_(params, copies, masks, seeds, scales, offsets, kind: int) -> None:
    """For each tensor p and its mask idx: p.view(-1)[idx] += sum_s scales[s] * z(seeds[s], offset + idx), one float32
    sum from 0 in seed order, one rounding (apply_seeds_'s); no seed: p unchanged. copies as perturb_masked_multi_."""
    _check_disjoint("apply_seeds_masked_multi_", list(params) + list(copies))
    for t, (p, idx, off) in enumerate(zip(params, masks, offsets)):
        _check("apply_seeds_masked_multi_", p, off, kind, seeds, scales)
        _check_mask("apply_seeds_masked_multi_", p, idx)
        flat = p.view(-1)
        if len(seeds):
            acc = torch.zeros(idx.numel(), dtype=torch.float32, device=flat.device)
            for sd, c in zip(seeds, scales):
                acc = acc + _f32(c).to(flat.device) * z_masked_reference(sd, off, idx, kind)
            flat[idx] = (flat[idx].float() + acc).to(p.dtype)
        if copies:
            copies[t].view(-1)[idx] = flat[idx].to(copies[t].dtype)
