// Steered skinny GEMM for decode (1–64 rows, one m per row): memory-bound, so each weight byte (W, ΔW or B,
// biases) is read once per call for all rows of a block, with 16-byte vector loads. Narrow outputs split K
// across the warps of a block. No allocation and no host sync: safe inside CUDA graph capture.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fastsplit/kernels.h"
#include "fastsplit/tile_math.h"

namespace fastsplit {
namespace {

constexpr int kWarps = 4;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// VEC elements of T per load: 16 bytes when the rows allow it, else 1.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f<T>(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f<T>(p[i]);
  }
}

template <typename T, int ROWS, int VEC, bool HAS_DW>
__global__ void __launch_bounds__(kWarps * 32) steered_gemv_kernel(SteeredArgs a, int warps_per_col) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cols_per_block = kWarps / warps_per_col;
  const int64_t n = int64_t(blockIdx.x) * cols_per_block + warp / warps_per_col;
  const int kslice = warp % warps_per_col;
  const int64_t r0 = int64_t(blockIdx.y) * ROWS;
  const int rows = a.M - r0 < ROWS ? int(a.M - r0) : ROWS;
  const T* x = static_cast<const T*>(a.x) + r0 * a.ldx;
  float acc[ROWS], acc_d[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = acc_d[r] = 0.0f;

  if (n < a.N) {
    const T* wn = static_cast<const T*>(a.w) + n * a.ldw;
    const T* dwn = HAS_DW ? static_cast<const T*>(a.dw) + n * a.lddw : nullptr;
    const int64_t step = int64_t(warps_per_col) * 32 * VEC;
    for (int64_t k = (int64_t(kslice) * 32 + lane) * VEC; k < a.K; k += step) {
      float wv[VEC], dv[VEC];
      load_vec<T, VEC>(wn + k, wv);  // one read of this weight slice serves every row
      if constexpr (HAS_DW) load_vec<T, VEC>(dwn + k, dv);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < rows) {
          float xv[VEC];
          load_vec<T, VEC>(x + r * a.ldx + k, xv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            acc[r] = fmaf(xv[i], wv[i], acc[r]);
            if constexpr (HAS_DW) acc_d[r] = fmaf(xv[i], dv[i], acc_d[r]);
          }
        }
      }
    }
  }
  // Reduce over the warp, then over the warps that split K for this column.
  __shared__ float red[kWarps][ROWS][2];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
      if constexpr (HAS_DW) acc_d[r] += __shfl_xor_sync(0xffffffffu, acc_d[r], off);
    }
    if (lane == 0) {
      red[warp][r][0] = acc[r];
      red[warp][r][1] = acc_d[r];
    }
  }
  __syncthreads();
  if (kslice != 0 || n >= a.N) return;
  const T* bias = static_cast<const T*>(a.bias);
  const T* dbias = static_cast<const T*>(a.dbias);
  const T* lb = static_cast<const T*>(a.lb);
  for (int r = lane; r < rows; r += 32) {
    float s = 0.0f, sd = 0.0f;
    for (int w = warp; w < warp + warps_per_col; ++w) {
      s += red[w][r][0];
      sd += red[w][r][1];
    }
    if (!HAS_DW && a.xa != nullptr) {  // LoRA: (x·Aᵀ)·B_n over the rank
      for (int64_t j = 0; j < a.rank; ++j) sd = fmaf(a.xa[(r0 + r) * a.rank + j], to_f<T>(lb[n * a.ldlb + j]), sd);
    }
    const float m1 = a.m1_rows ? a.m1_rows[r0 + r] : a.m1;
    const float m2 = a.m2_rows ? a.m2_rows[r0 + r] : a.m2;
    const float out = steered_epilogue(s, sd, m1, bias ? to_f<T>(bias[n]) : 0.0f, dbias ? to_f<T>(dbias[n]) : 0.0f, m2);
    static_cast<T*>(a.y)[(r0 + r) * a.ldy + n] = from_f<T>(out);
  }
}

template <typename T, int ROWS, int VEC>
void launch_rows(const SteeredArgs& a, cudaStream_t stream) {
  // Narrow outputs: four warps split K for one column; wide ones: one column per warp.
  const int warps_per_col = a.N < 2048 ? kWarps : 1;
  const int cols_per_block = kWarps / warps_per_col;
  dim3 grid(unsigned((a.N + cols_per_block - 1) / cols_per_block), unsigned((a.M + ROWS - 1) / ROWS));
  if (a.dw)
    steered_gemv_kernel<T, ROWS, VEC, true><<<grid, kWarps * 32, 0, stream>>>(a, warps_per_col);
  else
    steered_gemv_kernel<T, ROWS, VEC, false><<<grid, kWarps * 32, 0, stream>>>(a, warps_per_col);
}

template <typename T, int VEC>
void launch_vec(const SteeredArgs& a, cudaStream_t stream) {
  if (a.M <= 1) return launch_rows<T, 1, VEC>(a, stream);
  if (a.M <= 2) return launch_rows<T, 2, VEC>(a, stream);
  if (a.M <= 4) return launch_rows<T, 4, VEC>(a, stream);
  if (a.M <= 8) return launch_rows<T, 8, VEC>(a, stream);
  if (a.M <= 16) return launch_rows<T, 16, VEC>(a, stream);
  return launch_rows<T, 32, VEC>(a, stream);  // more rows: blocks of 32 (weights read once per 32 rows)
}

bool aligned16(const void* p, int64_t ld_bytes) {
  return p == nullptr || ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && (ld_bytes % 16 == 0));
}

template <typename T>
void launch_type(const SteeredArgs& a, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t es = sizeof(T);
  const bool vec = a.K % V == 0 && aligned16(a.x, a.ldx * es) && aligned16(a.w, a.ldw * es) &&
                   aligned16(a.dw, a.lddw * es);
  if (vec)
    launch_vec<T, V>(a, stream);
  else
    launch_vec<T, 1>(a, stream);
}

}  // namespace

void steered_gemv_cuda(const SteeredArgs& a, void* stream_ptr) {
  if (a.M == 0 || a.N == 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (a.dtype) {
    case kF32: launch_type<float>(a, stream); break;
    case kF16: launch_type<__half>(a, stream); break;
    case kBF16: launch_type<__nv_bfloat16>(a, stream); break;
    default: throw std::invalid_argument("steered_gemv_cuda: dtype must be float32, float16 or bfloat16");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("steered_gemv_cuda: ") + cudaGetErrorString(err));
}

}  // namespace fastsplit
