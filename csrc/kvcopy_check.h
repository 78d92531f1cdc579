// Argument checks shared by the CPU and CUDA implementations (header-only, C++).
#ifndef KVCOPY_CHECK_H
#define KVCOPY_CHECK_H

#include <cstdio>
#include <string>

#include "kvcopy.h"

namespace kvcopy {

inline int64_t block_bytes(const kvcopy_layout& l) { return l.segments * l.segment_bytes; }

inline int64_t num_chunks(int64_t n, int64_t k) { return k > 0 ? (n + k - 1) / k : 0; }

// Blocks a layer of `extent` bytes holds under `l` (0 when not even one fits).
inline int64_t num_blocks(const kvcopy_layout& l, int64_t extent) {
  int64_t last = (l.segments - 1) * l.segment_stride + l.segment_bytes;  // bytes of block 0
  if (extent < last) return 0;
  return l.block_stride > 0 ? (extent - last) / l.block_stride + 1 : 1;
}

// 0 when every argument is sane; otherwise an error code with `err` filled.
inline int check(int direction, const kvcopy_layout* l, const uint64_t* layer_ptrs,
                 int64_t num_layers, int64_t extent, const uint64_t* chunk_ptrs,
                 const int64_t* chunk_sizes, const int64_t* block_ids, int64_t n, int64_t k,
                 std::string& err) {
  char buf[256];
  if (direction != KVCOPY_GATHER && direction != KVCOPY_SCATTER) {
    err = "direction must be 0 (gather) or 1 (scatter)";
    return KVCOPY_EINVAL;
  }
  if (!l || l->segments < 1 || l->segment_bytes < 1 || l->block_stride < 0 ||
      l->segment_stride < 0 || num_layers < 1 || n < 0 || k < 1 || !layer_ptrs ||
      (n > 0 && (!chunk_ptrs || !chunk_sizes || !block_ids))) {
    err = "invalid layout or arguments";
    return KVCOPY_EINVAL;
  }
  int64_t nb = num_blocks(*l, extent);
  for (int64_t i = 0; i < n; ++i) {
    if (block_ids[i] < 0 || block_ids[i] >= nb) {
      std::snprintf(buf, sizeof buf, "block index %lld (block_ids[%lld]) out of range [0, %lld)",
                    (long long)block_ids[i], (long long)i, (long long)nb);
      err = buf;
      return KVCOPY_EINDEX;
    }
  }
  for (int64_t j = 0; j < num_chunks(n, k); ++j) {
    int64_t kj = (n - j * k) < k ? (n - j * k) : k;
    int64_t need = num_layers * kj * block_bytes(*l);
    if (chunk_sizes[j] < need || !chunk_ptrs[j]) {
      std::snprintf(buf, sizeof buf, "chunk buffer %lld holds %lld bytes, needs %lld",
                    (long long)j, (long long)chunk_sizes[j], (long long)need);
      err = buf;
      return KVCOPY_ESIZE;
    }
  }
  return 0;
}

}  // namespace kvcopy

#endif
