// CPU build of the steered skinny GEMM: the same epilogue arithmetic as the CUDA kernel (tile_math.h).
#include <stdexcept>

#include "fastsplit/kernels.h"
#include "fastsplit/tile_math.h"

namespace fastsplit {

void steered_gemv_cpu(const SteeredArgs& a) {
  if (a.dtype != kF32) throw std::invalid_argument("steered_gemv_cpu: the CPU build takes float32");
  const float* x = static_cast<const float*>(a.x);
  const float* w = static_cast<const float*>(a.w);
  const float* dw = static_cast<const float*>(a.dw);
  const float* lb = static_cast<const float*>(a.lb);
  const float* bias = static_cast<const float*>(a.bias);
  const float* dbias = static_cast<const float*>(a.dbias);
  float* y = static_cast<float*>(a.y);
  for (int64_t n = 0; n < a.N; ++n) {  // each weight row is read once for all rows of x
    const float* wn = w + n * a.ldw;
    const float* dwn = dw ? dw + n * a.lddw : nullptr;
    for (int64_t r = 0; r < a.M; ++r) {
      const float* xr = x + r * a.ldx;
      float acc = 0.0f, acc_d = 0.0f;
      for (int64_t k = 0; k < a.K; ++k) acc += xr[k] * wn[k];
      if (dwn) {
        for (int64_t k = 0; k < a.K; ++k) acc_d += xr[k] * dwn[k];
      } else if (a.xa) {
        for (int64_t j = 0; j < a.rank; ++j) acc_d += a.xa[r * a.rank + j] * lb[n * a.ldlb + j];
      }
      const float m1 = a.m1_rows ? a.m1_rows[r] : a.m1;
      const float m2 = a.m2_rows ? a.m2_rows[r] : a.m2;
      y[r * a.ldy + n] = steered_epilogue(acc, acc_d, m1, bias ? bias[n] : 0.0f, dbias ? dbias[n] : 0.0f, m2);
    }
  }
}

}  // namespace fastsplit
