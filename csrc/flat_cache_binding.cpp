// Torch binding of csrc/flat_cache.cu. adakv/kernels.py checks inputs with friendly messages first;
// these checks repeat the ones the kernels rely on, so a direct call cannot corrupt memory silently.

#include <torch/extension.h>

void launch_copy_rows(const torch::Tensor& src_keys, const torch::Tensor& src_values, torch::Tensor& dst_keys,
                      torch::Tensor& dst_values, const torch::Tensor& src_index, const torch::Tensor& dst_index);
void launch_append_rows(torch::Tensor& dst_keys, torch::Tensor& dst_values, const torch::Tensor& new_keys,
                        const torch::Tensor& new_values, const torch::Tensor& write_start);

namespace {

void check_rows(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
  TORCH_CHECK(t.scalar_type() == torch::kFloat16 || t.scalar_type() == torch::kBFloat16 ||
                  t.scalar_type() == torch::kFloat32,
              name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  TORCH_CHECK(t.size(-1) == like.size(-1), name, " must have head_dim ", like.size(-1));
  TORCH_CHECK((t.size(-1) * t.element_size()) % 16 == 0, name, ": head_dim * element size must be a multiple of 16");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

void check_index(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == torch::kInt64 && t.dim() == 1 && t.is_contiguous(),
              name, " must be a contiguous 1-D int64 tensor");
}

void copy_rows(torch::Tensor src_keys, torch::Tensor src_values, torch::Tensor dst_keys, torch::Tensor dst_values,
               torch::Tensor src_index, torch::Tensor dst_index) {
  check_rows(dst_keys, dst_keys, "dst_keys");
  check_rows(dst_values, dst_keys, "dst_values");
  check_rows(src_keys, dst_keys, "src_keys");
  check_rows(src_values, dst_keys, "src_values");
  TORCH_CHECK(src_keys.dim() == 2 && dst_keys.dim() == 2, "copy_rows needs 2-D (rows, head_dim) buffers");
  TORCH_CHECK(src_keys.sizes() == src_values.sizes() && dst_keys.sizes() == dst_values.sizes(),
              "keys and values must have the same shape");
  check_index(src_index, dst_keys, "src_index");
  check_index(dst_index, dst_keys, "dst_index");
  TORCH_CHECK(src_index.size(0) == dst_index.size(0), "src_index and dst_index must have the same length");
  launch_copy_rows(src_keys, src_values, dst_keys, dst_values, src_index, dst_index);
}

void append_rows(torch::Tensor dst_keys, torch::Tensor dst_values, torch::Tensor new_keys, torch::Tensor new_values,
                 torch::Tensor write_start) {
  check_rows(dst_keys, dst_keys, "dst_keys");
  check_rows(dst_values, dst_keys, "dst_values");
  check_rows(new_keys, dst_keys, "new_keys");
  check_rows(new_values, dst_keys, "new_values");
  TORCH_CHECK(dst_keys.dim() == 2 && dst_keys.sizes() == dst_values.sizes(), "dst_* must be (rows, head_dim)");
  TORCH_CHECK(new_keys.dim() == 3 && new_keys.sizes() == new_values.sizes(),
              "new_* must be (sequences, new_tokens, head_dim)");
  check_index(write_start, dst_keys, "write_start");
  TORCH_CHECK(write_start.size(0) == new_keys.size(0), "write_start must have one entry per sequence");
  launch_append_rows(dst_keys, dst_values, new_keys, new_values, write_start);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adakv flattened head-wise cache kernels";
  m.def("copy_rows", &copy_rows, "dst[dst_index[i]] = src[src_index[i]] for K and V");
  m.def("append_rows", &append_rows, "dst[write_start[s] + j] = new[s, j] for K and V");
}
