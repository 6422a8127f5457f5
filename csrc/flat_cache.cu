// CUDA kernels of adakv's flattened head-wise KV cache (see adakv/flat_cache.py).
//
// Both kernels move whole rows of head_dim elements, K and V in one launch (blockIdx.y picks the
// tensor), as 16-byte vectors: the binding guarantees head_dim * element size % 16 == 0 and
// 16-byte aligned, contiguous buffers. They are dtype-agnostic byte copies.
//
//   copy_rows:   dst[dst_index[i]] = src[src_index[i]]          (compaction, re-layout)
//   append_rows: dst[offsets[s] + lengths[s] + j - first[s]] = new[s * new_tokens + j] for j >= first[s],
//                then lengths[s] += new_tokens - first[s]      (decode / question tokens)
//
// append_rows reads where to write from device memory and advances the lengths itself, so a decode step
// needs no host bookkeeping on the GPU side and can be captured in a CUDA graph and replayed. `first`
// (optional) skips each sequence's leading tokens: the left padding of a padded question batch.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65535;

__global__ void copy_rows_kernel(const uint4* __restrict__ src_keys, const uint4* __restrict__ src_values,
                                 uint4* __restrict__ dst_keys, uint4* __restrict__ dst_values,
                                 const int64_t* __restrict__ src_index, const int64_t* __restrict__ dst_index,
                                 int64_t rows, int64_t vectors_per_row) {
  const uint4* src = blockIdx.y == 0 ? src_keys : src_values;
  uint4* dst = blockIdx.y == 0 ? dst_keys : dst_values;
  const int64_t total = rows * vectors_per_row;
  for (int64_t item = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; item < total;
       item += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = item / vectors_per_row;
    const int64_t vector = item - row * vectors_per_row;
    dst[dst_index[row] * vectors_per_row + vector] = src[src_index[row] * vectors_per_row + vector];
  }
}

// One block per sequence, K and V together: every thread reads lengths[s] before the barrier, then one
// thread advances it, so no other block can observe a half-advanced length.
__global__ void append_rows_kernel(uint4* __restrict__ dst_keys, uint4* __restrict__ dst_values,
                                   const uint4* __restrict__ new_keys, const uint4* __restrict__ new_values,
                                   const int64_t* __restrict__ offsets, int64_t* __restrict__ lengths,
                                   const int64_t* __restrict__ first_token, int64_t new_tokens,
                                   int64_t vectors_per_row) {
  const int64_t sequence = blockIdx.x;
  const int64_t first = first_token == nullptr ? 0 : first_token[sequence];
  const int64_t written = new_tokens - first;
  const int64_t base = offsets[sequence] + lengths[sequence];
  const int64_t items = written * vectors_per_row;
  const int64_t source_base = (sequence * new_tokens + first) * vectors_per_row;
  for (int64_t item = threadIdx.x; item < 2 * items; item += blockDim.x) {
    const bool is_value = item >= items;
    const int64_t within = is_value ? item - items : item;  // (token - first) * vectors + vector
    uint4* dst = is_value ? dst_values : dst_keys;
    const uint4* src = is_value ? new_values : new_keys;
    dst[base * vectors_per_row + within] = src[source_base + within];
  }
  __syncthreads();
  if (threadIdx.x == 0) lengths[sequence] += written;
}

dim3 grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return dim3((unsigned)std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)), 2);
}

int64_t vectors_per_row(const torch::Tensor& rows) {
  return rows.size(-1) * rows.element_size() / (int64_t)sizeof(uint4);
}

const uint4* as_vectors(const torch::Tensor& t) { return reinterpret_cast<const uint4*>(t.data_ptr()); }
uint4* as_mutable_vectors(torch::Tensor& t) { return reinterpret_cast<uint4*>(t.data_ptr()); }

}  // namespace

void launch_copy_rows(const torch::Tensor& src_keys, const torch::Tensor& src_values, torch::Tensor& dst_keys,
                      torch::Tensor& dst_values, const torch::Tensor& src_index, const torch::Tensor& dst_index) {
  const int64_t rows = src_index.size(0);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(dst_keys.device());
  const int64_t vectors = vectors_per_row(dst_keys);
  copy_rows_kernel<<<grid_for(rows * vectors), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      as_vectors(src_keys), as_vectors(src_values), as_mutable_vectors(dst_keys), as_mutable_vectors(dst_values),
      src_index.data_ptr<int64_t>(), dst_index.data_ptr<int64_t>(), rows, vectors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_append_rows(torch::Tensor& dst_keys, torch::Tensor& dst_values, const torch::Tensor& new_keys,
                        const torch::Tensor& new_values, const torch::Tensor& offsets, torch::Tensor& lengths,
                        const c10::optional<torch::Tensor>& first_token) {
  const int64_t sequences = new_keys.size(0), new_tokens = new_keys.size(1);
  if (sequences == 0 || new_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(dst_keys.device());
  const int64_t vectors = vectors_per_row(dst_keys);
  const int64_t* first = first_token.has_value() ? first_token->data_ptr<int64_t>() : nullptr;
  append_rows_kernel<<<(unsigned)sequences, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      as_mutable_vectors(dst_keys), as_mutable_vectors(dst_values), as_vectors(new_keys), as_vectors(new_values),
      offsets.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), first, new_tokens, vectors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
