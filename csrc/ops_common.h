// Argument checks shared by the CPU, CUDA and Meta kernels, so every device fails with the same message.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace fedfull {

inline void check_kind(const char* op, int64_t kind) {
  TORCH_CHECK(kind == 0 || kind == 1, "fedfull.", op, ": unknown kind ", kind, " (0 = gaussian, 1 = rademacher)");
}

inline void check_offset(const char* op, int64_t offset) {
  TORCH_CHECK(offset >= 0, "fedfull.", op, ": offset must be >= 0, got ", offset);
}

inline void check_param(const char* op, const at::Tensor& p) {
  auto t = p.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "fedfull.", op,
              ": tensor must be float32, bfloat16 or float16, got ", t);
  TORCH_CHECK(p.is_contiguous(), "fedfull.", op, ": tensor must be contiguous (got strides ", p.strides(),
              "); call .contiguous() or pass the parameter itself");
}

inline void check_seeds(const char* op, at::IntArrayRef seeds, at::ArrayRef<double> scales) {
  TORCH_CHECK(seeds.size() == scales.size(), "fedfull.", op, ": got ", seeds.size(), " seeds but ", scales.size(),
              " scales; they must have the same length");
}

}  // namespace fedfull
