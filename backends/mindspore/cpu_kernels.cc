// Fused float32 CPU kernels for the MindSpore backend, called as MindSpore AOT custom operators
// (mindspore.ops.Custom(func_type="aot")); built and loaded by cpu_kernels.py.
//
// Each replaces a chain of MindSpore CPU kernels that each read and write the whole tensor (or, for erf,
// a scalar loop): one vectorised pass instead. Every function has MindSpore's AOT signature: inputs then
// outputs in `params`, their ranks in `ndims` and shapes in `shapes`; it returns 0.
//
// Exactness: compiled with -ffp-contract=off (no fused multiply-add) and without -ffast-math, so
// Q8MaxAbs and Q8Quantize give the NumPy reference's bits (q8core/reference.py): one float32 product,
// a clamp to integer bounds, a round half to even (rintf in the default rounding mode). The GELU
// kernels call glibc's vector erff/expf (libmvec) through the OpenMP SIMD declarations below, within
// a few float32 ulps of the scalar functions.

#include <algorithm>
#include <atomic>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#ifdef Q8_DNNL
// oneDNN's row-major single-precision GEMM (MindSpore ships oneDNN as lib/libdnnl.so.3; cpu_kernels.py links
// it where found): C = alpha * op(A) * op(B) + beta * C; returns dnnl_success (0) or an error status.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);
#endif

#if defined(__x86_64__) && defined(__GLIBC__)
// libmvec's vector variants (glibc >= 2.35 for erff): declared so the loops below vectorise.
extern "C" float erff(float) __attribute__((simd("notinbranch")));
extern "C" float expf(float) __attribute__((simd("notinbranch")));
#endif

namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;    // 1 / sqrt(2 pi)

int64_t elements(int index, const int *ndims, int64_t **shapes) {
  int64_t n = 1;
  for (int d = 0; d < ndims[index]; d++) n *= shapes[index][d];
  return n;
}

// Rows of a tensor normalised over its last axis: (rows, width).
void rows_and_width(int index, const int *ndims, int64_t **shapes, int64_t *rows, int64_t *width) {
  *width = ndims[index] ? shapes[index][ndims[index] - 1] : 1;
  *rows = *width ? elements(index, ndims, shapes) / *width : 0;
}

// One row's mean and 1 / sqrt(biased variance + eps), both passes in float32 (as torch's CPU LayerNorm).
void row_moments(const float *x, int64_t width, float eps, float *mean, float *rstd) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < width; j++) sum += x[j];
  const float mu = sum / static_cast<float>(width);
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t j = 0; j < width; j++) squares += (x[j] - mu) * (x[j] - mu);
  *mean = mu;
  *rstd = 1.0f / std::sqrt(squares / static_cast<float>(width) + eps);
}

std::vector<int64_t> shape_of(int index, const int *ndims, int64_t **shapes) {
  return std::vector<int64_t>(shapes[index], shapes[index] + ndims[index]);
}

// Threads of the kernels below (Q8SetThreads; cpu_kernels.py sets it when it loads the library).
int threads = 1;

// body(begin, end) over [0, n) split into at most `threads` contiguous parts of at least `grain` items,
// the last on the calling thread, every boundary a multiple of `align`. The results do not depend on the
// split -- the same bits on any thread count -- provided element loops split at multiples of the vector
// width (kAlign): libmvec's vector erff/expf and the scalar ones of a loop's remainder may differ in the
// last bit, so each element must land in the same kind of iteration whatever the split.
// (Every part, the caller's included, runs through one out-of-line copy of the body: inlined into the
// caller with a constant start, the compiler may vectorise a reduction with other partial sums, which
// changes the last bits of LayerNorm's gradient.)
template <typename Body>
__attribute__((noinline)) void run_part(const Body &body, int64_t begin, int64_t end) {
  body(begin, end);
}

template <typename Body>
void parallel_for(int64_t n, int64_t grain, const Body &body, int64_t align = 1) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(grain, 1)));
  if (parts == 1) {
    run_part(body, int64_t{0}, n);
    return;
  }
  auto bound = [=](int64_t p) { return p == parts ? n : n * p / parts / align * align; };
  // the caller's floating-point environment (rounding mode, flush-to-zero), whatever its thread set, so
  // that every part computes as the caller would
  std::fenv_t caller;
  std::fegetenv(&caller);
  std::vector<std::thread> workers;
  for (int64_t p = 0; p + 1 < parts; p++) {
    workers.emplace_back([&body, &caller](int64_t begin, int64_t end) {
      std::fesetenv(&caller);
      run_part(body, begin, end);
    }, bound(p), bound(p + 1));
  }
  run_part(body, bound(parts - 1), n);
  for (auto &worker : workers) worker.join();
}

constexpr int64_t kAlign = 64;  // elements: a multiple of every vector width (and of a 64-byte line)

constexpr int64_t kGrain = 32768;  // elements per thread, at least: below that a thread costs more than it saves

int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(width, 1)); }

}  // namespace

// Sets the kernels' thread count (at least 1).
extern "C" void Q8SetThreads(int count) { threads = count > 0 ? count : 1; }

// Output shapes, for graphs with dynamic shapes: MindSpore calls <name>InferShape for each kernel
// (the third argument is MindSpore's AotExtra, unused here).
extern "C" std::vector<int64_t> Q8GeluInferShape(int *ndims, int64_t **shapes, void *) {
  return shape_of(0, ndims, shapes);
}
extern "C" std::vector<int64_t> Q8GeluGradInferShape(int *ndims, int64_t **shapes, void *) {
  return shape_of(0, ndims, shapes);
}
extern "C" std::vector<int64_t> Q8MaxAbsInferShape(int *, int64_t **, void *) { return {}; }
extern "C" std::vector<int64_t> Q8QuantizeInferShape(int *ndims, int64_t **shapes, void *) {
  return shape_of(0, ndims, shapes);
}
extern "C" std::vector<int64_t> Q8SumSquaresInferShape(int *, int64_t **, void *) { return {}; }
extern "C" std::vector<int64_t> Q8AdamWInferShape(int *, int64_t **, void *) { return {}; }
extern "C" std::vector<int64_t> Q8LayerNormInferShape(int *ndims, int64_t **shapes, void *) {
  return shape_of(0, ndims, shapes);
}
extern "C" std::vector<int64_t> Q8LayerNormGradInferShape(int *ndims, int64_t **shapes, void *) {
  return shape_of(0, ndims, shapes);
}
extern "C" std::vector<int64_t> Q8LayerNormParamGradInferShape(int *ndims, int64_t **shapes, void *) {
  return {2, shapes[0][ndims[0] - 1]};
}
extern "C" std::vector<int64_t> Q8MaskedSoftmaxInferShape(int *ndims, int64_t **shapes, void *) {
  return shape_of(0, ndims, shapes);
}
extern "C" std::vector<int64_t> Q8SoftmaxGradInferShape(int *ndims, int64_t **shapes, void *) {
  return shape_of(0, ndims, shapes);
}
#ifdef Q8_DNNL
extern "C" std::vector<int64_t> Q8MatMulNTInferShape(int *, int64_t **shapes, void *) {
  return {shapes[0][0], shapes[1][0]};
}
extern "C" std::vector<int64_t> Q8MatMulNNInferShape(int *, int64_t **shapes, void *) {
  return {shapes[0][0], shapes[1][1]};
}
extern "C" std::vector<int64_t> Q8MatMulTNInferShape(int *, int64_t **shapes, void *) {
  return {shapes[0][1], shapes[1][1]};
}
#endif
extern "C" std::vector<int64_t> Q8DequantizeInferShape(int *ndims, int64_t **shapes, void *) {
  return shape_of(0, ndims, shapes);
}

// (x) -> x * Phi(x): exact GELU, Phi(x) = (1 + erf(x / sqrt 2)) / 2.
extern "C" int Q8Gelu(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = elements(0, ndims, shapes);
  parallel_for(n, kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) y[i] = x[i] * (0.5f * (1.0f + erff(x[i] * kSqrtHalf)));
  }, kAlign);
  return 0;
}

// (x, dy) -> dy * (Phi(x) + x * phi(x)): GELU's derivative times the incoming gradient.
extern "C" int Q8GeluGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = elements(0, ndims, shapes);
  parallel_for(n, kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
      const float cdf = 0.5f * (1.0f + erff(x[i] * kSqrtHalf));
      const float pdf = expf(x[i] * x[i] * -0.5f) * kInvSqrt2Pi;
      dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
  }, kAlign);
  return 0;
}

// (x) -> max|x| (0 for an empty tensor), shape ().
extern "C" int Q8MaxAbs(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const int64_t n = elements(0, ndims, shapes);
  float m = 0.0f;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; i++) {
    const float a = std::fabs(x[i]);
    m = a > m ? a : m;
  }
  *static_cast<float *>(params[1]) = m;
  return 0;
}

// (x, scale, qmax) -> clamp(round_half_even(x * scale), -qmax, qmax) as float32 integers
// (scale and qmax: float32 scalars; qmax an integer, so clamping before rounding gives the same values).
extern "C" int Q8Quantize(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float scale = *static_cast<const float *>(params[1]);
  const float qmax = *static_cast<const float *>(params[2]);
  float *q = static_cast<float *>(params[3]);
  const int64_t n = elements(0, ndims, shapes);
  parallel_for(n, kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
      float v = x[i] * scale;
      v = v < -qmax ? -qmax : v;
      v = v > qmax ? qmax : v;
      q[i] = std::rint(v);
    }
  }, kAlign);
  return 0;
}

// (x) -> sum of x * x, shape (): a gradient's squared L2 norm, for clipping by the global norm.
extern "C" int Q8SumSquares(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const int64_t n = elements(0, ndims, shapes);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
  *static_cast<float *>(params[1]) = sum;
  return 0;
}

// (param, m, v, grad, clip, hyper) -> 0, shape (); updates param, m and v IN PLACE (the caller passes the
// optimizer's Parameters and keeps this kernel's output alive). One pass of torch.optim.AdamW's
// single-tensor step on the gradient scaled by `clip` (clip_grad_norm_'s coefficient), in torch's order:
//   p *= decay;  m += (1 - beta1) * (g - m);  v = v * beta2 + (1 - beta2) * g * g;
//   p += -step_size * (m / (sqrt(v) / sqrt(bias_correction2) + eps))
// hyper = [decay, 1 - beta1, beta2, 1 - beta2, sqrt(bias_correction2), eps, -step_size], float32.
extern "C" int Q8AdamW(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  float *p = static_cast<float *>(params[0]);
  float *m = static_cast<float *>(params[1]);
  float *v = static_cast<float *>(params[2]);
  const float *g = static_cast<const float *>(params[3]);
  const float clip = *static_cast<const float *>(params[4]);
  const float *h = static_cast<const float *>(params[5]);
  const float decay = h[0], one_minus_beta1 = h[1], beta2 = h[2], one_minus_beta2 = h[3];
  const float bc2_sqrt = h[4], eps = h[5], neg_step = h[6];
  const int64_t n = elements(0, ndims, shapes);
  parallel_for(n, kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
      const float grad = g[i] * clip;
      const float mi = m[i] + one_minus_beta1 * (grad - m[i]);
      const float vi = v[i] * beta2 + one_minus_beta2 * grad * grad;
      m[i] = mi;
      v[i] = vi;
      p[i] = p[i] * decay + neg_step * (mi / (std::sqrt(vi) / bc2_sqrt + eps));
    }
  }, kAlign);
  *static_cast<float *>(params[6]) = 0.0f;
  return 0;
}

// (x, weight, bias, eps) -> (x - mean) * rstd * weight + bias over the last axis (LayerNorm, biased variance).
extern "C" int Q8LayerNorm(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  int64_t rows, width;
  rows_and_width(0, ndims, shapes, &rows, &width);
  parallel_for(rows, row_grain(width), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *xr = x + r * width;
      float *yr = y + r * width;
      float mean, rstd;
      row_moments(xr, width, eps, &mean, &rstd);
#pragma omp simd
      for (int64_t j = 0; j < width; j++) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
    }
  });
  return 0;
}

// (x, weight, dy, eps) -> dx, LayerNorm's input gradient: with xhat = (x - mean) * rstd and g = dy * weight,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (row means over the last axis).
extern "C" int Q8LayerNormGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  int64_t rows, width;
  rows_and_width(0, ndims, shapes, &rows, &width);
  const float inv_width = 1.0f / static_cast<float>(width);
  parallel_for(rows, row_grain(width), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *xr = x + r * width, *dyr = dy + r * width;
      float *dxr = dx + r * width;
      float mean, rstd;
      row_moments(xr, width, eps, &mean, &rstd);
      float g_sum = 0.0f, gx_sum = 0.0f;
#pragma omp simd reduction(+ : g_sum, gx_sum)
      for (int64_t j = 0; j < width; j++) {
        const float g = dyr[j] * w[j];
        g_sum += g;
        gx_sum += g * ((xr[j] - mean) * rstd);
      }
      const float g_mean = g_sum * inv_width, gx_mean = gx_sum * inv_width;
#pragma omp simd
      for (int64_t j = 0; j < width; j++) {
        const float xhat = (xr[j] - mean) * rstd;
        dxr[j] = (dyr[j] * w[j] - g_mean - xhat * gx_mean) * rstd;
      }
    }
  });
  return 0;
}

// (x, dy, eps) -> [[sum over rows of dy * xhat], [sum over rows of dy]], shape (2, width): the gradients of
// LayerNorm's weight and bias.
extern "C" int Q8LayerNormParamGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                    void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  int64_t rows, width;
  rows_and_width(0, ndims, shapes, &rows, &width);
  float *dw = out, *db = out + width;
  for (int64_t j = 0; j < width; j++) dw[j] = db[j] = 0.0f;
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * width, *dyr = dy + r * width;
    float mean, rstd;
    row_moments(xr, width, eps, &mean, &rstd);
#pragma omp simd
    for (int64_t j = 0; j < width; j++) {
      dw[j] += dyr[j] * ((xr[j] - mean) * rstd);
      db[j] += dyr[j];
    }
  }
  return 0;
}

// (scores, additive, scale) -> softmax(scores * scale + additive) over the last axis: attention
// probabilities. scores: (batch, ..., keys); additive: the mask of each batch row's keys, batch * keys
// values (0 for a real token, a large negative number for padding) in any shape; scale: float32 scalar.
extern "C" int Q8MaskedSoftmax(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *scores = static_cast<const float *>(params[0]);
  const float *additive = static_cast<const float *>(params[1]);
  const float scale = *static_cast<const float *>(params[2]);
  float *probs = static_cast<float *>(params[3]);
  int64_t rows, keys;
  rows_and_width(0, ndims, shapes, &rows, &keys);
  const int64_t batch = ndims[0] ? shapes[0][0] : 1;
  const int64_t rows_per_batch = batch ? rows / batch : 0;
  parallel_for(rows, row_grain(keys), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *s = scores + r * keys;
      const float *mask = additive + (r / rows_per_batch) * keys;
      float *p = probs + r * keys;
      float top = -INFINITY;
#pragma omp simd reduction(max : top)
      for (int64_t k = 0; k < keys; k++) {
        const float z = s[k] * scale + mask[k];
        p[k] = z;
        top = z > top ? z : top;
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < keys; k++) {
        const float e = expf(p[k] - top);
        p[k] = e;
        sum += e;
      }
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t k = 0; k < keys; k++) p[k] *= inv;
    }
  });
  return 0;
}

// (probs, dprobs, scale) -> scale * probs * (dprobs - sum(probs * dprobs)) over the last axis: the gradient
// of Q8MaskedSoftmax's scores.
extern "C" int Q8SoftmaxGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *p = static_cast<const float *>(params[0]);
  const float *dp = static_cast<const float *>(params[1]);
  const float scale = *static_cast<const float *>(params[2]);
  float *ds = static_cast<float *>(params[3]);
  int64_t rows, keys;
  rows_and_width(0, ndims, shapes, &rows, &keys);
  parallel_for(rows, row_grain(keys), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *pr = p + r * keys, *dpr = dp + r * keys;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < keys; k++) dot += pr[k] * dpr[k];
#pragma omp simd
      for (int64_t k = 0; k < keys; k++) ds[r * keys + k] = pr[k] * (dpr[k] - dot) * scale;
    }
  });
  return 0;
}

// (acc, bias_q, s_b) -> (acc + bias_q) / s_b: the integer linear layer's int32 accumulator plus its int32
// bias (both float32 integers), back to float32 -- BiasAdd then RealDiv's bits in one pass.
extern "C" int Q8Dequantize(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *acc = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  const float s_b = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  int64_t rows, width;
  rows_and_width(0, ndims, shapes, &rows, &width);
  parallel_for(rows, row_grain(width), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
#pragma omp simd
      for (int64_t j = 0; j < width; j++) y[r * width + j] = (acc[r * width + j] + bias[j]) / s_b;
    }
  });
  return 0;
}

#ifdef Q8_DNNL
namespace {

// op(a) (m x k) times op(b) (k x n) into c (m x n), all row-major 2-D float32; a zero-sized product is
// zeros. oneDNN reaches 137-156 GFLOP/s per CPU here, MindSpore's own CPU MatMul about 100 (1536 x 768 x 768).
int gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float *a, const float *b, float *c) {
  if (m == 0 || n == 0) return 0;
  if (k == 0) {
    for (int64_t i = 0; i < m * n; i++) c[i] = 0.0f;
    return 0;
  }
  const int64_t lda = ta == 'N' ? k : m, ldb = tb == 'N' ? n : k;
  // MindSpore's oneDNN runs each call on one thread: split the rows of c over the threads (row i of op(a)
  // starts at a + i * lda untransposed, a + i transposed), at least 64 rows each
  std::atomic<int> status{0};
  parallel_for(m, 64, [&](int64_t begin, int64_t end) {
    const float *ap = a + (ta == 'N' ? begin * lda : begin);
    const int code = dnnl_sgemm(ta, tb, end - begin, n, k, 1.0f, ap, lda, b, ldb, 0.0f, c + begin * n, n);
    if (code) status = code;
  });
  return status;
}

}  // namespace

// (a, b) -> a . b^T: a (m, k), b (n, k), as nn.Linear's x . W^T.
extern "C" int Q8MatMulNT(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return gemm('N', 'T', shapes[0][0], shapes[1][0], shapes[0][1], static_cast<const float *>(params[0]),
              static_cast<const float *>(params[1]), static_cast<float *>(params[2]));
}

// (a, b) -> a . b: a (m, k), b (k, n).
extern "C" int Q8MatMulNN(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return gemm('N', 'N', shapes[0][0], shapes[1][1], shapes[0][1], static_cast<const float *>(params[0]),
              static_cast<const float *>(params[1]), static_cast<float *>(params[2]));
}

// (a, b) -> a^T . b: a (k, m), b (k, n), as a weight gradient dy^T . x.
extern "C" int Q8MatMulTN(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return gemm('T', 'N', shapes[0][1], shapes[1][1], shapes[0][0], static_cast<const float *>(params[0]),
              static_cast<const float *>(params[1]), static_cast<float *>(params[2]));
}
#endif
