// CUDA kernels of the fedfull ops, registered under the CUDA dispatch key. z comes from the very same
// philox_gaussian.h as the CPU kernels, compiled with --fmad=false so nvcc fuses no multiply-add: the
// bits equal the CPU's and the Python reference's.
//
// One thread handles one group of 4 global indices (one Philox counter for gaussian z), grid-stride.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "ops_common.h"
#include "philox_gaussian.h"

namespace fedfull {
namespace {

// z for global indices 4g .. 4g + 3
__device__ __forceinline__ void z4(uint64_t seed, uint64_t g, int kind, float z[4]) {
  if (kind == kGaussian) {
    gaussian4(seed, g, z);
  } else {
    uint64_t i = 4 * g;   // the 4 indices share one counter (i / 128) and one word ((i / 32) % 4)
    Philox4 r = philox_for_counter(seed, i >> 7);
    uint32_t w = r.x[(i >> 5) & 3] >> (i & 31);
    for (int l = 0; l < 4; ++l) z[l] = ((w >> l) & 1u) ? -1.0f : 1.0f;
  }
}

template <class T>
__global__ void perturb_kernel(T* p, int64_t n, uint64_t seed, int64_t offset, float s, int kind) {
  int64_t first = offset / 4, last = (offset + n - 1) / 4;
  for (int64_t g = first + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g <= last;
       g += (int64_t)blockDim.x * gridDim.x) {
    float z[4];
    z4(seed, (uint64_t)g, kind, z);
    for (int l = 0; l < 4; ++l) {
      int64_t j = 4 * g + l - offset;
      if (j >= 0 && j < n) p[j] = static_cast<T>(static_cast<float>(p[j]) + s * z[l]);
    }
  }
}

template <class T>
__global__ void apply_seeds_kernel(T* p, int64_t n, const int64_t* seeds, const float* scales, int64_t nseeds,
                                   int64_t offset, int kind) {
  int64_t first = offset / 4, last = (offset + n - 1) / 4;
  for (int64_t g = first + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g <= last;
       g += (int64_t)blockDim.x * gridDim.x) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t k = 0; k < nseeds; ++k) {   // fp32 sum in seed order
      float z[4];
      z4((uint64_t)seeds[k], (uint64_t)g, kind, z);
      for (int l = 0; l < 4; ++l) acc[l] = acc[l] + scales[k] * z[l];
    }
    for (int l = 0; l < 4; ++l) {
      int64_t j = 4 * g + l - offset;
      if (j >= 0 && j < n) p[j] = static_cast<T>(static_cast<float>(p[j]) + acc[l]);
    }
  }
}

__global__ void noise_fill_kernel(float* out, int64_t n, uint64_t seed, int64_t offset, int kind) {
  int64_t first = offset / 4, last = (offset + n - 1) / 4;
  for (int64_t g = first + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g <= last;
       g += (int64_t)blockDim.x * gridDim.x) {
    float z[4];
    z4(seed, (uint64_t)g, kind, z);
    for (int l = 0; l < 4; ++l) {
      int64_t j = 4 * g + l - offset;
      if (j >= 0 && j < n) out[j] = z[l];
    }
  }
}

constexpr int kThreads = 256;
inline unsigned grid_for(int64_t offset, int64_t n) {
  int64_t groups = (offset + n - 1) / 4 - offset / 4 + 1;
  return (unsigned)std::min<int64_t>((groups + kThreads - 1) / kThreads, 65536);
}

#define FEDFULL_CUDA_DISPATCH(TYPE, NAME, ...)                                    \
  switch (TYPE) {                                                                 \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }            \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }  \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }          \
    default: TORCH_CHECK(false, "fedfull.", NAME, ": unsupported dtype ", TYPE);  \
  }

void perturb_cuda(const at::Tensor& p, int64_t seed, int64_t offset, double scale, int64_t kind) {
  check_param("perturb_", p); check_offset("perturb_", offset); check_kind("perturb_", kind);
  int64_t n = p.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(p.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  FEDFULL_CUDA_DISPATCH(p.scalar_type(), "perturb_", [&] {
    perturb_kernel<scalar_t><<<grid_for(offset, n), kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), n, (uint64_t)seed, offset, static_cast<float>(scale), (int)kind);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void apply_seeds_cuda(const at::Tensor& p, at::IntArrayRef seeds, at::ArrayRef<double> scales, int64_t offset,
                      int64_t kind) {
  check_param("apply_seeds_", p); check_seeds("apply_seeds_", seeds, scales);
  check_offset("apply_seeds_", offset); check_kind("apply_seeds_", kind);
  int64_t n = p.numel();
  if (n == 0 || seeds.empty()) return;
  const c10::cuda::CUDAGuard guard(p.device());
  std::vector<float> sc(scales.size());
  for (size_t i = 0; i < sc.size(); ++i) sc[i] = static_cast<float>(scales[i]);
  at::Tensor d_seeds = at::tensor(seeds.vec(), at::kLong).to(p.device());
  at::Tensor d_scales = at::tensor(sc, at::kFloat).to(p.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  FEDFULL_CUDA_DISPATCH(p.scalar_type(), "apply_seeds_", [&] {
    apply_seeds_kernel<scalar_t><<<grid_for(offset, n), kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), n, d_seeds.data_ptr<int64_t>(), d_scales.data_ptr<float>(), (int64_t)sc.size(),
        offset, (int)kind);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void noise_fill_cuda(const at::Tensor& out, int64_t seed, int64_t offset, int64_t kind) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fedfull.noise_fill_: out must be float32, got ", out.scalar_type());
  check_param("noise_fill_", out); check_offset("noise_fill_", offset); check_kind("noise_fill_", kind);
  int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  noise_fill_kernel<<<grid_for(offset, n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), n, (uint64_t)seed, offset, (int)kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fedfull

TORCH_LIBRARY_IMPL(fedfull, CUDA, m) {
  m.impl("noise_fill_", &fedfull::noise_fill_cuda);
  m.impl("perturb_", &fedfull::perturb_cuda);
  m.impl("apply_seeds_", &fedfull::apply_seeds_cuda);
}
