// Launcher declarations. Plain pointers, shapes, strides and a stream: no torch types, so one build of the
// extension serves every torch version (see csrc/README.md).
#pragma once

#include <cstdint>

namespace fastsplit {

// SPLIT epilogue over one logits chunk z [C, V] (row stride ldz): merge the chunk into the running
// (max, sumexp) of each row and record the target logit.
struct LseArgs {
  const void* z; int64_t ldz; int64_t C; int64_t Vc;
  const int64_t* tgt; float softcap;
  float* run_max; float* run_sum; float* z_tgt;
  int dtype;
};

// dlogits = (softmax - onehot)·cap' written in place over z, given each row's final lse.
struct GradArgs {
  void* z; int64_t ldz; int64_t C; int64_t Vc;
  const int64_t* tgt; float softcap; const float* lse;
  int dtype;
};

// Per-row (pair) or pooled (batch) means of token NLLs, the hinge, the loss and per-token coefficients.
// rows_* [n] give each token's batch row, or -1 for a masked token: it is not counted and its coefficient is 0.
struct ReduceArgs {
  const float* nll_pos; const int64_t* rows_pos; int64_t n_pos;
  const float* nll_neg; const int64_t* rows_neg; int64_t n_neg;
  int64_t B; bool pair;
  float lambda_p, lambda_n, gamma, theta;
  float* sums;       // workspace [4·B] zero-initialised: pos sum, pos count, neg sum, neg count per row
  float* pos_mean;   // [B] (pair) or [1]
  float* neg_mean;
  uint8_t* active;
  float* coef_pos;   // [n_pos]
  float* coef_neg;   // [n_neg]
  float* loss;       // [1]
};

void split_lse_cpu(const LseArgs& a);
void split_grad_cpu(const GradArgs& a);
void split_reduce_cpu(const ReduceArgs& a);

#ifdef FASTSPLIT_WITH_CUDA
void split_lse_cuda(const LseArgs& a, void* stream);
void split_grad_cuda(const GradArgs& a, void* stream);
void split_reduce_cuda(const ReduceArgs& a, void* stream);
#endif

}  // namespace fastsplit
