// Per-element arithmetic shared by the CPU and CUDA builds. Everything here is __host__ __device__,
// so the CPU build that CI runs executes exactly the arithmetic the GPU kernels run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

namespace fastsplit {

// dtype codes passed from Python
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// Online log-sum-exp state: max and the sum of exp(z - max).
struct LseState {
  float m;
  float s;
};

FS_HD LseState lse_empty() { return LseState{-INFINITY, 0.0f}; }

FS_HD void lse_push(LseState& st, float z) {
  if (z > st.m) {
    st.s = st.s * expf(st.m - z) + 1.0f;  // rescale the old sum to the new max
    st.m = z;
  } else {
    st.s += expf(z - st.m);
  }
}

FS_HD LseState lse_merge(LseState a, LseState b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = a.m > b.m ? a.m : b.m;
  return LseState{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

FS_HD float lse_value(LseState st) { return st.m + logf(st.s); }

// Gemma-2 style logit soft-capping: c·tanh(z/c); c <= 0 means off.
FS_HD float softcap(float z, float c) { return c > 0.0f ? c * tanhf(z / c) : z; }

// d(c·tanh(z/c))/dz expressed through the capped value zc: 1 - (zc/c)².
FS_HD float softcap_grad(float zc, float c) {
  if (c <= 0.0f) return 1.0f;
  const float t = zc / c;
  return 1.0f - t * t;
}

// ∂NLL/∂z for one logit: (softmax - onehot) times the soft-cap derivative.
FS_HD float dlogit(float zc, float lse, bool is_target, float c) {
  const float p = expf(zc - lse);
  return (p - (is_target ? 1.0f : 0.0f)) * softcap_grad(zc, c);
}

// The SPLIT hinge: loss of one (pos, neg) pair of token-mean NLLs and its coefficients ∂loss/∂pos, ∂loss/∂neg.
FS_HD float split_pair_loss(float pos, float neg, float lp, float ln, float gamma, float theta, float* coef_pos,
                            float* coef_neg, bool* active) {
  const float margin = theta - (neg - pos);
  *active = margin > 0.0f;
  const float a = *active ? 1.0f : 0.0f;
  *coef_pos = lp + gamma * a;
  *coef_neg = ln - gamma * a;
  return lp * pos + ln * neg + gamma * (*active ? margin : 0.0f);
}

}  // namespace fastsplit
