// CUDA batched gather/scatter: one kernel launch covers every layer, block and segment of a
// request, on the caller's stream. Chunk buffers in page-locked host memory (or device memory) are
// read/written by the kernel directly; pageable host buffers go through a device staging buffer.
// The small tables (layer/chunk pointers, block ids) travel in one stream-ordered allocation.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kvcopy.h"
#include "kvcopy_check.h"

namespace {

thread_local std::string g_error;

struct Args {
  const uint64_t* layer_ptrs;  // device copy of the tables
  const uint64_t* chunk_ptrs;
  const int64_t* block_ids;
  int64_t num_layers, n, k, S, seg, block_stride, segment_stride;
  int64_t parts, piece;  // each segment is split into `parts` pieces of `piece` bytes
  int gather;
};

// One work unit = one piece of one segment of one block of one layer. T is the access width.
template <typename T>
__global__ void copy_kernel(Args a) {
  const int64_t units = a.num_layers * a.n * a.S * a.parts;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    int64_t part = u % a.parts, r = u / a.parts;
    int64_t s = r % a.S;
    r /= a.S;
    int64_t i = r % a.n, layer = r / a.n;
    int64_t j = i / a.k, ii = i - j * a.k;
    int64_t kj = min(a.k, a.n - j * a.k);
    int64_t off = part * a.piece, len = min(a.piece, a.seg - off);
    char* chunk = reinterpret_cast<char*>(a.chunk_ptrs[j]) +
                  ((layer * kj + ii) * a.S + s) * a.seg + off;
    char* blk = reinterpret_cast<char*>(a.layer_ptrs[layer]) + a.block_ids[i] * a.block_stride +
                s * a.segment_stride + off;
    T* dst = reinterpret_cast<T*>(a.gather ? chunk : blk);
    const T* src = reinterpret_cast<const T*>(a.gather ? blk : chunk);
    int64_t count = len / (int64_t)sizeof(T);
    for (int64_t e = threadIdx.x; e < count; e += blockDim.x) dst[e] = src[e];
  }
}

int fail(const char* what, cudaError_t e) {
  g_error = std::string(what) + ": " + cudaGetErrorString(e);
  return KVCOPY_ECUDA;
}

#define CK(call)                                     \
  do {                                               \
    cudaError_t e_ = (call);                         \
    if (e_ != cudaSuccess) return fail(#call, e_);   \
  } while (0)

// After the stream-ordered allocation: release it on the stream before reporting the error.
#define CKF(call)                                    \
  do {                                               \
    cudaError_t e_ = (call);                         \
    if (e_ != cudaSuccess) {                         \
      cudaFreeAsync(dmem, stream);                   \
      return fail(#call, e_);                        \
    }                                                \
  } while (0)

}  // namespace

extern "C" {

const char* kvcopy_cuda_last_error(void) { return g_error.c_str(); }

int kvcopy_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

int kvcopy_cuda_copy(int direction, const kvcopy_layout* layout, const uint64_t* layer_ptrs,
                     int64_t num_layers, int64_t layer_extent, const uint64_t* chunk_ptrs,
                     const int64_t* chunk_sizes, const int64_t* block_ids, int64_t n, int64_t k,
                     void* stream_ptr, int mode) {
  int rc = kvcopy::check(direction, layout, layer_ptrs, num_layers, layer_extent, chunk_ptrs,
                         chunk_sizes, block_ids, n, k, g_error);
  if (rc != 0 || n == 0) return rc;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const kvcopy_layout l = *layout;
  const bool gather = direction == KVCOPY_GATHER;
  const int64_t C = kvcopy::num_chunks(n, k);

  // Decide per chunk buffer: direct (device-accessible) or staged through device memory.
  std::vector<uint64_t> kernel_chunks(C);
  std::vector<int64_t> staged_offset(C, -1);
  int64_t staging_bytes = 0;
  for (int64_t j = 0; j < C; ++j) {
    int64_t kj = std::min(k, n - j * k);
    int64_t bytes = num_layers * kj * kvcopy::block_bytes(l);
    cudaPointerAttributes attr;
    cudaError_t e = cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(chunk_ptrs[j]));
    if (e != cudaSuccess) {
      cudaGetLastError();
      attr.type = cudaMemoryTypeUnregistered;
    }
    bool device = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
    bool pinned = attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr;
    if (device || (pinned && mode == 0)) {
      kernel_chunks[j] = reinterpret_cast<uint64_t>(attr.devicePointer);
    } else {
      staged_offset[j] = staging_bytes;
      staging_bytes += (bytes + 255) & ~int64_t(255);
    }
  }

  // One allocation: tables first, then staging buffers.
  int64_t table_bytes = (num_layers + C + n) * 8;
  int64_t table_pad = (table_bytes + 255) & ~int64_t(255);
  char* dmem = nullptr;
  CK(cudaMallocAsync(reinterpret_cast<void**>(&dmem), table_pad + staging_bytes, stream));
  for (int64_t j = 0; j < C; ++j)
    if (staged_offset[j] >= 0)
      kernel_chunks[j] = reinterpret_cast<uint64_t>(dmem + table_pad + staged_offset[j]);
  std::vector<char> host(table_bytes);
  std::memcpy(host.data(), layer_ptrs, num_layers * 8);
  std::memcpy(host.data() + num_layers * 8, kernel_chunks.data(), C * 8);
  std::memcpy(host.data() + (num_layers + C) * 8, block_ids, n * 8);
  // Pageable source: the runtime copies it out before returning, so `host` may die after this.
  CKF(cudaMemcpyAsync(dmem, host.data(), table_bytes, cudaMemcpyHostToDevice, stream));

  auto chunk_bytes = [&](int64_t j) {
    return num_layers * std::min(k, n - j * k) * kvcopy::block_bytes(l);
  };
  if (!gather)
    for (int64_t j = 0; j < C; ++j)
      if (staged_offset[j] >= 0)
        CKF(cudaMemcpyAsync(reinterpret_cast<void*>(kernel_chunks[j]),
                           reinterpret_cast<void*>(chunk_ptrs[j]), chunk_bytes(j),
                           cudaMemcpyHostToDevice, stream));

  Args a;
  a.layer_ptrs = reinterpret_cast<const uint64_t*>(dmem);
  a.chunk_ptrs = a.layer_ptrs + num_layers;
  a.block_ids = reinterpret_cast<const int64_t*>(a.chunk_ptrs + C);
  a.num_layers = num_layers;
  a.n = n;
  a.k = k;
  a.S = l.segments;
  a.seg = l.segment_bytes;
  a.block_stride = l.block_stride;
  a.segment_stride = l.segment_stride;
  a.gather = gather ? 1 : 0;
  a.piece = std::min<int64_t>(l.segment_bytes, 64 * 1024);
  a.parts = (l.segment_bytes + a.piece - 1) / a.piece;

  // Widest access that every address and length allows.
  uint64_t bits = static_cast<uint64_t>(l.segment_bytes | l.block_stride | l.segment_stride |
                                        a.piece);
  for (int64_t i = 0; i < num_layers; ++i) bits |= layer_ptrs[i];
  for (int64_t j = 0; j < C; ++j) bits |= kernel_chunks[j];
  int64_t units = num_layers * n * l.segments * a.parts;
  int grid = static_cast<int>(std::min<int64_t>(units, 65535 * 4));
  if (bits % 16 == 0)
    copy_kernel<uint4><<<grid, 256, 0, stream>>>(a);
  else if (bits % 8 == 0)
    copy_kernel<uint2><<<grid, 256, 0, stream>>>(a);
  else if (bits % 4 == 0)
    copy_kernel<uint32_t><<<grid, 256, 0, stream>>>(a);
  else
    copy_kernel<unsigned char><<<grid, 256, 0, stream>>>(a);
  CKF(cudaGetLastError());

  if (gather)
    for (int64_t j = 0; j < C; ++j)
      if (staged_offset[j] >= 0)
        CKF(cudaMemcpyAsync(reinterpret_cast<void*>(chunk_ptrs[j]),
                           reinterpret_cast<void*>(kernel_chunks[j]), chunk_bytes(j),
                           cudaMemcpyDeviceToHost, stream));
  CK(cudaFreeAsync(dmem, stream));
  return 0;
}

}  // extern "C"
