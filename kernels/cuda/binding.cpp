// Thin PyTorch binding: registers `videobert_cuda::*` ops for CUDA tensors over the framework-free launchers
// in videobert_kernels.h. Outputs are allocated by the Python caller and passed in (mutated); the current
// stream comes from Python as an integer, so this file needs no PyTorch CUDA headers and builds against a
// CPU-only PyTorch too.
#include <torch/library.h>

#include <optional>

#include "videobert_kernels.h"

namespace {

int vb_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return VB_FLOAT32;
    case at::kHalf: return VB_FLOAT16;
    case at::kBFloat16: return VB_BFLOAT16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

// Every tensor the kernels touch: a contiguous CUDA tensor on `device` with `numel` elements.
void check(const at::Tensor& t, const char* name, const at::Device& device, int64_t numel) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(), ", got ",
              t.scalar_type());
}

const void* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void check_status(int code, const char* what) {
  TORCH_CHECK(code == 0, "videobert_cuda::", what, " failed: ", vb_error_string(code));
}

void check_hidden(int64_t n) {
  const int limit = vb_layer_norm_max_hidden(1);
  TORCH_CHECK(n >= 1 && n <= limit, "hidden size must be in [1, ", limit, "], got ", n);
}

void add_layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& s,
                        const at::Tensor& mean, const at::Tensor& rstd, double eps, int64_t seed, int64_t offset,
                        int64_t threshold, double drop_scale, bool has_dropout, int64_t stream) {
  TORCH_CHECK(x.dim() >= 1 && x.is_cuda(), "x must be a CUDA tensor with at least one dimension");
  const int64_t n = x.size(-1), rows = n > 0 ? x.numel() / n : 0;
  check_hidden(n);
  const at::Device device = x.device();
  check(x, "x", device, rows * n);
  if (residual.has_value()) {
    check(*residual, "residual", device, rows * n);
    check_same_dtype(*residual, "residual", x);
  }
  check(weight, "weight", device, n);
  if (bias.has_value()) {
    check(*bias, "bias", device, n);
    check_same_dtype(*bias, "bias", weight);
  }
  for (const auto& [t, name] : {std::pair{&out, "out"}, std::pair{&s, "s"}}) {
    check(*t, name, device, rows * n);
    check_same_dtype(*t, name, x);
  }
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    check(*t, name, device, rows);
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32");
  }
  check_status(vb_add_layer_norm_fwd(x.data_ptr(), ptr(residual), weight.data_ptr(), ptr(bias), out.data_ptr(),
                                     s.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, n,
                                     vb_dtype(x, "x"), vb_dtype(weight, "weight"), static_cast<float>(eps),
                                     static_cast<uint64_t>(seed), static_cast<uint32_t>(offset),
                                     static_cast<int32_t>(threshold), static_cast<float>(drop_scale), has_dropout,
                                     device.index(), reinterpret_cast<void*>(stream)),
               "add_layer_norm_fwd");
}

void add_layer_norm_bwd(const at::Tensor& dout, const std::optional<at::Tensor>& ds, const at::Tensor& s,
                        const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& dx,
                        const std::optional<at::Tensor>& dresidual, const at::Tensor& dweight_partial,
                        const std::optional<at::Tensor>& dbias_partial, const at::Tensor& dweight,
                        const std::optional<at::Tensor>& dbias, int64_t seed, int64_t offset, int64_t threshold,
                        double drop_scale, bool has_dropout, int64_t stream) {
  TORCH_CHECK(s.dim() >= 1 && s.is_cuda(), "s must be a CUDA tensor with at least one dimension");
  const int64_t n = s.size(-1), rows = n > 0 ? s.numel() / n : 0;
  check_hidden(n);
  const at::Device device = s.device();
  const int64_t partial_rows = dweight_partial.dim() == 2 ? dweight_partial.size(0) : 0;
  TORCH_CHECK(partial_rows >= 1, "dweight_partial must be a (blocks >= 1, n) float32 tensor");
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&s, "s"}, std::pair{&dx, "dx"}}) {
    check(*t, name, device, rows * n);
    check_same_dtype(*t, name, s);
  }
  for (const auto& [t, name] : {std::pair{&ds, "ds"}, std::pair{&dresidual, "dresidual"}}) {
    if (t->has_value()) {
      check(**t, name, device, rows * n);
      check_same_dtype(**t, name, s);
    }
  }
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    check(*t, name, device, rows);
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32");
  }
  check(weight, "weight", device, n);
  check(dweight, "dweight", device, n);
  check_same_dtype(dweight, "dweight", weight);
  check(dweight_partial, "dweight_partial", device, partial_rows * n);
  TORCH_CHECK(dweight_partial.scalar_type() == at::kFloat, "dweight_partial must be float32");
  TORCH_CHECK(dbias_partial.has_value() == dbias.has_value(), "dbias and dbias_partial must be given together");
  if (dbias.has_value()) {
    check(*dbias, "dbias", device, n);
    check_same_dtype(*dbias, "dbias", weight);
    check(*dbias_partial, "dbias_partial", device, partial_rows * n);
    TORCH_CHECK(dbias_partial->scalar_type() == at::kFloat, "dbias_partial must be float32");
  }
  float* db_partial = dbias_partial.has_value() ? dbias_partial->data_ptr<float>() : nullptr;
  void* db = dbias.has_value() ? dbias->data_ptr() : nullptr;
  void* dres = dresidual.has_value() ? dresidual->data_ptr() : nullptr;
  check_status(vb_add_layer_norm_bwd(dout.data_ptr(), ptr(ds), s.data_ptr(), mean.data_ptr<float>(),
                                     rstd.data_ptr<float>(), weight.data_ptr(), dx.data_ptr(), dres,
                                     dweight_partial.data_ptr<float>(), db_partial, dweight.data_ptr(), db, rows, n,
                                     partial_rows, vb_dtype(s, "s"), vb_dtype(weight, "weight"),
                                     static_cast<uint64_t>(seed), static_cast<uint32_t>(offset),
                                     static_cast<int32_t>(threshold), static_cast<float>(drop_scale), has_dropout,
                                     device.index(), reinterpret_cast<void*>(stream)),
               "add_layer_norm_bwd");
}

// Logits: a 2-D CUDA tensor with unit column stride; labels: int64, one per row, on the same device.
void check_logits(const at::Tensor& logits, const at::Tensor& labels, const char* name) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, name, " must be a 2-D CUDA tensor");
  TORCH_CHECK(logits.size(1) >= 1 && (logits.size(0) <= 1 || logits.stride(1) == 1), name,
              " must have unit stride along its last dimension");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64");
  check(labels, "labels", logits.device(), logits.size(0));
}

void check_row_stat(const at::Tensor& t, const char* name, const at::Tensor& logits, at::ScalarType dtype) {
  check(t, name, logits.device(), logits.size(0));
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

void softmax_cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& loss,
                               const at::Tensor& lse, const at::Tensor& correct, int64_t ignore_index,
                               double label_smoothing, int64_t stream) {
  check_logits(logits, labels, "logits");
  check_row_stat(loss, "loss", logits, at::kFloat);
  check_row_stat(lse, "lse", logits, at::kFloat);
  check_row_stat(correct, "correct", logits, at::kBool);
  check_status(vb_softmax_cross_entropy_fwd(logits.data_ptr(), labels.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                            lse.data_ptr<float>(), static_cast<uint8_t*>(correct.data_ptr()),
                                            logits.size(0), logits.size(1), logits.stride(0),
                                            vb_dtype(logits, "logits"), ignore_index,
                                            static_cast<float>(label_smoothing), logits.device().index(),
                                            reinterpret_cast<void*>(stream)),
               "softmax_cross_entropy_fwd");
}

void softmax_cross_entropy_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                               const at::Tensor& dloss, const std::optional<at::Tensor>& dlse, const at::Tensor& grad,
                               int64_t ignore_index, double label_smoothing, int64_t stream) {
  check_logits(logits, labels, "logits");
  check_logits(grad, labels, "grad");
  TORCH_CHECK(grad.sizes() == logits.sizes(), "grad must have the shape of logits");
  check_same_dtype(grad, "grad", logits);
  check_row_stat(lse, "lse", logits, at::kFloat);
  check_row_stat(dloss, "dloss", logits, at::kFloat);
  if (dlse.has_value()) check_row_stat(*dlse, "dlse", logits, at::kFloat);
  const float* dlse_ptr = dlse.has_value() ? dlse->data_ptr<float>() : nullptr;
  check_status(vb_softmax_cross_entropy_bwd(logits.data_ptr(), labels.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                            dloss.data_ptr<float>(), dlse_ptr, grad.data_ptr(), logits.size(0),
                                            logits.size(1), logits.stride(0), grad.stride(0),
                                            vb_dtype(logits, "logits"), ignore_index,
                                            static_cast<float>(label_smoothing), logits.device().index(),
                                            reinterpret_cast<void*>(stream)),
               "softmax_cross_entropy_bwd");
}

int64_t layer_norm_max_hidden(bool vectorized) { return vb_layer_norm_max_hidden(vectorized ? 1 : 0); }

int64_t add_layer_norm_bwd_blocks(const at::Tensor& s, const at::Tensor& weight) {
  TORCH_CHECK(s.dim() >= 1 && s.is_cuda(), "s must be a CUDA tensor with at least one dimension");
  const int64_t n = s.size(-1), rows = n > 0 ? s.numel() / n : 0;
  check_hidden(n);
  int64_t blocks = 0;
  check_status(vb_add_layer_norm_bwd_blocks(rows, n, vb_dtype(s, "s"), vb_dtype(weight, "weight"),
                                            s.device().index(), &blocks),
               "add_layer_norm_bwd_blocks");
  return blocks;
}

}  // namespace

TORCH_LIBRARY(videobert_cuda, m) {
  m.def("add_layer_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, Tensor(a!) out, "
        "Tensor(b!) s, Tensor(c!) mean, Tensor(d!) rstd, float eps, int seed, int offset, int threshold, "
        "float drop_scale, bool has_dropout, int stream) -> ()");
  m.def("add_layer_norm_bwd(Tensor dout, Tensor? ds, Tensor s, Tensor mean, Tensor rstd, Tensor weight, "
        "Tensor(a!) dx, Tensor(b!)? dresidual, Tensor(c!) dweight_partial, Tensor(d!)? dbias_partial, "
        "Tensor(e!) dweight, Tensor(f!)? dbias, int seed, int offset, int threshold, float drop_scale, "
        "bool has_dropout, int stream) -> ()");
  m.def("layer_norm_max_hidden(bool vectorized) -> int", &layer_norm_max_hidden);
  m.def("add_layer_norm_bwd_blocks(Tensor s, Tensor weight) -> int", &add_layer_norm_bwd_blocks);
  m.def("softmax_cross_entropy_fwd(Tensor logits, Tensor labels, Tensor(a!) loss, Tensor(b!) lse, "
        "Tensor(c!) correct, int ignore_index, float label_smoothing, int stream) -> ()");
  m.def("softmax_cross_entropy_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor dloss, Tensor? dlse, "
        "Tensor(a!) grad, int ignore_index, float label_smoothing, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(videobert_cuda, CUDA, m) {
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd);
  m.impl("softmax_cross_entropy_fwd", &softmax_cross_entropy_fwd);
  m.impl("softmax_cross_entropy_bwd", &softmax_cross_entropy_bwd);
}
