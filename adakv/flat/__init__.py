"""The flat head-wise cache (backend "evict") and everything that reads or writes it.

- `layer`: `FlatHeadwiseLayer`, the cache layer: per layer one K and one V buffer (rows, head_dim) holding the
  kept rows of every (batch, KV head), with offsets, device-side lengths and slack.
- `kernels` / `kernels_reference`: the CUDA kernels of csrc/ (compaction, append, split-KV decode attention),
  built on first use, and their PyTorch references (the CPU path and the test oracle).
- `varlen`: attention over the flat layout (`flat_attention`), dispatching to the CUDA decode kernel, the
  Triton split-KV kernels (`triton_decode`, `triton_kernels`), torch's varlen attention or the reference.
- `graph_decode`: CUDA-graph decoding over flat layers (`press(model, cuda_graphs=True)`).
"""
