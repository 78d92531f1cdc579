/* kvcopy: batched KV-cache copies between an engine's paged cache and contiguous chunk buffers.
 *
 * Plain C ABI (loaded with ctypes; no libtorch). A layout is data: one engine block of one layer is
 * `segments` runs of `segment_bytes`, run s of block b at byte offset
 * b * block_stride + s * segment_stride from the layer's base pointer. Chunk buffer j holds blocks
 * block_ids[j*k .. j*k+k_j) (k_j = min(k, n - j*k)) laid out [layer][block][segment][bytes].
 *
 * Functions return 0 on success and a negative code on error; kvcopy_last_error() describes it.
 * Callers validate indices and sizes first; the library checks them again and writes nothing when
 * a check fails.
 */
#ifndef KVCOPY_H
#define KVCOPY_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int64_t segments;
  int64_t segment_bytes;
  int64_t block_stride;
  int64_t segment_stride;
} kvcopy_layout;

enum { KVCOPY_GATHER = 0, KVCOPY_SCATTER = 1 };
enum { KVCOPY_EINVAL = -1, KVCOPY_EINDEX = -2, KVCOPY_ESIZE = -3, KVCOPY_ECUDA = -4 };

/* CPU. layer_ptrs[num_layers]; chunk_ptrs/chunk_sizes[ceil(n/k)]; layer_extent: bytes addressable
 * from each layer base. direction: KVCOPY_GATHER (layers -> chunks) or KVCOPY_SCATTER. */
int kvcopy_cpu_copy(int direction, const kvcopy_layout* layout, const uint64_t* layer_ptrs,
                    int64_t num_layers, int64_t layer_extent, const uint64_t* chunk_ptrs,
                    const int64_t* chunk_sizes, const int64_t* block_ids, int64_t n, int64_t k);
int kvcopy_cpu_set_threads(int threads); /* 0: default; returns the count in use */
int kvcopy_cpu_threads(void);
int kvcopy_cpu_set_streaming(int on); /* non-temporal stores for large copies (default on) */
const char* kvcopy_last_error(void);
const char* kvcopy_version(void);

/* CUDA (libkvcopy_cuda.so). stream is a cudaStream_t (0: legacy default). mode 0: write/read
 * page-locked host chunk buffers directly from the kernel; mode 1: always stage through device
 * memory and cudaMemcpyAsync. Pageable host chunk buffers are always staged. */
int kvcopy_cuda_copy(int direction, const kvcopy_layout* layout, const uint64_t* layer_ptrs,
                     int64_t num_layers, int64_t layer_extent, const uint64_t* chunk_ptrs,
                     const int64_t* chunk_sizes, const int64_t* block_ids, int64_t n, int64_t k,
                     void* stream, int mode);
const char* kvcopy_cuda_last_error(void);
int kvcopy_cuda_device_count(void);

#ifdef __cplusplus
}
#endif

#endif
