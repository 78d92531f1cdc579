/* kvquant: symmetric per-group quantization of bfloat16 KV to int8 or int4 (see
 * kvcore/codecs/quantize.py for the format). The arithmetic matches the numpy reference bit for
 * bit: float32 absmax, scale = absmax / qmax, q = round-half-even(x * (1 / scale)), clamp;
 * decode x = q * scale rounded to bfloat16 (nearest, ties to even). Built without fast-math so
 * the compiler keeps that order of operations.
 *
 * Returns 0, or -1 for bad arguments, -2 when an element is inf or NaN (the caller stores raw).
 */
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define KVQUANT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KVQUANT_CLONES
#endif

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

/* Round half to even for |v| < 2^22 (values here are at most qmax in magnitude). */
inline float round_even(float v) {
  const float magic = 12582912.0f; /* 1.5 * 2^23 */
  const float t = v + magic;
  return t - magic;
}

}  // namespace

extern "C" {

KVQUANT_CLONES
int kvquant_bf16_encode(const void* src, int64_t count, int bits, int64_t group, float* scales,
                        uint8_t* values) {
  if (!src || !scales || !values || count <= 0 || group <= 0 || (group & 1) ||
      (bits != 8 && bits != 4)) {
    return -1;
  }
  const uint16_t* in = static_cast<const uint16_t*>(src);
  const float qmax = bits == 8 ? 127.0f : 7.0f;
  const int64_t groups = (count + group - 1) / group;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t start = g * group;
    const int64_t n = count - start < group ? count - start : group;
    float absmax = 0.0f;
    bool nonfinite = false;
    for (int64_t i = 0; i < n; ++i) {
      const float a = std::fabs(bf16_to_f32(in[start + i]));
      absmax = a > absmax ? a : absmax;
      nonfinite |= !(a <= 3.4e38f);
    }
    if (nonfinite) return -2;
    float scale = absmax / qmax;
    float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    if (!(inverse <= 3.4e38f)) { /* a group of values below ~1e-36: stored as zeros */
      scale = 0.0f;
      inverse = 0.0f;
    }
    scales[g] = scale;
    if (bits == 8) {
      int8_t* out = reinterpret_cast<int8_t*>(values) + start;
      for (int64_t i = 0; i < n; ++i) {
        float q = round_even(bf16_to_f32(in[start + i]) * inverse);
        q = q > qmax ? qmax : (q < -qmax ? -qmax : q);
        out[i] = static_cast<int8_t>(q);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        float q = round_even(bf16_to_f32(in[start + i]) * inverse);
        q = q > qmax ? qmax : (q < -qmax ? -qmax : q);
        const uint8_t nib = static_cast<uint8_t>(static_cast<int8_t>(q)) & 0x0Fu;
        const int64_t e = start + i;
        uint8_t& byte = values[e >> 1];
        if ((e & 1) == 0) {
          byte = nib;
        } else {
          byte = static_cast<uint8_t>(byte | (nib << 4));
        }
      }
    }
  }
  return 0;
}

KVQUANT_CLONES
int kvquant_bf16_decode(const uint8_t* values, const float* scales, int64_t count, int bits,
                        int64_t group, void* dst) {
  if (!values || !scales || !dst || count <= 0 || group <= 0 || (bits != 8 && bits != 4)) {
    return -1;
  }
  uint16_t* out = static_cast<uint16_t*>(dst);
  const int64_t groups = (count + group - 1) / group;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t start = g * group;
    const int64_t n = count - start < group ? count - start : group;
    const float scale = scales[g];
    if (bits == 8) {
      const int8_t* in = reinterpret_cast<const int8_t*>(values) + start;
      for (int64_t i = 0; i < n; ++i) {
        out[start + i] = f32_to_bf16(static_cast<float>(in[i]) * scale);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t e = start + i;
        const uint8_t byte = values[e >> 1];
        const int8_t nib = static_cast<int8_t>(static_cast<uint8_t>((e & 1) ? byte : byte << 4)) >> 4;
        out[e] = f32_to_bf16(static_cast<float>(nib) * scale);
      }
    }
  }
  return 0;
}

}  // extern "C"
