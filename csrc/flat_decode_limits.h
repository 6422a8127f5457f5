// Compile-time limits of the decode attention kernels (csrc/flat_decode.cu), shared with the binding so
// that both check against the same numbers. adakv/kernels.py mirrors them (DECODE_MAX_GROUP/SPLITS).
#pragma once

namespace adakv {
constexpr int kMaxGroup = 16;    // query heads per KV head
constexpr int kMaxSplits = 128;  // key splits per sequence
}  // namespace adakv
