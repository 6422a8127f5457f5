// Split-KV decode attention over adakv's flattened head-wise KV cache (see adakv/flat_cache.py and
// adakv/kernels.py `cuda_decode_attention`): one query token per query head, one C++ call per layer.
//
// Sequence s = batch * kv_heads + kv_head owns rows [offsets[s], offsets[s] + lengths[s]) (lengths read on the device)
// of the flat keys/values (rows, head_dim); it is attended by query heads kv_head * group + g, g < group.
//
// decode_split_kernel, grid (num_splits, sequences), 128 threads (4 warps): block (split, s) takes the
// split-th of num_splits equal chunks of s's rows. Inside a warp, a key row is read by LANES lanes, each
// holding VPL 16-byte vectors (LANES = next power of two >= vectors per row, capped at 32; padding lanes
// of odd head_dims load nothing), so a warp reads 32 / LANES whole rows per load: coalesced 16-byte loads.
// Each lane keeps an online softmax (running max m, sum l, fp32 V accumulator) per query head; scores
// are in the log2 domain (the query is pre-multiplied by scaling * log2(e)) so exp2f does the softmax.
// At the end the key slots of a warp merge through shuffles and the 4 warps through shared memory, in a
// fixed order (bitwise reproducible). With one split the block writes the normalised output in the
// query's dtype; otherwise it writes the normalised fp32 partial output and its log2-sum-exp (-inf for
// an empty chunk) to the workspace, and decode_combine_kernel, grid (sequences, group), merges them.
//
// Layouts: query (batch, heads, 1, head_dim), any strides; output (batch, 1, heads, head_dim)
// contiguous; partial_out [(s * num_splits + split) * group + g][head_dim] fp32, partial_lse likewise
// without head_dim. head_dim * element size is a multiple of 16 bytes, at least 64 and at most 1024
// bytes (4..64 vectors); group <= kMaxGroup; num_splits <= kMaxSplits (the binding checks all of it).

// Only ATen's tensor headers (not torch/extension.h): this file has many kernel instances to compile.
#include "flat_decode_limits.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
using adakv::kMaxGroup;
using adakv::kMaxSplits;
constexpr float kLog2E = 1.4426950408889634f;

// ----- 16-byte vectors of each dtype, converted to and from fp32 -----------------------------------------
template <typename T>
struct Vector;

template <>
struct Vector<float> {
  static constexpr int kElements = 4;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* out) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
  __device__ __forceinline__ static float load(const float* p) { return *p; }
  __device__ __forceinline__ static float store(float x) { return x; }
};

template <>
struct Vector<__half> {
  static constexpr int kElements = 8;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* out) {
    const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static float load(const __half* p) { return __half2float(*p); }
  __device__ __forceinline__ static __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Vector<__nv_bfloat16> {
  static constexpr int kElements = 8;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* out) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ __forceinline__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// Scale factor exp2(m - new_max) of a running (max, sum, accumulator) triple; 0 for an empty one.
__device__ __forceinline__ float rescale(float m, float new_max) {
  return m == -INFINITY ? 0.f : exp2f(m - new_max);
}

struct DecodeParams {
  const void* query;
  const uint4* keys;
  const uint4* values;
  const int64_t* offsets;
  const int64_t* lengths;  // rows in use per sequence (read on the device: graph-replayable)
  void* out;             // (batch, 1, heads, head_dim), used when num_splits == 1
  float* partial_out;    // used when num_splits > 1
  float* partial_lse;
  int64_t query_stride_batch, query_stride_head, query_stride_dim;
  float scale_log2;      // scaling * log2(e)
  int head_dim, vectors; // vectors: 16-byte vectors per row
  int kv_heads, group, num_splits;
};

// Keys unrolled per lane and loop step: several independent 16-byte loads in flight per lane, fewer
// where the per-head accumulators already take many registers.
template <int VPL, int MAX_GROUP>
__host__ __device__ constexpr int keys_per_lane() {
  return VPL == 1 ? (MAX_GROUP >= 16 ? 2 : 4) : (MAX_GROUP >= 16 ? 1 : 2);
}

template <typename T, int LANES, int VPL, int MAX_GROUP>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
  using V = Vector<T>;
  constexpr int kVec = V::kElements;
  constexpr int kElems = VPL * kVec;            // elements of a row per lane
  constexpr int kPaddedDim = LANES * VPL * kVec;  // >= head_dim
  constexpr int kKeySlots = 32 / LANES;         // rows read together by one warp load
  constexpr int kUnroll = keys_per_lane<VPL, MAX_GROUP>();
  constexpr int kWarpKeys = kKeySlots * kUnroll;
  constexpr int kBlockKeys = kWarps * kWarpKeys;

  // query of every head of the group (scaled, fp32), reused after the main loop for the merge
  __shared__ __align__(16) float shared_rows[MAX_GROUP * kPaddedDim];
  __shared__ float warp_max[kWarps][MAX_GROUP];
  __shared__ float warp_sum[kWarps][MAX_GROUP];
  __shared__ float head_sum[MAX_GROUP], head_lse[MAX_GROUP];

  const int split = blockIdx.x;
  const int sequence = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = lane % LANES;   // lane within a row
  const int slot = lane / LANES;  // which of the warp's kKeySlots rows
  const int group = p.group;

  const int64_t length = p.lengths[sequence];
  const int64_t chunk = (length + p.num_splits - 1) / p.num_splits;
  const int64_t begin = min(length, (int64_t)split * chunk);
  const int64_t end = min(length, begin + chunk);
  const int64_t slot_index = ((int64_t)sequence * p.num_splits + split) * group;

  if (begin >= end) {  // empty chunk (or empty sequence): nothing to attend
    if (p.num_splits > 1) {
      for (int g = threadIdx.x; g < group; g += kThreads) p.partial_lse[slot_index + g] = -INFINITY;
    } else {
      T* out = static_cast<T*>(p.out) + (int64_t)sequence * group * p.head_dim;
      for (int i = threadIdx.x; i < group * p.head_dim; i += kThreads) out[i] = V::store(0.f);
    }
    return;
  }

  {  // load the group's query heads, scaled into the log2 domain; padding columns are 0
    const int batch = sequence / p.kv_heads;
    const int first_head = (sequence - batch * p.kv_heads) * group;
    const T* query = static_cast<const T*>(p.query) + batch * p.query_stride_batch;
    for (int i = threadIdx.x; i < MAX_GROUP * kPaddedDim; i += kThreads) {
      const int g = i / kPaddedDim, d = i - g * kPaddedDim;
      float x = 0.f;
      if (g < group && d < p.head_dim)
        x = V::load(query + (first_head + g) * p.query_stride_head + d * p.query_stride_dim) * p.scale_log2;
      shared_rows[i] = x;
    }
  }
  __syncthreads();

  bool active[VPL];  // this lane's vectors inside the row (padding lanes of odd head_dims have none)
#pragma unroll
  for (int j = 0; j < VPL; ++j) active[j] = j * LANES + sub < p.vectors;

  float run_max[MAX_GROUP], run_sum[MAX_GROUP], acc[MAX_GROUP][kElems];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    run_max[g] = -INFINITY;
    run_sum[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[g][e] = 0.f;
  }

  const int64_t first_row = p.offsets[sequence];
  for (int64_t base = begin + warp * kWarpKeys; base < end; base += kBlockKeys) {
    // issue every load of this step first
    uint4 key_raw[kUnroll][VPL], value_raw[kUnroll][VPL];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t key = base + u * kKeySlots + slot;
      valid[u] = key < end;
      const int64_t row_vector = (first_row + key) * p.vectors + sub;
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const bool load = valid[u] && active[j];
        key_raw[u][j] = load ? __ldg(p.keys + row_vector + j * LANES) : make_uint4(0, 0, 0, 0);
        value_raw[u][j] = load ? __ldg(p.values + row_vector + j * LANES) : make_uint4(0, 0, 0, 0);
      }
    }
    float key_f[kUnroll][kElems];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < VPL; ++j) V::to_float(key_raw[u][j], &key_f[u][j * kVec]);

    // scores[u][g]: full dot products (reduced over the row's lanes), -inf past the chunk
    float scores[kUnroll][MAX_GROUP];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      if (g >= group) break;
      float q[kElems];
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const float4* q_vec =
            reinterpret_cast<const float4*>(&shared_rows[g * kPaddedDim + (j * LANES + sub) * kVec]);
#pragma unroll
        for (int i = 0; i < kVec / 4; ++i) {
          const float4 f = q_vec[i];
          q[j * kVec + 4 * i] = f.x;
          q[j * kVec + 4 * i + 1] = f.y;
          q[j * kVec + 4 * i + 2] = f.z;
          q[j * kVec + 4 * i + 3] = f.w;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kElems; ++e) dot = fmaf(q[e], key_f[u][e], dot);
#pragma unroll
        for (int offset = LANES / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        scores[u][g] = valid[u] ? dot : -INFINITY;
      }
    }

    // online softmax: rescale the running state, then turn scores into weights
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      if (g >= group) break;
      float new_max = run_max[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) new_max = fmaxf(new_max, scores[u][g]);
      if (new_max == -INFINITY) {  // every key of this step is past the chunk (only this slot's)
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) scores[u][g] = 0.f;
        continue;
      }
      const float alpha = rescale(run_max[g], new_max);
      float weight_sum = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        scores[u][g] = exp2f(scores[u][g] - new_max);  // exp2f(-inf) = 0
        weight_sum += scores[u][g];
      }
      run_max[g] = new_max;
      run_sum[g] = run_sum[g] * alpha + weight_sum;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[g][e] *= alpha;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float value_f[kElems];
#pragma unroll
      for (int j = 0; j < VPL; ++j) V::to_float(value_raw[u][j], &value_f[j * kVec]);
#pragma unroll
      for (int g = 0; g < MAX_GROUP; ++g) {
        if (g >= group) break;
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[g][e] = fmaf(scores[u][g], value_f[e], acc[g][e]);
      }
    }
  }

  // merge the key slots of the warp (lanes sub, sub + LANES, ...): afterwards slot 0 holds the warp's state
#pragma unroll
  for (int offset = LANES; offset < 32; offset <<= 1) {
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      if (g >= group) break;
      const float other_max = __shfl_xor_sync(0xffffffffu, run_max[g], offset);
      const float other_sum = __shfl_xor_sync(0xffffffffu, run_sum[g], offset);
      const float new_max = fmaxf(run_max[g], other_max);
      const float mine = rescale(run_max[g], new_max), theirs = rescale(other_max, new_max);
      run_sum[g] = run_sum[g] * mine + other_sum * theirs;
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        const float other = __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
        acc[g][e] = acc[g][e] * mine + other * theirs;
      }
      run_max[g] = new_max;
    }
  }

  // merge the warps through shared memory in a fixed order (warp 0 writes, then 1, 2, 3 add)
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      warp_max[warp][g] = run_max[g];
      warp_sum[warp][g] = run_sum[g];
    }
  }
  __syncthreads();  // also: every warp is done reading the query from shared_rows
  float block_max[MAX_GROUP];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    float m = warp_max[0][g];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) m = fmaxf(m, warp_max[w][g]);
    block_max[g] = m;
  }
  if (threadIdx.x < MAX_GROUP) {  // the block's softmax sum of head g (read after the syncs below)
    const int g = threadIdx.x;
    float m = warp_max[0][g];
    for (int w = 1; w < kWarps; ++w) m = fmaxf(m, warp_max[w][g]);
    float l = 0.f;
    for (int w = 0; w < kWarps; ++w) l += warp_sum[w][g] * rescale(warp_max[w][g], m);
    head_sum[g] = l;
    head_lse[g] = m + __log2f(l);
  }
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w && slot == 0) {
#pragma unroll
      for (int g = 0; g < MAX_GROUP; ++g) {
        if (g >= group) break;
        const float factor = rescale(run_max[g], block_max[g]);
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
          float* row = &shared_rows[g * kPaddedDim + (j * LANES + sub) * kVec];
#pragma unroll
          for (int i = 0; i < kVec; ++i) row[i] = (w == 0 ? 0.f : row[i]) + acc[g][j * kVec + i] * factor;
        }
      }
    }
    __syncthreads();
  }

  // write out the normalised rows (every head has a key in this non-empty chunk, so head_sum > 0)
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + (int64_t)sequence * group * p.head_dim;
    for (int i = threadIdx.x; i < group * p.head_dim; i += kThreads) {
      const int g = i / p.head_dim, d = i - g * p.head_dim;
      out[i] = V::store(shared_rows[g * kPaddedDim + d] / head_sum[g]);
    }
  } else {
    float* out = p.partial_out + slot_index * p.head_dim;
    for (int i = threadIdx.x; i < group * p.head_dim; i += kThreads) {
      const int g = i / p.head_dim, d = i - g * p.head_dim;
      out[i] = shared_rows[g * kPaddedDim + d] / head_sum[g];
    }
    for (int g = threadIdx.x; g < group; g += kThreads) p.partial_lse[slot_index + g] = head_lse[g];
  }
}

// Merge the num_splits partial results of (sequence, g): weights exp2(lse - max) / sum; empty splits
// (lse = -inf) are skipped without reading their (unwritten) partial output.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(const DecodeParams p) {
  __shared__ float weights[kMaxSplits];
  const int sequence = blockIdx.x, g = blockIdx.y;
  const int group = p.group;
  const int64_t first_slot = (int64_t)sequence * p.num_splits * group + g;  // slot of split 0; stride group
  for (int split = threadIdx.x; split < p.num_splits; split += kThreads)
    weights[split] = p.partial_lse[first_slot + (int64_t)split * group];
  __syncthreads();
  float max_lse = -INFINITY;
  for (int split = 0; split < p.num_splits; ++split) max_lse = fmaxf(max_lse, weights[split]);
  float total = 0.f;
  for (int split = 0; split < p.num_splits; ++split) total += rescale(weights[split], max_lse);
  __syncthreads();  // everyone has read the log2-sum-exps before they become weights
  for (int split = threadIdx.x; split < p.num_splits; split += kThreads)
    weights[split] = rescale(weights[split], max_lse) / total;
  __syncthreads();

  T* out = static_cast<T*>(p.out) + ((int64_t)sequence * group + g) * p.head_dim;
  if (max_lse == -INFINITY) {  // empty sequence
    for (int d = threadIdx.x; d < p.head_dim; d += kThreads) out[d] = Vector<T>::store(0.f);
    return;
  }
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    float sum = 0.f;
    for (int split = 0; split < p.num_splits; ++split) {
      const float w = weights[split];
      if (w != 0.f) sum = fmaf(w, p.partial_out[(first_slot + (int64_t)split * group) * p.head_dim + d], sum);
    }
    out[d] = Vector<T>::store(sum);
  }
}

template <typename T, int LANES, int VPL>
void launch_split(const DecodeParams& p, int sequences, cudaStream_t stream) {
  const dim3 grid(p.num_splits, sequences);
  if (p.group <= 1) {
    decode_split_kernel<T, LANES, VPL, 1><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.group <= 2) {
    decode_split_kernel<T, LANES, VPL, 2><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.group <= 4) {
    decode_split_kernel<T, LANES, VPL, 4><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.group <= 8) {
    decode_split_kernel<T, LANES, VPL, 8><<<grid, kThreads, 0, stream>>>(p);
  } else {
    decode_split_kernel<T, LANES, VPL, kMaxGroup><<<grid, kThreads, 0, stream>>>(p);
  }
}

// Lanes per row: the next power of two >= the row's 16-byte vectors (4..64), two vectors a lane above 32.
template <typename T>
void launch_typed(const DecodeParams& p, int sequences, cudaStream_t stream) {
  if (p.vectors <= 4) {
    launch_split<T, 4, 1>(p, sequences, stream);
  } else if (p.vectors <= 8) {
    launch_split<T, 8, 1>(p, sequences, stream);
  } else if (p.vectors <= 16) {
    launch_split<T, 16, 1>(p, sequences, stream);
  } else if (p.vectors <= 32) {
    launch_split<T, 32, 1>(p, sequences, stream);
  } else {
    if constexpr (sizeof(T) == 4) launch_split<T, 32, 2>(p, sequences, stream);  // fp32 head_dim > 128
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    decode_combine_kernel<T><<<dim3(sequences, p.group), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace


// query (batch, heads, 1, head_dim) -> (batch, 1, heads, head_dim); the binding has checked the inputs.
// partial_out / partial_lse: the split workspace (only read when num_splits > 1).
at::Tensor launch_decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                                   const at::Tensor& offsets, const at::Tensor& lengths,
                                   double scaling, int64_t num_splits, float* partial_out, float* partial_lse) {
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t batch = query.size(0), heads = query.size(1), head_dim = query.size(3);
  const int64_t sequences = offsets.size(0);
  const int64_t kv_heads = sequences / batch;
  at::Tensor out = at::empty({batch, 1, heads, head_dim}, query.options());
  if (sequences == 0) return out;

  // repeated from the binding: a group or split count above the compiled limits would overrun the kernels' arrays
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup, "decode_attention supports GQA groups up to ",
              kMaxGroup, ", got ", heads, " query heads over ", kv_heads, " KV heads");
  TORCH_CHECK(num_splits >= 1 && num_splits <= kMaxSplits, "num_splits must be in [1, ", kMaxSplits, "]");

  DecodeParams p;
  p.query = query.data_ptr();
  p.keys = reinterpret_cast<const uint4*>(keys.data_ptr());
  p.values = reinterpret_cast<const uint4*>(values.data_ptr());
  p.offsets = offsets.data_ptr<int64_t>();
  p.lengths = lengths.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.partial_out = partial_out;
  p.partial_lse = partial_lse;
  p.query_stride_batch = query.stride(0);
  p.query_stride_head = query.stride(1);
  p.query_stride_dim = query.stride(3);
  p.scale_log2 = static_cast<float>(scaling) * kLog2E;
  p.head_dim = static_cast<int>(head_dim);
  p.vectors = static_cast<int>(head_dim * query.element_size() / 16);
  p.kv_heads = static_cast<int>(kv_heads);
  p.group = static_cast<int>(heads / kv_heads);
  p.num_splits = static_cast<int>(num_splits);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (query.scalar_type()) {
    case at::kHalf:
      launch_typed<__half>(p, static_cast<int>(sequences), stream);
      break;
    case at::kBFloat16:
      launch_typed<__nv_bfloat16>(p, static_cast<int>(sequences), stream);
      break;
    default:
      launch_typed<float>(p, static_cast<int>(sequences), stream);
  }
  return out;
}
