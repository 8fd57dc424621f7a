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

#include <cmath>
#include <cstdint>
#include <vector>

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

std::vector<int64_t> shape_of(int index, const int *ndims, int64_t **shapes) {
  return std::vector<int64_t>(shapes[index], shapes[index] + ndims[index]);
}

}  // namespace

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

// (x) -> x * Phi(x): exact GELU, Phi(x) = (1 + erf(x / sqrt 2)) / 2.
extern "C" int Q8Gelu(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = elements(0, ndims, shapes);
#pragma omp simd
  for (int64_t i = 0; i < n; i++) y[i] = x[i] * (0.5f * (1.0f + erff(x[i] * kSqrtHalf)));
  return 0;
}

// (x, dy) -> dy * (Phi(x) + x * phi(x)): GELU's derivative times the incoming gradient.
extern "C" int Q8GeluGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = elements(0, ndims, shapes);
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    const float cdf = 0.5f * (1.0f + erff(x[i] * kSqrtHalf));
    const float pdf = expf(x[i] * x[i] * -0.5f) * kInvSqrt2Pi;
    dx[i] = dy[i] * (cdf + x[i] * pdf);
  }
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
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    float v = x[i] * scale;
    v = v < -qmax ? -qmax : v;
    v = v > qmax ? qmax : v;
    q[i] = std::rint(v);
  }
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
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    const float grad = g[i] * clip;
    const float mi = m[i] + one_minus_beta1 * (grad - m[i]);
    const float vi = v[i] * beta2 + one_minus_beta2 * grad * grad;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay + neg_step * (mi / (std::sqrt(vi) / bc2_sqrt + eps));
  }
  *static_cast<float *>(params[6]) = 0.0f;
  return 0;
}
