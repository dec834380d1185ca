// The proximal map of gl_sp_fisher on the CPU, one group (row) at a time: spbench.penalties'
// safeguarded Newton solve (_fisher_prox_mu: the same start, step, bracket and stopping rule),
// with the row held in the cache from its first pass to its last, where the torch operations
// make a pass over the whole tensor for every operation. Built on first use by
// spbench.native (torch.utils.cpp_extension.load).
//
// For each row g of p, w0 and F (each [rows, K], contiguous, float32 or float64):
//   d = p - w0, F floored at 1e-30, a = F d^2, ts = t sqrt(K);
//   u = 0 where sum d^2/F <= ts^2, else u = d mu/(mu + F) with mu > 0 the root of
//   N(mu) = ts, N(mu)^2 = sum a/(mu + F)^2; p <- w0 + u.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// The hot loops are built for AVX2 and for the baseline instruction set, the right one chosen
// at run time: the build cache may be shared by machines of different generations.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPBENCH_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SPBENCH_CLONES
#endif

template <typename T>
SPBENCH_CLONES void rows_prox(T* p, const T* w0, const T* f, int64_t begin, int64_t end, int64_t k, T ts,
                              int64_t max_iterations, T* work) {
  const T eps = std::numeric_limits<T>::epsilon();
  const T tol = T(32) * eps, quad_tol = T(0.5) * std::sqrt(T(4) * eps);
  const T tiny = std::numeric_limits<T>::min(), floor_f = T(1e-30);
  T* a = work;
  T* ff = work + k;
  for (int64_t i = begin; i < end; ++i) {
    T* pr = p + i * k;
    const T* wr = w0 + i * k;
    const T* fr = f + i * k;
    T sum_a = 0, sum_af = 0;
#pragma omp simd reduction(+ : sum_a, sum_af)
    for (int64_t j = 0; j < k; ++j) {
      const T fj = fr[j] < floor_f ? floor_f : fr[j];
      const T dj = pr[j] - wr[j];
      const T aj = dj * dj * fj;
      a[j] = aj;
      ff[j] = fj;
      sum_a += aj;
      sum_af += aj * fj;
    }
    // _newton_start: mu0 = max(0, ||F^1/2 d||/ts - mean of F weighted by a), bracket [0, hi].
    // Where mu0 > 0 the group leaves 0 (N(0) >= N(mu0) >= ts); where mu0 = 0 the first step,
    // taken at mu = 0, computes N(0)^2 = sum d^2/F: the zero test.
    T hi = std::sqrt(sum_a) / ts, lo = 0;
    T mu = hi - sum_af / (sum_a > tiny ? sum_a : tiny);
    if (!(mu > 0)) mu = 0;
    bool live = mu > 0;
    for (int64_t it = 0; it < max_iterations; ++it) {
      T s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s2, s3)
      for (int64_t j = 0; j < k; ++j) {
        const T q = T(1) / (ff[j] + mu);
        const T v = a[j] * q * q;
        s2 += v;
        s3 += v * q;
      }
      if (!live) {
        if (!(s2 > ts * ts)) break;  // a zero group: mu stays 0, u = 0
        live = true;
      }
      // _newton_update
      const T n = std::sqrt(s2);
      if (n > ts) lo = mu; else hi = mu;
      T next = mu + (n - ts) / ts * s2 / s3;
      if (!(next >= lo && next <= hi)) next = (lo + hi) / 2;  // also when NaN (0/0)
      const bool done = std::fabs(next - mu) <= quad_tol * next || std::fabs(n - ts) <= tol * ts;
      mu = next;
      if (done) break;
    }
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) pr[j] = wr[j] + (pr[j] - wr[j]) * (mu / (ff[j] + mu));
  }
}

void fisher_group_prox_(torch::Tensor p, const torch::Tensor& w0, const torch::Tensor& f, double t,
                        int64_t max_iterations) {
  TORCH_CHECK(p.device().is_cpu() && w0.device().is_cpu() && f.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(p.dim() == 2 && p.sizes() == w0.sizes() && p.sizes() == f.sizes(),
              "p, w0 and F must be [rows, K] of one shape");
  TORCH_CHECK(p.scalar_type() == w0.scalar_type() && p.scalar_type() == f.scalar_type(), "one dtype");
  TORCH_CHECK(p.is_contiguous() && w0.is_contiguous() && f.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(t > 0 && max_iterations > 0, "t and max_iterations must be positive");
  const int64_t rows = p.size(0), k = p.size(1);
  if (rows == 0 || k == 0) return;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "fisher_group_prox_", [&] {
    const scalar_t ts = static_cast<scalar_t>(t * std::sqrt(static_cast<double>(k)));
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* ww = w0.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / k);  // rows of about 64K elements a task
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work(2 * k);
      rows_prox<scalar_t>(pp, ww, fp, begin, end, k, ts, max_iterations, work.data());
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fisher_group_prox_", &fisher_group_prox_, "gl_sp_fisher's proximal map, in place, one row at a time",
        py::arg("p"), py::arg("w0"), py::arg("f"), py::arg("t"), py::arg("max_iterations"));
}
