// CPU build of the SPLIT epilogue: online log-sum-exp, target logit, in-place dlogits, row reductions.
#include <stdexcept>

#include "fastsplit/kernels.h"
#include "fastsplit/tile_math.h"

namespace fastsplit {

static void need_f32(int dtype, const char* who) {
  if (dtype != kF32) throw std::invalid_argument(std::string(who) + ": the CPU build takes float32");
}

void split_lse_cpu(const LseArgs& a) {
  need_f32(a.dtype, "split_lse_cpu");
  const float* z = static_cast<const float*>(a.z);
  for (int64_t c = 0; c < a.C; ++c) {
    LseState st{a.run_max[c], a.run_sum[c]};
    const float* row = z + c * a.ldz;
    const int64_t t = a.tgt[c];
    for (int64_t v = 0; v < a.Vc; ++v) {
      const float zc = softcap(row[v], a.softcap);
      lse_push(st, zc);
      if (v == t) a.z_tgt[c] = zc;
    }
    a.run_max[c] = st.m;
    a.run_sum[c] = st.s;
  }
}

void split_grad_cpu(const GradArgs& a) {
  need_f32(a.dtype, "split_grad_cpu");
  float* z = static_cast<float*>(a.z);
  for (int64_t c = 0; c < a.C; ++c) {
    float* row = z + c * a.ldz;
    const int64_t t = a.tgt[c];
    for (int64_t v = 0; v < a.Vc; ++v) row[v] = dlogit(softcap(row[v], a.softcap), a.lse[c], v == t, a.softcap);
  }
}

void split_reduce_cpu(const ReduceArgs& a) {
  float* s = a.sums;  // [4, B]: pos sum, pos count, neg sum, neg count
  const int64_t B = a.pair ? a.B : 1;
  for (int64_t i = 0; i < a.n_pos; ++i) {
    if (a.rows_pos[i] < 0) continue;  // a masked token
    const int64_t r = a.pair ? a.rows_pos[i] : 0;
    s[r] += a.nll_pos[i];
    s[B + r] += 1.0f;
  }
  for (int64_t i = 0; i < a.n_neg; ++i) {
    if (a.rows_neg[i] < 0) continue;
    const int64_t r = a.pair ? a.rows_neg[i] : 0;
    s[2 * B + r] += a.nll_neg[i];
    s[3 * B + r] += 1.0f;
  }
  float total = 0.0f;
  for (int64_t r = 0; r < B; ++r) {
    const float pos = s[r] / s[B + r], neg = s[2 * B + r] / s[3 * B + r];
    float cp, cn;
    bool act;
    total += split_pair_loss(pos, neg, a.lambda_p, a.lambda_n, a.gamma, a.theta, &cp, &cn, &act);
    a.pos_mean[r] = pos;
    a.neg_mean[r] = neg;
    a.active[r] = act;
    s[r] = cp / (s[B + r] * B);  // reuse the sum slots for the per-token coefficients of this row
    s[2 * B + r] = cn / (s[3 * B + r] * B);
  }
  for (int64_t i = 0; i < a.n_pos; ++i) a.coef_pos[i] = a.rows_pos[i] < 0 ? 0.0f : s[a.pair ? a.rows_pos[i] : 0];
  for (int64_t i = 0; i < a.n_neg; ++i)
    a.coef_neg[i] = a.rows_neg[i] < 0 ? 0.0f : s[2 * B + (a.pair ? a.rows_neg[i] : 0)];
  *a.loss = total / B;
}

}  // namespace fastsplit
