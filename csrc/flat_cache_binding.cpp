// Torch binding of csrc/flat_cache.cu and csrc/flat_decode.cu. adakv/kernels.py checks inputs with friendly
// messages first; these checks repeat the ones the kernels rely on, so a direct call cannot corrupt memory
// silently.

#include <torch/extension.h>

#include "flat_decode_limits.h"

void launch_copy_rows(const torch::Tensor& src_keys, const torch::Tensor& src_values, torch::Tensor& dst_keys,
                      torch::Tensor& dst_values, const torch::Tensor& src_index, const torch::Tensor& dst_index);
void launch_append_rows(torch::Tensor& dst_keys, torch::Tensor& dst_values, const torch::Tensor& new_keys,
                        const torch::Tensor& new_values, const torch::Tensor& offsets, torch::Tensor& lengths,
                        const c10::optional<torch::Tensor>& first_token);
torch::Tensor launch_decode_attention(const torch::Tensor& query, const torch::Tensor& keys,
                                      const torch::Tensor& values, const torch::Tensor& offsets,
                                      const torch::Tensor& lengths, double scaling,
                                      int64_t num_splits, float* partial_out, float* partial_lse);

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
                 torch::Tensor offsets, torch::Tensor lengths, c10::optional<torch::Tensor> first_token) {
  check_rows(dst_keys, dst_keys, "dst_keys");
  check_rows(dst_values, dst_keys, "dst_values");
  check_rows(new_keys, dst_keys, "new_keys");
  check_rows(new_values, dst_keys, "new_values");
  TORCH_CHECK(dst_keys.dim() == 2 && dst_keys.sizes() == dst_values.sizes(), "dst_* must be (rows, head_dim)");
  TORCH_CHECK(new_keys.dim() == 3 && new_keys.sizes() == new_values.sizes(),
              "new_* must be (sequences, new_tokens, head_dim)");
  check_index(offsets, dst_keys, "offsets");
  check_index(lengths, dst_keys, "lengths");
  TORCH_CHECK(offsets.size(0) == new_keys.size(0) && lengths.size(0) == new_keys.size(0),
              "offsets and lengths must have one entry per sequence");
  if (first_token.has_value()) {
    check_index(*first_token, dst_keys, "first_token");
    TORCH_CHECK(first_token->size(0) == new_keys.size(0), "first_token must have one entry per sequence");
  }
  launch_append_rows(dst_keys, dst_values, new_keys, new_values, offsets, lengths, first_token);
}

void check_workspace(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name, " must be a contiguous float32 tensor");
}

// query (batch, heads, 1, head_dim) over sequences s = batch * kv_heads + kv_head (kv_heads = sequences / batch)
// whose rows are keys/values[offsets[s] : offsets[s] + lengths[s]] -> (batch, 1, heads, head_dim).
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor offsets,
                               torch::Tensor lengths, double scaling, int64_t num_splits,
                               std::optional<torch::Tensor> partial_out, std::optional<torch::Tensor> partial_lse) {
  check_rows(keys, keys, "keys");
  check_rows(values, keys, "values");
  TORCH_CHECK(keys.dim() == 2 && keys.sizes() == values.sizes(), "keys/values must both be (rows, head_dim)");
  TORCH_CHECK(query.is_cuda() && query.device() == keys.device(), "query must be on ", keys.device());
  TORCH_CHECK(query.scalar_type() == keys.scalar_type(), "query must have dtype ", keys.scalar_type());
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1 && query.size(3) == keys.size(1),
              "query must be (batch, heads, 1, ", keys.size(1), "), got ", query.sizes());
  const int64_t row_bytes = keys.size(1) * keys.element_size();
  TORCH_CHECK(row_bytes >= 64 && row_bytes <= 1024 && keys.size(1) <= 256,
              "decode_attention supports head_dim * element size of 64 to 1024 bytes and head_dim <= 256, got "
              "head_dim ", keys.size(1));
  check_index(offsets, keys, "offsets");
  check_index(lengths, keys, "lengths");
  const int64_t batch = query.size(0), heads = query.size(1), sequences = offsets.size(0);
  TORCH_CHECK(lengths.size(0) == sequences, "lengths must have one entry per sequence");
  TORCH_CHECK(batch > 0 && sequences % batch == 0 && sequences / batch > 0,
              "offsets must have batch * kv_heads entries, got ", sequences, " for batch ", batch);
  const int64_t kv_heads = sequences / batch;
  TORCH_CHECK(heads % kv_heads == 0, heads, " query heads cannot be grouped over ", kv_heads, " KV heads");
  const int64_t group = heads / kv_heads;
  TORCH_CHECK(group <= adakv::kMaxGroup, "decode_attention supports GQA groups up to ", adakv::kMaxGroup,
              ", got ", group);
  TORCH_CHECK(sequences <= 65535, "decode_attention supports up to 65535 (batch, kv-head) sequences");
  TORCH_CHECK(num_splits >= 1 && num_splits <= adakv::kMaxSplits, "num_splits must be in [1, ",
              adakv::kMaxSplits, "], got ", num_splits);
  float* workspace_out = nullptr;
  float* workspace_lse = nullptr;
  if (num_splits > 1) {
    TORCH_CHECK(partial_out.has_value() && partial_lse.has_value(),
                "num_splits > 1 needs the split workspace (partial_out, partial_lse)");
    check_workspace(*partial_out, keys, "partial_out");
    check_workspace(*partial_lse, keys, "partial_lse");
    const int64_t slots = sequences * num_splits * group;
    TORCH_CHECK(partial_out->numel() >= slots * keys.size(1) && partial_lse->numel() >= slots,
                "the split workspace needs ", slots * keys.size(1), " partial outputs and ", slots,
                " log2-sum-exps");
    workspace_out = partial_out->data_ptr<float>();
    workspace_lse = partial_lse->data_ptr<float>();
  }
  return launch_decode_attention(query, keys, values, offsets, lengths, scaling, num_splits,
                                 workspace_out, workspace_lse);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adakv flattened head-wise cache kernels";
  m.def("copy_rows", &copy_rows, "dst[dst_index[i]] = src[src_index[i]] for K and V");
  m.def("append_rows", &append_rows,
        "dst[offsets[s] + lengths[s] + j - first[s]] = new[s, j] for j >= first[s], then lengths[s] advances",
        py::arg("dst_keys"), py::arg("dst_values"), py::arg("new_keys"), py::arg("new_values"), py::arg("offsets"),
        py::arg("lengths"), py::arg("first_token") = py::none());
  m.def("decode_attention", &decode_attention,
        "one-token attention over the flat cache: split kernel (+ combine kernel when num_splits > 1)",
        py::arg("query"), py::arg("keys"), py::arg("values"), py::arg("offsets"), py::arg("lengths"),
        py::arg("scaling"), py::arg("num_splits"), py::arg("partial_out") = py::none(),
        py::arg("partial_lse") = py::none());
}
