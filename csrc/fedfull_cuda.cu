// CUDA kernels of the fedfull ops, registered under the CUDA dispatch key. z comes from the very same
// philox_gaussian.h as the CPU kernels, compiled with --fmad=false so nvcc fuses no multiply-add: the
// bits equal the CPU's and the Python reference's.
//
// A launch covers a list of tensors (one parameter, or a whole model with the *_multi_ ops): a table of
// slots (pointer, length, global offset, first work unit) is uploaded once per call, and each work unit
// finds its slot by binary search. Work units:
//   gaussian     one thread per Philox counter (4 elements); the 4 values are loaded and stored as one
//                16-byte (float32) or 8-byte (bf16/fp16) access where aligned, so a warp touches 512 or 256
//                contiguous bytes.
//   rademacher   one warp per tile of counters (perturb_: 32 counters = 4096 elements; apply_seeds_: 8
//                counters = 1024 elements, its 32 accumulators per lane fit in registers): each lane computes
//                one counter's Philox and the 128 bits are handed out with warp shuffles, so every bit of every
//                Philox block is used once (instead of one Philox block per 4 elements).
// Seeds and scales are uploaded once per call, from pinned memory, on the current stream: no blocking copy.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "ops_common.h"
#include "philox_gaussian.h"

namespace fedfull {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int64_t kRadPerturbTile = 32 * 128;  // elements of a perturb_ rademacher tile (32 counters)
constexpr int64_t kRadApplyTile = 8 * 128;     // elements of an apply_seeds_ rademacher tile (8 counters)

// One tensor of a launch: its memory, its length, its global offset, and the work units before it.
struct Slot {
  int64_t ptr, n, offset, first;
};

__device__ __forceinline__ Slot slot_of(const Slot* table, int nt, const Slot& one, int64_t u) {
  if (table == nullptr) return one;
  int lo = 0, hi = nt - 1;
  while (lo < hi) {   // the last slot whose first unit is <= u
    int mid = (lo + hi + 1) >> 1;
    if (table[mid].first <= u) lo = mid; else hi = mid - 1;
  }
  return table[lo];
}

// 4 consecutive elements as one memory access
template <class T> struct Pack4 { using type = uint2; };  // bf16, fp16: 8 bytes
template <> struct Pack4<float> { using type = float4; };

// p[j + l] = T(float(p[j + l]) + add[l]) for l = 0..3 where 0 <= j + l < n: one vector access when the
// four are inside and aligned, element by element otherwise. The same two roundings either way.
template <class T>
__device__ __forceinline__ void add4(T* p, int64_t n, int64_t j, const float add[4]) {
  using V = typename Pack4<T>::type;
  if (j >= 0 && j + 3 < n && reinterpret_cast<uintptr_t>(p + j) % sizeof(V) == 0) {
    V raw = *reinterpret_cast<const V*>(p + j);
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int l = 0; l < 4; ++l) e[l] = static_cast<T>(static_cast<float>(e[l]) + add[l]);
    *reinterpret_cast<V*>(p + j) = raw;
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (j + l >= 0 && j + l < n) p[j + l] = static_cast<T>(static_cast<float>(p[j + l]) + add[l]);
  }
}

// word (lane / 8) of the Philox block held by lane `src`, shifted so that its low 4 bits are the signs of this
// lane's 4 elements: element 128 c + 4 lane + l is bit 4 (lane % 8) + l of word lane / 8 of counter c
__device__ __forceinline__ uint32_t my_nibble(const Philox4& r, int src, int lane) {
  uint32_t w0 = __shfl_sync(kFullMask, r.x[0], src), w1 = __shfl_sync(kFullMask, r.x[1], src);
  uint32_t w2 = __shfl_sync(kFullMask, r.x[2], src), w3 = __shfl_sync(kFullMask, r.x[3], src);
  int w = lane >> 3;
  uint32_t word = w == 0 ? w0 : (w == 1 ? w1 : (w == 2 ? w2 : w3));
  return word >> (4 * (lane & 7));
}

// s * (+1 or -1), exactly: s with its sign bit flipped where the bit is set
__device__ __forceinline__ float signed_scale(uint32_t sbits, uint32_t bit) {
  return bits_float(sbits ^ (bit << 31));
}

template <class T>
__global__ void perturb_gaussian_kernel(const Slot* table, int nt, Slot one, int64_t total, uint64_t seed, float s) {
  for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < total; u += (int64_t)blockDim.x * gridDim.x) {
    const Slot sl = slot_of(table, nt, one, u);
    const int64_t g = sl.offset / 4 + (u - sl.first);   // the counter: global elements 4g .. 4g + 3
    float z[4], add[4];
    gaussian4(seed, (uint64_t)g, z);
#pragma unroll
    for (int l = 0; l < 4; ++l) add[l] = s * z[l];
    add4(reinterpret_cast<T*>(sl.ptr), sl.n, 4 * g - sl.offset, add);
  }
}

template <class T>
__global__ void perturb_rademacher_kernel(const Slot* table, int nt, Slot one, int64_t total, uint64_t seed, float s) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)blockDim.x * gridDim.x) >> 5;
  const uint32_t sbits = float_bits(s);
  for (int64_t u = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; u < total; u += warps) {  // warp-uniform
    const Slot sl = slot_of(table, nt, one, u);
    const int64_t tile = sl.offset / kRadPerturbTile + (u - sl.first);
    const Philox4 r = philox_for_counter(seed, (uint64_t)(tile * 32 + lane));   // lane L: counter 32 tile + L
    T* p = reinterpret_cast<T*>(sl.ptr);
    for (int c = 0; c < 32; ++c) {
      const uint32_t nib = my_nibble(r, c, lane);
      float add[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) add[l] = signed_scale(sbits, (nib >> l) & 1u);
      add4(p, sl.n, 128 * (tile * 32 + c) + 4 * lane - sl.offset, add);
    }
  }
}

template <class T>
__global__ void apply_gaussian_kernel(const Slot* table, int nt, Slot one, int64_t total, const int64_t* seeds,
                                      const float* scales, int64_t nseeds) {
  for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < total; u += (int64_t)blockDim.x * gridDim.x) {
    const Slot sl = slot_of(table, nt, one, u);
    const int64_t g = sl.offset / 4 + (u - sl.first);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t k = 0; k < nseeds; ++k) {   // fp32 sum in seed order
      float z[4];
      gaussian4((uint64_t)seeds[k], (uint64_t)g, z);
      const float sc = scales[k];
#pragma unroll
      for (int l = 0; l < 4; ++l) acc[l] = acc[l] + sc * z[l];
    }
    add4(reinterpret_cast<T*>(sl.ptr), sl.n, 4 * g - sl.offset, acc);
  }
}

template <class T>
__global__ void apply_rademacher_kernel(const Slot* table, int nt, Slot one, int64_t total, const int64_t* seeds,
                                        const float* scales, int64_t nseeds) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)blockDim.x * gridDim.x) >> 5;
  for (int64_t u = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; u < total; u += warps) {  // warp-uniform
    const Slot sl = slot_of(table, nt, one, u);
    const int64_t tile = sl.offset / kRadApplyTile + (u - sl.first);
    float acc[8][4];
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int l = 0; l < 4; ++l) acc[c][l] = 0.0f;
    for (int64_t k = 0; k < nseeds; ++k) {   // fp32 sum in seed order
      // lanes 0..7 hold counters 8 tile + 0..7 (the other lanes repeat them: 4 Philox per lane-group of 8)
      const Philox4 r = philox_for_counter((uint64_t)seeds[k], (uint64_t)(tile * 8 + (lane & 7)));
      const uint32_t sbits = float_bits(scales[k]);
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const uint32_t nib = my_nibble(r, c, lane);
#pragma unroll
        for (int l = 0; l < 4; ++l) acc[c][l] = acc[c][l] + signed_scale(sbits, (nib >> l) & 1u);
      }
    }
    T* p = reinterpret_cast<T*>(sl.ptr);
#pragma unroll
    for (int c = 0; c < 8; ++c) add4(p, sl.n, 128 * (tile * 8 + c) + 4 * lane - sl.offset, acc[c]);
  }
}

// masked ops: one thread per masked element, z of that element alone (gaussian_z / rademacher_z); a mask's values
// are in [0, n) and strictly increasing (seedops checks them when a mask is made; an index outside is skipped here)
struct MaskSlot {
  int64_t ptr, copy, idx, n, offset, first;   // tensor, its copy (0: none), its mask; numel, global offset, units
};

__device__ __forceinline__ MaskSlot mask_slot(const MaskSlot* table, int nt, int64_t u) {
  int lo = 0, hi = nt - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (table[mid].first <= u) lo = mid; else hi = mid - 1;
  }
  return table[lo];
}

__device__ __forceinline__ float z_at(int64_t kind, uint64_t seed, uint64_t i) {
  return kind == kGaussian ? gaussian_z(seed, i) : rademacher_z(seed, i);
}

// sum = false: perturb_'s p + s z (seeds[0], scales[0]); sum = true: apply_seeds_'s 0 + s_q z_q in seed order, p + acc
template <class T, class C>
__global__ void masked_kernel(const MaskSlot* table, int nt, int64_t total, const int64_t* seeds, const float* scales,
                              int64_t nseeds, int64_t kind, bool sum) {
  for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < total; u += (int64_t)blockDim.x * gridDim.x) {
    const MaskSlot sl = mask_slot(table, nt, u);
    const int64_t j = reinterpret_cast<const int64_t*>(sl.idx)[u - sl.first];
    if (j < 0 || j >= sl.n) continue;
    const uint64_t i = (uint64_t)(sl.offset + j);
    T* p = reinterpret_cast<T*>(sl.ptr);
    if (!sum) {
      p[j] = static_cast<T>(static_cast<float>(p[j]) + scales[0] * z_at(kind, (uint64_t)seeds[0], i));
    } else if (nseeds > 0) {
      float acc = 0.0f;
      for (int64_t k = 0; k < nseeds; ++k) acc = acc + scales[k] * z_at(kind, (uint64_t)seeds[k], i);
      p[j] = static_cast<T>(static_cast<float>(p[j]) + acc);
    }
    if (sl.copy) reinterpret_cast<C*>(sl.copy)[j] = static_cast<C>(static_cast<float>(p[j]));
  }
}

__global__ void noise_masked_kernel(float* out, const int64_t* idx, int64_t m, uint64_t seed, int64_t offset, int64_t kind) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < m; k += (int64_t)blockDim.x * gridDim.x)
    out[k] = z_at(kind, seed, (uint64_t)(offset + idx[k]));
}

__global__ void noise_fill_kernel(float* out, int64_t n, uint64_t seed, int64_t offset, int kind) {
  int64_t first = offset / 4, last = (offset + n - 1) / 4;
  for (int64_t g = first + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g <= last;
       g += (int64_t)blockDim.x * gridDim.x) {
    float z[4];
    if (kind == kGaussian) {
      gaussian4(seed, (uint64_t)g, z);
    } else {
      for (int l = 0; l < 4; ++l) z[l] = rademacher_z(seed, (uint64_t)(4 * g + l));
    }
    for (int l = 0; l < 4; ++l) {
      int64_t j = 4 * g + l - offset;
      if (j >= 0 && j < n) out[j] = z[l];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// host side: the slot table of a launch, uploads, launches
// ------------------------------------------------------------------------------------------------
struct Launch {
  std::vector<Slot> slots;
  int64_t total = 0;   // work units
};

// unit: elements per work unit in the global index space (4: a counter; a rademacher tile)
Launch plan(at::TensorList ps, at::IntArrayRef offsets, int64_t unit) {
  Launch l;
  for (size_t i = 0; i < ps.size(); ++i) {
    int64_t n = ps[i].numel(), off = offsets[i];
    if (n == 0) continue;
    l.slots.push_back(Slot{reinterpret_cast<int64_t>(ps[i].data_ptr()), n, off, l.total});
    l.total += (off + n - 1) / unit - off / unit + 1;
  }
  return l;
}

// bytes -> a device tensor, copied from pinned memory on the current stream without blocking the host (the
// caching host allocator keeps the pinned buffer until the copy is done)
at::Tensor upload(const void* data, size_t bytes, at::Device device) {
  at::Tensor host = at::empty({(int64_t)bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), data, bytes);
  return host.to(device, /*non_blocking=*/true);
}

unsigned blocks_for(int64_t threads) {
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, 65535));
}

#define FEDFULL_CUDA_DISPATCH(TYPE, NAME, ...)                                    \
  switch (TYPE) {                                                                 \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }            \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }  \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }          \
    default: TORCH_CHECK(false, "fedfull.", NAME, ": unsupported dtype ", TYPE);  \
  }

void perturb_many(const char* op, at::TensorList ps, int64_t seed, at::IntArrayRef offsets, double scale,
                  int64_t kind) {
  check_kind(op, kind);
  check_many(op, ps, offsets);
  if (ps.empty()) return;
  const int64_t unit = kind == kGaussian ? 4 : kRadPerturbTile;
  Launch l = plan(ps, offsets, unit);
  if (l.total == 0) return;
  const c10::cuda::CUDAGuard guard(ps[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor table;
  if (l.slots.size() > 1) table = upload(l.slots.data(), l.slots.size() * sizeof(Slot), ps[0].device());
  const Slot* t = l.slots.size() > 1 ? reinterpret_cast<const Slot*>(table.data_ptr()) : nullptr;
  const int nt = (int)l.slots.size();
  const float s = static_cast<float>(scale);
  FEDFULL_CUDA_DISPATCH(ps[0].scalar_type(), op, [&] {
    if (kind == kGaussian) {
      perturb_gaussian_kernel<scalar_t><<<blocks_for(l.total), kThreads, 0, stream>>>(t, nt, l.slots[0], l.total,
                                                                                       (uint64_t)seed, s);
    } else {
      perturb_rademacher_kernel<scalar_t><<<blocks_for(32 * l.total), kThreads, 0, stream>>>(
          t, nt, l.slots[0], l.total, (uint64_t)seed, s);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void apply_seeds_many(const char* op, at::TensorList ps, at::IntArrayRef seeds, at::ArrayRef<double> scales,
                      at::IntArrayRef offsets, int64_t kind) {
  check_kind(op, kind);
  check_seeds(op, seeds, scales);
  check_many(op, ps, offsets);
  if (ps.empty() || seeds.empty()) return;
  const int64_t unit = kind == kGaussian ? 4 : kRadApplyTile;
  Launch l = plan(ps, offsets, unit);
  if (l.total == 0) return;
  const at::Device device = ps[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = at::cuda::getCurrentCUDAStream();
  // one upload per call: the seeds (int64), the slot table when there is more than one tensor, then the seeds'
  // float32 scales -- in that order, so that every part stays aligned
  const size_t ns = seeds.size(), table_bytes = l.slots.size() > 1 ? l.slots.size() * sizeof(Slot) : 0;
  std::vector<uint8_t> blob(ns * 8 + table_bytes + ns * 4);
  std::memcpy(blob.data(), seeds.data(), ns * 8);
  if (table_bytes) std::memcpy(blob.data() + ns * 8, l.slots.data(), table_bytes);
  for (size_t k = 0; k < ns; ++k) {
    float sc = static_cast<float>(scales[k]);
    std::memcpy(blob.data() + ns * 8 + table_bytes + 4 * k, &sc, 4);
  }
  at::Tensor dev = upload(blob.data(), blob.size(), device);
  const uint8_t* base = dev.data_ptr<uint8_t>();
  const int64_t* d_seeds = reinterpret_cast<const int64_t*>(base);
  const Slot* t = table_bytes ? reinterpret_cast<const Slot*>(base + ns * 8) : nullptr;
  const float* d_scales = reinterpret_cast<const float*>(base + ns * 8 + table_bytes);
  const int nt = (int)l.slots.size();
  FEDFULL_CUDA_DISPATCH(ps[0].scalar_type(), op, [&] {
    if (kind == kGaussian) {
      apply_gaussian_kernel<scalar_t><<<blocks_for(l.total), kThreads, 0, stream>>>(t, nt, l.slots[0], l.total,
                                                                                     d_seeds, d_scales, (int64_t)ns);
    } else {
      apply_rademacher_kernel<scalar_t><<<blocks_for(32 * l.total), kThreads, 0, stream>>>(
          t, nt, l.slots[0], l.total, d_seeds, d_scales, (int64_t)ns);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_cuda(const at::Tensor& p, int64_t seed, int64_t offset, double scale, int64_t kind) {
  check_param("perturb_", p); check_offset("perturb_", offset);
  perturb_many("perturb_", {p}, seed, {offset}, scale, kind);
}

void apply_seeds_cuda(const at::Tensor& p, at::IntArrayRef seeds, at::ArrayRef<double> scales, int64_t offset,
                      int64_t kind) {
  check_param("apply_seeds_", p); check_offset("apply_seeds_", offset);
  apply_seeds_many("apply_seeds_", {p}, seeds, scales, {offset}, kind);
}

void perturb_multi_cuda(at::TensorList ps, int64_t seed, at::IntArrayRef offsets, double scale, int64_t kind) {
  perturb_many("perturb_multi_", ps, seed, offsets, scale, kind);
}

void apply_seeds_multi_cuda(at::TensorList ps, at::IntArrayRef seeds, at::ArrayRef<double> scales,
                            at::IntArrayRef offsets, int64_t kind) {
  apply_seeds_many("apply_seeds_multi_", ps, seeds, scales, offsets, kind);
}

#define FEDFULL_CUDA_COPY_DISPATCH(TYPE, NAME, ...)                                 \
  switch (TYPE) {                                                                  \
    case at::kBFloat16: { using copy_t = at::BFloat16; __VA_ARGS__(); break; }     \
    case at::kHalf: { using copy_t = at::Half; __VA_ARGS__(); break; }             \
    default: TORCH_CHECK(false, "fedfull.", NAME, ": copies must be bfloat16 or float16, got ", TYPE); \
  }

void masked_many(const char* op, at::TensorList ps, at::TensorList copies, at::TensorList masks,
                 at::IntArrayRef seeds, at::ArrayRef<double> scales, at::IntArrayRef offsets, int64_t kind, bool sum) {
  check_kind(op, kind); check_seeds(op, seeds, scales); check_many(op, ps, offsets); check_masks(op, ps, masks, copies);
  std::vector<MaskSlot> slots;
  int64_t total = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    if (masks[i].numel() == 0) continue;
    slots.push_back(MaskSlot{reinterpret_cast<int64_t>(ps[i].data_ptr()),
                             copies.empty() ? 0 : reinterpret_cast<int64_t>(copies[i].data_ptr()),
                             reinterpret_cast<int64_t>(masks[i].data_ptr()), ps[i].numel(), offsets[i], total});
    total += masks[i].numel();
  }
  if (total == 0) return;
  const at::Device device = ps[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = at::cuda::getCurrentCUDAStream();
  // one upload: the seeds (int64), the slot table, the scales (float32), in that order so every part stays aligned
  const size_t ns = seeds.size(), table_bytes = slots.size() * sizeof(MaskSlot);
  std::vector<uint8_t> blob(ns * 8 + table_bytes + ns * 4 + 8);
  if (ns) std::memcpy(blob.data(), seeds.data(), ns * 8);
  std::memcpy(blob.data() + ns * 8, slots.data(), table_bytes);
  for (size_t k = 0; k < ns; ++k) {
    float sc = static_cast<float>(scales[k]);
    std::memcpy(blob.data() + ns * 8 + table_bytes + 4 * k, &sc, 4);
  }
  at::Tensor dev = upload(blob.data(), blob.size(), device);
  const uint8_t* base = dev.data_ptr<uint8_t>();
  const int64_t* d_seeds = reinterpret_cast<const int64_t*>(base);
  const MaskSlot* t = reinterpret_cast<const MaskSlot*>(base + ns * 8);
  const float* d_scales = reinterpret_cast<const float*>(base + ns * 8 + table_bytes);
  const int nt = (int)slots.size();
  if (copies.empty()) {
    FEDFULL_CUDA_DISPATCH(ps[0].scalar_type(), op, [&] {
      masked_kernel<scalar_t, float><<<blocks_for(total), kThreads, 0, stream>>>(t, nt, total, d_seeds, d_scales,
                                                                                 (int64_t)ns, kind, sum);
    });
  } else {
    FEDFULL_CUDA_COPY_DISPATCH(copies[0].scalar_type(), op, [&] {
      masked_kernel<float, copy_t><<<blocks_for(total), kThreads, 0, stream>>>(t, nt, total, d_seeds, d_scales,
                                                                               (int64_t)ns, kind, sum);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_masked_multi_cuda(at::TensorList ps, at::TensorList copies, at::TensorList masks, int64_t seed,
                               at::IntArrayRef offsets, double scale, int64_t kind) {
  masked_many("perturb_masked_multi_", ps, copies, masks, {seed}, {scale}, offsets, kind, false);
}

void apply_seeds_masked_multi_cuda(at::TensorList ps, at::TensorList copies, at::TensorList masks,
                                   at::IntArrayRef seeds, at::ArrayRef<double> scales, at::IntArrayRef offsets,
                                   int64_t kind) {
  masked_many("apply_seeds_masked_multi_", ps, copies, masks, seeds, scales, offsets, kind, true);
}

void noise_masked_fill_cuda(const at::Tensor& out, const at::Tensor& idx, int64_t seed, int64_t offset, int64_t kind) {
  const char* op = "noise_masked_fill_";
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 1, "fedfull.", op,
              ": out must be a contiguous 1-D float32 tensor");
  check_masks(op, {out}, {idx}, {}); check_offset(op, offset); check_kind(op, kind);
  TORCH_CHECK(idx.numel() == out.numel(), "fedfull.", op, ": out must have one element per index");
  if (idx.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  noise_masked_kernel<<<blocks_for(idx.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), idx.data_ptr<int64_t>(), idx.numel(), (uint64_t)seed, offset, kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void noise_fill_cuda(const at::Tensor& out, int64_t seed, int64_t offset, int64_t kind) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fedfull.noise_fill_: out must be float32, got ", out.scalar_type());
  check_param("noise_fill_", out); check_offset("noise_fill_", offset); check_kind("noise_fill_", kind);
  int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  noise_fill_kernel<<<blocks_for((offset + n - 1) / 4 - offset / 4 + 1), kThreads, 0,
                      at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<float>(), n, (uint64_t)seed, offset, (int)kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fedfull

TORCH_LIBRARY_IMPL(fedfull, CUDA, m) {
  m.impl("noise_fill_", &fedfull::noise_fill_cuda);
  m.impl("perturb_", &fedfull::perturb_cuda);
  m.impl("apply_seeds_", &fedfull::apply_seeds_cuda);
  m.impl("perturb_multi_", &fedfull::perturb_multi_cuda);
  m.impl("apply_seeds_multi_", &fedfull::apply_seeds_multi_cuda);
  m.impl("perturb_masked_multi_", &fedfull::perturb_masked_multi_cuda);
  m.impl("apply_seeds_masked_multi_", &fedfull::apply_seeds_masked_multi_cuda);
  m.impl("noise_masked_fill_", &fedfull::noise_masked_fill_cuda);
}
