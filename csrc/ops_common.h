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

// the *_multi_ ops: one offset per tensor; all tensors on one device, in one dtype
inline void check_many(const char* op, at::TensorList ps, at::IntArrayRef offsets) {
  TORCH_CHECK(ps.size() == offsets.size(), "fedfull.", op, ": got ", ps.size(), " tensors but ", offsets.size(),
              " offsets; they must have the same length");
  for (size_t i = 0; i < ps.size(); ++i) {
    check_param(op, ps[i]);
    check_offset(op, offsets[i]);
    TORCH_CHECK(ps[i].scalar_type() == ps[0].scalar_type() && ps[i].device() == ps[0].device(), "fedfull.", op,
                ": all tensors must share one dtype and device (tensor 0: ", ps[0].scalar_type(), " on ",
                ps[0].device(), ", tensor ", i, ": ", ps[i].scalar_type(), " on ", ps[i].device(), ")");
  }
}

}  // namespace fedfull
