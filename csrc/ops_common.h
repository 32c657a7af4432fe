// Argument checks shared by the CPU, CUDA and Meta kernels, so every device fails with the same message.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <utility>
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

// The multi ops update their tensors in turn on CPU and all at once on CUDA: tensors that share memory (the same
// tensor twice, overlapping views) would give device-dependent results, so every device refuses them.
inline void check_disjoint(const char* op, std::vector<at::Tensor> ts) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const auto& t : ts) {
    if (t.numel() == 0 || t.is_meta()) continue;
    auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.emplace_back(start, start + t.numel() * t.element_size());
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    TORCH_CHECK(spans[i].first >= spans[i - 1].second, "fedfull.", op, ": two of the tensors share memory (the same "
                "tensor twice, or overlapping views); each element may be updated once per call");
}

// the *_copy_multi_ ops: float32 weights, and one bfloat16/float16 copy of each, same size and device
inline void check_copies(const char* op, at::TensorList ps, at::TensorList copies) {
  TORCH_CHECK(ps.size() == copies.size(), "fedfull.", op, ": got ", ps.size(), " tensors but ", copies.size(),
              " copies; they must have the same length");
  for (size_t i = 0; i < ps.size(); ++i) {
    TORCH_CHECK(ps[i].scalar_type() == at::kFloat, "fedfull.", op, ": the weights must be float32, got ",
                ps[i].scalar_type());
    check_param(op, copies[i]);
    TORCH_CHECK(copies[i].scalar_type() != at::kFloat && copies[i].scalar_type() == copies[0].scalar_type(), "fedfull.",
                op, ": the copies must share one dtype, bfloat16 or float16 (copy ", i, ": ", copies[i].scalar_type(), ")");
    TORCH_CHECK(copies[i].numel() == ps[i].numel() && copies[i].device() == ps[i].device(), "fedfull.", op, ": copy ",
                i, " must have the size and device of its tensor (", ps[i].numel(), " on ", ps[i].device(), "), got ",
                copies[i].numel(), " on ", copies[i].device());
  }
  std::vector<at::Tensor> all(ps.begin(), ps.end());
  all.insert(all.end(), copies.begin(), copies.end());
  check_disjoint(op, all);
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
  check_disjoint(op, std::vector<at::Tensor>(ps.begin(), ps.end()));
}

// the *_masked_multi_ ops: one mask per tensor, a 1-D int64 tensor of its local indices on the tensor's device, and
// optional copies (an empty list, or one bfloat16/float16 copy per float32 tensor). The mask's values (in [0, numel),
// strictly increasing) are checked by the CPU kernels as they run; seedops checks them once when a mask is made.
inline void check_masks(const char* op, at::TensorList ps, at::TensorList masks, at::TensorList copies) {
  TORCH_CHECK(ps.size() == masks.size(), "fedfull.", op, ": got ", ps.size(), " tensors but ", masks.size(),
              " masks; they must have the same length");
  for (size_t i = 0; i < ps.size(); ++i)
    TORCH_CHECK(masks[i].scalar_type() == at::kLong && masks[i].dim() == 1 && masks[i].is_contiguous() &&
                masks[i].device() == ps[i].device(), "fedfull.", op, ": mask ", i, " must be a contiguous 1-D int64 "
                "tensor of indices on its tensor's device (", ps[i].device(), "), got ", masks[i].scalar_type(),
                " of shape ", masks[i].sizes(), " on ", masks[i].device());
  if (!copies.empty()) check_copies(op, ps, copies);
}

}  // namespace fedfull
