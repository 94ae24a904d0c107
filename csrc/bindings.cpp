// pybind11 module fastsplit._C: data pointers, shapes, strides and the CUDA stream come in as integers from
// Python, so the extension never touches torch's C++ ABI (see csrc/README.md).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "fastsplit/kernels.h"

namespace py = pybind11;
using fastsplit::GradArgs;
using fastsplit::LseArgs;
using fastsplit::ReduceArgs;

#ifndef FASTSPLIT_CUDA_ARCHS
#define FASTSPLIT_CUDA_ARCHS ""
#endif

template <typename P>
static P ptr(std::uintptr_t p) {
  return reinterpret_cast<P>(p);
}

static bool cuda_built() {
#ifdef FASTSPLIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

static void need_cuda(const char* who) {
  if (!cuda_built()) throw std::runtime_error(std::string(who) + ": this build has no CUDA kernels");
}

static std::vector<std::string> cuda_archs() {
  std::vector<std::string> out;
  std::string s = FASTSPLIT_CUDA_ARCHS, cur;
  for (char ch : s) {
    if (ch == ';' || ch == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(ch);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastsplit native kernels: the SPLIT loss epilogue";
  m.def("cuda_built", &cuda_built);
  m.def("cuda_archs", &cuda_archs);

  m.def("split_lse",
        [](bool on_cuda, int dtype, std::uintptr_t z, int64_t ldz, int64_t C, int64_t Vc, std::uintptr_t tgt,
           float softcap, std::uintptr_t run_max, std::uintptr_t run_sum, std::uintptr_t z_tgt, std::uintptr_t stream) {
          LseArgs a{ptr<const void*>(z), ldz, C, Vc, ptr<const int64_t*>(tgt), softcap, ptr<float*>(run_max),
                    ptr<float*>(run_sum), ptr<float*>(z_tgt), dtype};
          if (!on_cuda) return fastsplit::split_lse_cpu(a);
          need_cuda("split_lse");
#ifdef FASTSPLIT_WITH_CUDA
          fastsplit::split_lse_cuda(a, ptr<void*>(stream));
#endif
        });

  m.def("split_grad",
        [](bool on_cuda, int dtype, std::uintptr_t z, int64_t ldz, int64_t C, int64_t Vc, std::uintptr_t tgt,
           float softcap, std::uintptr_t lse, std::uintptr_t stream) {
          GradArgs a{ptr<void*>(z), ldz, C, Vc, ptr<const int64_t*>(tgt), softcap, ptr<const float*>(lse), dtype};
          if (!on_cuda) return fastsplit::split_grad_cpu(a);
          need_cuda("split_grad");
#ifdef FASTSPLIT_WITH_CUDA
          fastsplit::split_grad_cuda(a, ptr<void*>(stream));
#endif
        });

  m.def("split_reduce",
        [](bool on_cuda, std::uintptr_t nll_pos, std::uintptr_t rows_pos, int64_t n_pos, std::uintptr_t nll_neg,
           std::uintptr_t rows_neg, int64_t n_neg, int64_t B, bool pair, float lp, float ln, float gamma, float theta,
           std::uintptr_t sums, std::uintptr_t pos_mean, std::uintptr_t neg_mean, std::uintptr_t active,
           std::uintptr_t coef_pos, std::uintptr_t coef_neg, std::uintptr_t loss, std::uintptr_t stream) {
          ReduceArgs a{ptr<const float*>(nll_pos), ptr<const int64_t*>(rows_pos), n_pos, ptr<const float*>(nll_neg),
                       ptr<const int64_t*>(rows_neg), n_neg, B, pair, lp, ln, gamma, theta, ptr<float*>(sums),
                       ptr<float*>(pos_mean), ptr<float*>(neg_mean), ptr<uint8_t*>(active), ptr<float*>(coef_pos),
                       ptr<float*>(coef_neg), ptr<float*>(loss)};
          if (!on_cuda) return fastsplit::split_reduce_cpu(a);
          need_cuda("split_reduce");
#ifdef FASTSPLIT_WITH_CUDA
          fastsplit::split_reduce_cuda(a, ptr<void*>(stream));
#endif
        });
}
