"""Every kernel adakv launches, with the PyTorch reference beside each, and the device helpers.

- `cuda_flat` (+ `flat_reference`): the CUDA extension built from csrc/ on first use (row compaction and
  append of the flat head-wise cache, split-KV decode attention), checked wrappers, and their PyTorch
  references (the CPU path and the test oracle).
- `triton_decode` (+ `triton_flat`): split-KV ("flash-decoding") attention over the flat layout.
- `triton_elementwise` (+ `elementwise_reference`): RMSNorm with residual add, rotary, SiLU gate.
- `triton_gemv` (+ `gemv_plan`): the matrix-vector product of decode-step linears and its tile plan.
- `kvzip_scoring` (+ `kvzip_reference`): KVzip's max-attention scoring.
- `attention_scores`: float32 attention logits from half-precision inputs.
- `device`: the current-device guard for launches on a tensor's GPU, the multiprocessor count.

Modules that import triton at the top are imported only where triton is present (CUDA, or the
interpreter in tests). This package imports nothing from the rest of adakv.
"""
