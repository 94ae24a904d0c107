// SPLIT loss epilogue over logits chunks that cuBLAS produced (torch.matmul): online log-sum-exp across
// vocab chunks, target logit, dlogits written in place, and the row/batch reductions with hinge coefficients.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fastsplit/kernels.h"
#include "fastsplit/tile_math.h"

namespace fastsplit {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float ld(const T* p);
template <> __device__ __forceinline__ float ld<float>(const float* p) { return *p; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename T> __device__ __forceinline__ void st(T* p, float v);
template <> __device__ __forceinline__ void st<float>(float* p, float v) { *p = v; }
template <> __device__ __forceinline__ void st<__half>(__half* p, float v) { *p = __float2half(v); }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// One block per row: each thread keeps its own online (max, sum), then the block merges them.
template <typename T>
__global__ void __launch_bounds__(kThreads) split_lse_kernel(LseArgs a) {
  const int64_t c = blockIdx.x;
  const T* row = static_cast<const T*>(a.z) + c * a.ldz;
  const int64_t t = a.tgt[c];
  LseState s = lse_empty();
  for (int64_t v = threadIdx.x; v < a.Vc; v += kThreads) {
    const float zc = softcap(ld<T>(row + v), a.softcap);
    lse_push(s, zc);
    if (v == t) a.z_tgt[c] = zc;
  }
  __shared__ float sm[kThreads], ss[kThreads];
  sm[threadIdx.x] = s.m;
  ss[threadIdx.x] = s.s;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) {
      LseState m = lse_merge(LseState{sm[threadIdx.x], ss[threadIdx.x]},
                             LseState{sm[threadIdx.x + off], ss[threadIdx.x + off]});
      sm[threadIdx.x] = m.m;
      ss[threadIdx.x] = m.s;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    LseState m = lse_merge(LseState{a.run_max[c], a.run_sum[c]}, LseState{sm[0], ss[0]});
    a.run_max[c] = m.m;
    a.run_sum[c] = m.s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) split_grad_kernel(GradArgs a) {
  const int64_t c = blockIdx.y;
  const int64_t v = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (v >= a.Vc) return;
  T* p = static_cast<T*>(a.z) + c * a.ldz + v;
  st<T>(p, dlogit(softcap(ld<T>(p), a.softcap), a.lse[c], v == a.tgt[c], a.softcap));
}

// Phase 1: per-row sums and counts (atomics into the zeroed workspace). Phase 2 (one block): means, hinge,
// loss. Phase 3: per-token coefficients.
__global__ void split_sums_kernel(ReduceArgs a) {
  const int64_t B = a.pair ? a.B : 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.n_pos + a.n_neg;
       i += int64_t(gridDim.x) * blockDim.x) {
    const bool pos = i < a.n_pos;
    const int64_t j = pos ? i : i - a.n_pos;
    const int64_t row = pos ? a.rows_pos[j] : a.rows_neg[j];
    if (row < 0) continue;  // a masked token
    const int64_t r = a.pair ? row : 0;
    atomicAdd(a.sums + (pos ? 0 : 2 * B) + r, pos ? a.nll_pos[j] : a.nll_neg[j]);
    atomicAdd(a.sums + (pos ? B : 3 * B) + r, 1.0f);
  }
}

__global__ void split_hinge_kernel(ReduceArgs a) {
  const int64_t B = a.pair ? a.B : 1;
  __shared__ float total;
  if (threadIdx.x == 0) total = 0.0f;
  __syncthreads();
  for (int64_t r = threadIdx.x; r < B; r += blockDim.x) {
    float* s = a.sums;
    const float pos = s[r] / s[B + r], neg = s[2 * B + r] / s[3 * B + r];
    float cp, cn;
    bool act;
    atomicAdd(&total, split_pair_loss(pos, neg, a.lambda_p, a.lambda_n, a.gamma, a.theta, &cp, &cn, &act));
    a.pos_mean[r] = pos;
    a.neg_mean[r] = neg;
    a.active[r] = act;
    s[r] = cp / (s[B + r] * B);
    s[2 * B + r] = cn / (s[3 * B + r] * B);
  }
  __syncthreads();
  if (threadIdx.x == 0) *a.loss = total / B;
}

__global__ void split_coef_kernel(ReduceArgs a) {
  const int64_t B = a.pair ? a.B : 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.n_pos + a.n_neg;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < a.n_pos) {
      const int64_t row = a.rows_pos[i];
      a.coef_pos[i] = row < 0 ? 0.0f : a.sums[a.pair ? row : 0];
    } else {
      const int64_t row = a.rows_neg[i - a.n_pos];
      a.coef_neg[i - a.n_pos] = row < 0 ? 0.0f : a.sums[2 * B + (a.pair ? row : 0)];
    }
  }
}

void check(const char* who) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(who) + ": " + cudaGetErrorString(err));
}

}  // namespace

void split_lse_cuda(const LseArgs& a, void* stream_ptr) {
  if (a.C == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream_ptr);
  switch (a.dtype) {
    case kF32: split_lse_kernel<float><<<unsigned(a.C), kThreads, 0, s>>>(a); break;
    case kF16: split_lse_kernel<__half><<<unsigned(a.C), kThreads, 0, s>>>(a); break;
    case kBF16: split_lse_kernel<__nv_bfloat16><<<unsigned(a.C), kThreads, 0, s>>>(a); break;
    default: throw std::invalid_argument("split_lse_cuda: dtype must be float32, float16 or bfloat16");
  }
  check("split_lse_cuda");
}

void split_grad_cuda(const GradArgs& a, void* stream_ptr) {
  if (a.C == 0 || a.Vc == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream_ptr);
  dim3 grid(unsigned((a.Vc + kThreads - 1) / kThreads), unsigned(a.C));
  switch (a.dtype) {
    case kF32: split_grad_kernel<float><<<grid, kThreads, 0, s>>>(a); break;
    case kF16: split_grad_kernel<__half><<<grid, kThreads, 0, s>>>(a); break;
    case kBF16: split_grad_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(a); break;
    default: throw std::invalid_argument("split_grad_cuda: dtype must be float32, float16 or bfloat16");
  }
  check("split_grad_cuda");
}

void split_reduce_cuda(const ReduceArgs& a, void* stream_ptr) {
  cudaStream_t s = static_cast<cudaStream_t>(stream_ptr);
  const int64_t n = a.n_pos + a.n_neg;
  const unsigned blocks = unsigned(n / kThreads + 1 < 1024 ? n / kThreads + 1 : 1024);
  split_sums_kernel<<<blocks, kThreads, 0, s>>>(a);
  split_hinge_kernel<<<1, kThreads, 0, s>>>(a);
  split_coef_kernel<<<blocks, kThreads, 0, s>>>(a);
  check("split_reduce_cuda");
}

}  // namespace fastsplit
