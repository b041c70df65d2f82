// The torch backend's time loop in C++ (forward and BPTT backward), built at first use by
// hyperkern/ops/hyper_lstm/cpu/__init__.py with torch.utils.cpp_extension.
//
// fused_torch.py keeps everything around the loop (the hoisted x-projection GEMM, the buffers,
// the post-loop weight-gradient GEMMs); these two functions are its loop bodies, step for step the
// same as its eager Python loops (_eager_forward_loop / _eager_backward_loop), with the same buffers:
//
//   forward step t:  2 GEMMs (the chosen variant, see Gemm), then ONE parallel pass over the rows
//                    alive: hyper cell -> z -> the 12 scaling vectors (never stored) -> main cell.
//   backward step t: ONE parallel pass over chunks of ROWS rows (main cell, d/dz, hyper cell, then
//                    the chunk's share of every sum over the batch), then 2 GEMMs.
//
// Gate maths (per-gate LN, update, LN(c), h) is written once (Cell::forward / Cell::backward) for
// both cells, vectorised with ATen's Vectorized<T> over the K features of all four gates at once.
// Every reduction runs in a fixed order inside one thread, and the batch sums go through fixed
// chunks of rows (see ROWS), so results are bitwise repeatable, whatever the thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// GEMM: y = x @ W^T with the variant hyperkern/ops/hyper_lstm/cpu/gemm.py measured fastest.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// "dot": y = x @ W^T as one dot product per output (W [N, K] row-major as it is, nothing packed).
// At a batch of a few rows the product is a read of W (a GEMV): bandwidth-bound, and W stays in
// the last-level cache from step to step. 4 rows of W x up to 3 rows of x at a time (see dot_rows). Every output is the same fixed sequence of
// operations whatever block, thread or split computes it: bitwise repeatable at any thread count.
// ---------------------------------------------------------------------------------------------

template <typename T>
using VecT = at::vec::Vectorized<T>;

template <typename T, int R, int MB>
inline void dot_block(const T* x, int64_t ldx, const T* W, int64_t K, T* y, int64_t ldy) {
  constexpr int64_t L = VecT<T>::size();
  VecT<T> acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = VecT<T>(T(0));
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    VecT<T> xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = VecT<T>::loadu(x + m * ldx + k);
    for (int r = 0; r < R; ++r) {
      const VecT<T> w = VecT<T>::loadu(W + r * K + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = at::vec::fmadd(w, xv[m], acc[r][m]);
    }
  }
  if (k < K) {  // the tail: lanes past K load as 0
    VecT<T> xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = VecT<T>::loadu(x + m * ldx + k, K - k);
    for (int r = 0; r < R; ++r) {
      const VecT<T> w = VecT<T>::loadu(W + r * K + k, K - k);
      for (int m = 0; m < MB; ++m) acc[r][m] = at::vec::fmadd(w, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      y[m * ldy + r] = at::vec::vec_reduce_all<T>([](const VecT<T>& a, const VecT<T>& b) { return a + b; }, acc[r][m]);
}

// rows [n0, n1) of y [M, ldy] = x [M, K] (row stride ldx) @ W[N, K]^T. Blocks of 4 rows of W in
// the outer loop, all rows of x in the inner one: the 4 rows of W stay in L1 while every row of x
// passes (W is read from memory once, x from L1/L2 once per block); 4 x 3 blocks: 12 accumulator
// chains, 7 loads per 12 FMAs. Each output is the same chain of operations whatever block holds it
template <typename T>
void dot_rows(const T* x, int64_t ldx, int64_t M, const T* W, int64_t K, T* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) dot_block<T, 4, 3>(x + m * ldx, ldx, W + n * K, K, y + m * ldy + n, ldy);
    if (m + 2 <= M) dot_block<T, 4, 2>(x + m * ldx, ldx, W + n * K, K, y + m * ldy + n, ldy), m += 2;
    if (m < M) dot_block<T, 4, 1>(x + m * ldx, ldx, W + n * K, K, y + m * ldy + n, ldy);
  }
  for (; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) dot_block<T, 1, 2>(x + m * ldx, ldx, W + n * K, K, y + m * ldy + n, ldy);
    if (m < M) dot_block<T, 1, 1>(x + m * ldx, ldx, W + n * K, K, y + m * ldy + n, ldy);
  }
}

// One product of a pair: y [M, N] = x [M, K] @ W [N, K]^T, raw pointers (x's and y's rows strided,
// W dense): building it costs no tensor operation, so a step of a small shape pays none
struct DotJob {
  const void* x;
  int64_t ldx, M;
  const void* W;
  int64_t N, K;
  void* y;
  int64_t ldy;
};

inline DotJob dot_job(const Tensor& x, const Tensor& W, const Tensor& y) {
  TORCH_CHECK(x.stride(1) == 1 && W.is_contiguous() && y.stride(1) == 1 && x.scalar_type() == W.scalar_type() &&
              y.scalar_type() == W.scalar_type(), "dot: dense rows of one dtype expected");
  return DotJob{x.data_ptr(), x.stride(0), x.size(0), W.data_ptr(), W.size(0), W.size(1), y.data_ptr(), y.stride(0)};
}

// Both products of a step in ONE parallel region (one fork/join per step, the rows of both
// weights split evenly over the threads by bytes of W read)
template <typename T>
void dot_jobs(std::initializer_list<DotJob> jobs) {
  int64_t total = 0, start[4];
  int i = 0;
  for (const auto& j : jobs) {
    start[i++] = total;
    total += j.N * j.K * j.M;  // work ~ multiply-adds
  }
  if (total == 0) return;
  const int64_t units = 1024;  // the work split into units of ~total/1024 multiply-adds
  // a small product runs on this thread alone: a fork/join costs more than it saves
  const int64_t grain = total < 65536 ? units : 16;
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t e0 = total * u0 / units, e1 = total * u1 / units;
    int i = 0;
    for (const auto& j : jobs) {
      const int64_t per_row = j.K * j.M, s = start[i++];
      // rows of this job whose first multiply-add falls in [e0, e1)
      const int64_t r0 = std::min(j.N, std::max<int64_t>(0, (e0 - s + per_row - 1) / per_row));
      const int64_t r1 = std::min(j.N, std::max<int64_t>(0, (e1 - s + per_row - 1) / per_row));
      if (r0 < r1)
        dot_rows<T>(static_cast<const T*>(j.x), j.ldx, j.M, static_cast<const T*>(j.W), j.K, static_cast<T*>(j.y),
                    j.ldy, r0, r1);
    }
  });
}

struct Gemm {
  int64_t kind;   // 0: plain mm, 1: MKL-packed, 2: oneDNN-prepacked, 3: dot (see dot_rows)
  Tensor w;       // [out, in], the weight as it is
  Tensor packed;  // the packed weight (kinds 1 and 2)
  int64_t batch;  // the batch size it was packed for (kind 1's argument)

  // x [n, in] -> [n, out]; kind 0 writes into `out` (a [n, out] buffer), the others allocate.
  Tensor operator()(const Tensor& x, Tensor out) const {
    if (kind == 1) {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("mkl::_mkl_linear", "")
                           .typed<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                         const std::optional<Tensor>&, int64_t)>();
      return op.call(x.contiguous(), packed, w, std::nullopt, batch);
    }
    if (kind == 2) {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
      torch::jit::Stack stack{x.contiguous(), packed, c10::IValue(), c10::IValue(std::string("none")),
                              c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue(std::string(""))};
      op.callBoxed(&stack);
      return stack[0].toTensor();
    }
    if (kind == 3) {
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "hyper_lstm_dot", [&] { dot_jobs<scalar_t>({dot_job(x, w, out)}); });
      return out;
    }
    return at::mm_out(out, x, w.t());
  }
};

using GemmArg = std::tuple<int64_t, Tensor, std::optional<Tensor>, int64_t>;  // gemm.Linear.arg()

Gemm make_gemm(const GemmArg& g) {
  return Gemm{std::get<0>(g), std::get<1>(g), std::get<2>(g).value_or(Tensor()), std::get<3>(g)};
}

// ---------------------------------------------------------------------------------------------
// Vector helpers
// ---------------------------------------------------------------------------------------------

template <typename T>
using Vec = at::vec::Vectorized<T>;

// f(j, count) over [0, n) in vector-sized pieces (the last one partial)
template <typename T, typename F>
inline void vfor(int64_t n, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) f(j, W);
  if (j < n) f(j, n - j);
}

template <typename T>
inline Vec<T> ld(const T* p, int64_t count) {
  return Vec<T>::loadu(p, count);  // lanes past count are 0
}

// lanes past count set to 0 (so a partial vector adds nothing to a sum)
template <typename T>
inline Vec<T> head(const Vec<T>& v, int64_t count) {
  return count == Vec<T>::size() ? v : Vec<T>::set(Vec<T>(T(0)), v, count);
}

template <typename T>
inline T hsum(const Vec<T>& v) {  // a fixed shuffle tree: deterministic
  return at::vec::vec_reduce_all<T>([](const Vec<T>& x, const Vec<T>& y) { return x + y; }, v);
}

// σ and tanh from one exp each (Sleef's exp, 1 ulp): Sleef's own tanh costs ~4x an exp here
// (AVX-512, fp32: 23 ns against 6 ns per vector), and this form keeps the absolute error at a few
// ulp of 1 (it saturates cleanly: exp overflowing to inf gives 0 / ±1)
template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}

template <typename T>
inline Vec<T> tanh_(const Vec<T>& x) {  // 2 σ(2x) - 1
  const Vec<T> one(T(1)), two(T(2));
  return two / (one + (x * Vec<T>(T(-2))).exp()) - one;
}

// mean and 1/sqrt(biased var + eps) of p[0:K], two passes (SPEC's LN)
template <typename T>
inline void ln_stats(const T* p, int64_t K, T eps, T& mean, T& rstd) {
  Vec<T> acc(T(0));
  vfor<T>(K, [&](int64_t j, int64_t c) { acc += ld(p + j, c); });
  mean = hsum(acc) / T(K);
  Vec<T> acc2(T(0));
  const Vec<T> m(mean);
  vfor<T>(K, [&](int64_t j, int64_t c) {
    Vec<T> d = head(ld(p + j, c) - m, c);
    acc2 += d * d;
  });
  rstd = T(1) / std::sqrt(hsum(acc2) / T(K) + eps);
}

// ---------------------------------------------------------------------------------------------
// One gated cell (main: K = H, hyper: K = Hh), one row. Gate order i, f, g, o.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Cell {
  int64_t K;
  bool ln;
  T eps;
  const T* ln_w;   // [4, K] (ln)
  const T* shift;  // [4, K]: the LN bias with forget_bias added on f (ln), or forget_bias on f only
  const T* cw;     // [K] LN(c) weight, bias (ln)
  const T* cb;

  // the post-LN gate values of all 4 gates at columns [j, j+c)
  inline void gates(const T* a, const T* mean, const T* rstd, int64_t j, int64_t c, Vec<T> g[4]) const {
    for (int y = 0; y < 4; ++y) {
      Vec<T> v = ld(a + y * K + j, c);
      if (ln) v = (v - Vec<T>(mean[y])) * Vec<T>(rstd[y]) * ld(ln_w + y * K + j, c);
      g[y] = v + ld(shift + y * K + j, c);
    }
  }

  // a [4K] pre-activations, c_prev [K], mask [K] or null -> c [K], h [K]; stats [10]:
  // per-gate mean[4], rstd[4], LN(c) mean, rstd (written with ln only)
  void forward(const T* a, const T* c_prev, const T* mask, T* c, T* h, T* stats) const {
    T mean[4] = {0, 0, 0, 0}, rstd[4] = {1, 1, 1, 1};
    if (ln)
      for (int y = 0; y < 4; ++y) ln_stats(a + y * K, K, eps, mean[y], rstd[y]);
    vfor<T>(K, [&](int64_t j, int64_t n) {
      Vec<T> g[4];
      gates(a, mean, rstd, j, n, g);
      Vec<T> tg = tanh_(g[2]);
      if (mask) tg = tg * ld(mask + j, n);
      (sigmoid(g[1]) * ld(c_prev + j, n) + sigmoid(g[0]) * tg).store(c + j, n);
      sigmoid(g[3]).store(h + j, n);  // σ(o), times tanh(LN(c)) below
    });
    T cm = 0, cr = 1;
    if (ln) {
      ln_stats(c, K, eps, cm, cr);
      for (int y = 0; y < 4; ++y) stats[y] = mean[y], stats[4 + y] = rstd[y];
      stats[8] = cm, stats[9] = cr;
    }
    vfor<T>(K, [&](int64_t j, int64_t n) {
      Vec<T> cn = ld(c + j, n);
      if (ln) cn = (cn - Vec<T>(cm)) * Vec<T>(cr) * ld(cw + j, n) + ld(cb + j, n);
      (ld(h + j, n) * tanh_(cn)).store(h + j, n);
    });
  }

  // Backward of forward() for one row, activations recomputed from a and stats.
  // dh [K]: d h_t (total); dc [K]: d c_t in, d c_{t-1} out. Writes da [4K] (d pre-activations),
  // dcn [K] (d LN(c), for the LN(c) affine gradients) and, with ln, dg [4K] (d post-LN gates).
  void backward(const T* dh, T* dc, const T* a, const T* stats, const T* c_prev, const T* c,
                const T* mask, T* da, T* dg, T* dcn) const {
    T mean[4] = {0, 0, 0, 0}, rstd[4] = {1, 1, 1, 1}, cm = 0, cr = 1;
    if (ln) {
      for (int y = 0; y < 4; ++y) mean[y] = stats[y], rstd[y] = stats[4 + y];
      cm = stats[8], cr = stats[9];
    }
    const Vec<T> one(T(1));
    // σ(o) and tanh(LN(c)) wait in da's first two slots until pass 2 (da is written in pass 2
    // without ln, column by column after reading them, in pass 3 with it)
    T *so_buf = da, *tc_buf = da + K;
    // pass 1: d LN(c) = dh σ(o) (1 - tanh²), and the two sums LN(c)'s backward needs
    Vec<T> s1(T(0)), s2(T(0));
    vfor<T>(K, [&](int64_t j, int64_t n) {
      Vec<T> go = ld(a + 3 * K + j, n);
      if (ln) go = (go - Vec<T>(mean[3])) * Vec<T>(rstd[3]) * ld(ln_w + 3 * K + j, n);
      Vec<T> so = sigmoid(go + ld(shift + 3 * K + j, n));
      Vec<T> ch = ld(c + j, n), cn = ch;
      if (ln) {
        ch = (ch - Vec<T>(cm)) * Vec<T>(cr);
        cn = ch * ld(cw + j, n) + ld(cb + j, n);
      }
      Vec<T> tc = tanh_(cn);
      Vec<T> d = ld(dh + j, n) * so * (one - tc * tc);
      d.store(dcn + j, n);
      so.store(so_buf + j, n);
      tc.store(tc_buf + j, n);
      if (ln) {
        Vec<T> dw = head(d * ld(cw + j, n), n);
        s1 += dw;
        s2 += dw * ch;
      }
    });
    const T m1 = hsum(s1) / T(K), m2 = hsum(s2) / T(K);
    // pass 2: d c (total), d c_{t-1}, the gate derivatives (and their LN sums)
    Vec<T> t1[4], t2[4];
    for (int y = 0; y < 4; ++y) t1[y] = t2[y] = Vec<T>(T(0));
    T* dgate = ln ? dg : da;
    vfor<T>(K, [&](int64_t j, int64_t n) {
      Vec<T> g[4];
      gates(a, mean, rstd, j, n, g);
      Vec<T> si = sigmoid(g[0]), sf = sigmoid(g[1]), tg = tanh_(g[2]);
      Vec<T> so = ld(so_buf + j, n), tc = ld(tc_buf + j, n);
      Vec<T> m = mask ? ld(mask + j, n) : one;
      Vec<T> dcv = ld(dcn + j, n);
      if (ln) {
        Vec<T> ch = (ld(c + j, n) - Vec<T>(cm)) * Vec<T>(cr);
        dcv = Vec<T>(cr) * (dcv * ld(cw + j, n) - Vec<T>(m1) - ch * Vec<T>(m2));
      }
      Vec<T> dct = ld(dc + j, n) + dcv, dhv = ld(dh + j, n);
      Vec<T> d[4] = {dct * tg * m * si * (one - si), dct * ld(c_prev + j, n) * sf * (one - sf),
                     dct * si * m * (one - tg * tg), dhv * tc * so * (one - so)};
      (dct * sf).store(dc + j, n);
      for (int y = 0; y < 4; ++y) {
        d[y].store(dgate + y * K + j, n);
        if (ln) {
          Vec<T> dw = head(d[y] * ld(ln_w + y * K + j, n), n);
          Vec<T> an = (ld(a + y * K + j, n) - Vec<T>(mean[y])) * Vec<T>(rstd[y]);
          t1[y] += dw;
          t2[y] += dw * an;
        }
      }
    });
    if (!ln) return;
    // pass 3: through the per-gate LN
    for (int y = 0; y < 4; ++y) {
      const Vec<T> u1(hsum(t1[y]) / T(K)), u2(hsum(t2[y]) / T(K)), r(rstd[y]), mu(mean[y]);
      vfor<T>(K, [&](int64_t j, int64_t n) {
        Vec<T> an = (ld(a + y * K + j, n) - mu) * r;
        Vec<T> dw = ld(dg + y * K + j, n) * ld(ln_w + y * K + j, n);
        (r * (dw - u1 - an * u2)).store(da + y * K + j, n);
      });
    }
  }
};

template <typename T>
Cell<T> make_cell(int64_t K, bool ln, double eps, const Tensor& ln_w, const Tensor& shift, const Tensor& cw,
                  const Tensor& cb) {
  return Cell<T>{K, ln, T(eps), ln ? ln_w.data_ptr<T>() : nullptr, shift.data_ptr<T>(),
                 ln ? cw.data_ptr<T>() : nullptr, ln ? cb.data_ptr<T>() : nullptr};
}

// the scaling vectors of gate y at columns [j, j+c): d_k = z_k @ d_weight[k]^T, dwT = [12, E, H]
template <typename T>
inline void scaling(const T* z, const T* dwT, int64_t E, int64_t H, int y, int64_t j, int64_t c, Vec<T>& dx,
                    Vec<T>& dh, Vec<T>& beta) {
  dx = dh = beta = Vec<T>(T(0));
  for (int64_t e = 0; e < E; ++e) {
    dx = at::vec::fmadd(Vec<T>(z[y * E + e]), ld(dwT + (y * E + e) * H + j, c), dx);
    dh = at::vec::fmadd(Vec<T>(z[(4 + y) * E + e]), ld(dwT + ((4 + y) * E + e) * H + j, c), dh);
    beta = at::vec::fmadd(Vec<T>(z[(8 + y) * E + e]), ld(dwT + ((8 + y) * E + e) * H + j, c), beta);
  }
}

inline int64_t row_grain(int64_t work_per_row) {  // rows per task: ~16K elements of work at least
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_row));
}

template <typename T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Forward loop
// ---------------------------------------------------------------------------------------------

// The forward's buffers as base pointers and per-step strides (rows dense within a step)
template <typename T>
struct Steps {
  T *XP, *HS, *C, *CH, *A, *AH, *WH, *Z, *S, *SH;
  int64_t XPs, HSs, Cs, CHs, As, AHs, WHs, Zs, Ss, SHs;
  int64_t T_, B, NX, NS, ns;
  T *gh_b, *wh_b, *hb;  // scratch [B, 4K], [B, 4H], and h_t once more, dense [B, H]: the main GEMM's operand
};

template <typename T>
void forward_steps(const Steps<T>& st, const Gemm& g_hh, const Gemm& g_rec, const Tensor& bias, const Tensor& z_wT,
                   const Tensor& z_b, const Tensor& dwT, const Cell<T>& main, const Cell<T>& hyper,
                   const std::optional<Tensor>& m_main, const std::optional<Tensor>& m_hyper,
                   const std::vector<int64_t>& counts, bool keep_wh, const at::TensorOptions& opt);

template <typename T>
void forward_impl(const Tensor& XP, const Tensor& HS, const Tensor& C, const Tensor& CH, const Tensor& A,
                  const Tensor& AH, const Tensor& WH, const Tensor& Z, const Tensor& S, const Tensor& SH,
                  const Gemm& g_hh, const Gemm& g_rec, const Tensor& bias, const Tensor& z_wT, const Tensor& z_b,
                  const Tensor& dwT, const Cell<T>& main, const Cell<T>& hyper,
                  const std::optional<Tensor>& m_main, const std::optional<Tensor>& m_hyper,
                  const std::vector<int64_t>& counts, bool keep_wh) {
  const int64_t B = XP.size(1), H = main.K, K = hyper.K;
  TORCH_CHECK(S.size(1) == B && (S.size(2) == 0 || S.stride(1) == S.size(2)), "forward loop: S rows must be dense");
  Tensor scratch = at::empty({B * (4 * K + 5 * H)}, XP.options());
  T* sc = scratch.data_ptr<T>();
  Steps<T> st{XP.data_ptr<T>(), HS.data_ptr<T>(), C.data_ptr<T>(), CH.data_ptr<T>(), A.data_ptr<T>(),
              AH.data_ptr<T>(), WH.data_ptr<T>(), Z.data_ptr<T>(), S.data_ptr<T>(), SH.data_ptr<T>(),
              XP.stride(0), HS.stride(0), C.stride(0), CH.stride(0), A.stride(0), AH.stride(0), WH.stride(0),
              Z.stride(0), S.stride(0), SH.stride(0), XP.size(0), B, XP.size(2), HS.size(2), S.size(2),
              sc, sc + B * 4 * K, sc + B * (4 * K + 4 * H)};
  forward_steps<T>(st, g_hh, g_rec, bias, z_wT, z_b, dwT, main, hyper, m_main, m_hyper, counts, keep_wh, XP.options());
}

template <typename T>
void forward_steps(const Steps<T>& st, const Gemm& g_hh, const Gemm& g_rec, const Tensor& bias, const Tensor& z_wT,
                   const Tensor& z_b, const Tensor& dwT, const Cell<T>& main, const Cell<T>& hyper,
                   const std::optional<Tensor>& m_main, const std::optional<Tensor>& m_hyper,
                   const std::vector<int64_t>& counts, bool keep_wh, const at::TensorOptions& opt) {
  const int64_t T_ = st.T_, B = st.B, H = main.K, K = hyper.K, E = dwT.size(1), NX = st.NX, NS = st.NS;
  T* hb = st.hb;
  for (int64_t b = 0; b < B; ++b) std::copy(st.HS + b * NS, st.HS + b * NS + H, hb + b * H);
  const T *bias_p = bias.data_ptr<T>(), *zwT = z_wT.data_ptr<T>(), *zb = z_b.data_ptr<T>(), *dw = dwT.data_ptr<T>();
  const T *mm_p = ptr_or_null<T>(m_main), *mh_p = ptr_or_null<T>(m_hyper);
  // step t's slice of each buffer by pointer arithmetic (no tensor operation per step: at a small
  // shape ~20 of them cost as much as the step's maths)
  T *const XP0 = st.XP, *const HS0 = st.HS, *const C0 = st.C, *const CH0 = st.CH, *const A0 = st.A;
  T *const AH0 = st.AH, *const WH0 = st.WH, *const Z0 = st.Z, *const S0 = st.S, *const SH0 = st.SH;
  const int64_t XPs = st.XPs, HSs = st.HSs, Cs = st.Cs, CHs = st.CHs, As = st.As, AHs = st.AHs, WHs = st.WHs;
  const int64_t Zs = st.Zs, Ss = st.Ss, SHs = st.SHs;
  const bool both_dot = g_rec.kind == 3 && g_hh.kind == 3;
  T *gh_b = st.gh_b, *wh_b = st.wh_b;
  Tensor gh_keep, wh_keep;  // the products of the library variants (they may allocate their own)
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t n = counts[t];
    T *hs0 = HS0 + t * HSs, *hs1 = HS0 + (t + 1) * HSs, *c0 = C0 + t * Cs, *c1 = C0 + (t + 1) * Cs;
    T *ch0 = CH0 + t * CHs, *ch1 = CH0 + (t + 1) * CHs;
    if (n < B) {  // finished sequences carry their state
      std::copy(hs0 + n * NS, hs0 + B * NS, hs1 + n * NS);
      std::copy(c0 + n * H, c0 + B * H, c1 + n * H);
      std::copy(ch0 + n * K, ch0 + B * K, ch1 + n * K);
    }
    const T *gh_p, *wh_p;
    if (both_dot) {  // both "dot": one parallel region for the two, no tensor made
      RECORD_FUNCTION("hyper_lstm_cpu::dot_pair", c10::ArrayRef<const c10::IValue>{});
      dot_jobs<T>({DotJob{hs0, NS, n, g_rec.w.data_ptr(), g_rec.w.size(0), g_rec.w.size(1), gh_b, 4 * K},
                   DotJob{hb, H, n, g_hh.w.data_ptr(), g_hh.w.size(0), g_hh.w.size(1), wh_b, 4 * H}});
      gh_p = gh_b, wh_p = wh_b;
    } else {
      Tensor hs = at::from_blob(hs0, {n, NS}, {NS, 1}, opt), hv = at::from_blob(hb, {n, H}, opt);
      gh_keep = g_rec(hs, at::from_blob(gh_b, {n, 4 * K}, opt)).contiguous();  // [h|ĥ] @ W_rec^T
      wh_keep = g_hh(hv, at::from_blob(wh_b, {n, 4 * H}, opt)).contiguous();   // h @ W_hh^T
      gh_p = gh_keep.data_ptr<T>(), wh_p = wh_keep.data_ptr<T>();
    }
    const T* xp = XP0 + t * XPs;
    T *a = A0 + t * As, *ah = AH0 + t * AHs;
    T *whs = WH0 + t * WHs, *z = Z0 + t * Zs, *s = S0 + t * Ss, *sh = SH0 + t * SHs;
    const int64_t ns = st.ns;
    const T *mm = mm_p ? mm_p + t * B * H : nullptr, *mh = mh_p ? mh_p + t * B * K : nullptr;
    RECORD_FUNCTION("hyper_lstm_cpu::forward_rows", c10::ArrayRef<const c10::IValue>{});  // a torch.profiler range
    at::parallel_for(0, n, row_grain(24 * H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        // hyper cell: â = [h|ĥ] W_rec^T + (x W^T + hyper_bias)
        const T* xpb = xp + b * NX;
        T* ahb = ah + b * 4 * K;
        vfor<T>(4 * K, [&](int64_t j, int64_t c) {
          (ld(gh_p + b * 4 * K + j, c) + ld(xpb + 4 * H + j, c)).store(ahb + j, c);
        });
        T* hh = hs1 + b * NS + H;
        hyper.forward(ahb, ch0 + b * K, mh ? mh + b * K : nullptr, ch1 + b * K, hh, sh + b * ns);
        // z = [z_bias; 0] + ĥ_t z_w^T, vectorised over the 12E outputs (z_wT = z_w^T, [K, 12E])
        T* zr = z + b * 12 * E;
        std::copy(zb, zb + 12 * E, zr);
        for (int64_t k = 0; k < K; ++k) {
          const Vec<T> hk(hh[k]);
          vfor<T>(12 * E, [&](int64_t m, int64_t c) { at::vec::fmadd(hk, ld(zwT + k * 12 * E + m, c), ld(zr + m, c)).store(zr + m, c); });
        }
        // main pre-activations a_y = d_x ⊙ (x W_x^T) + d_h ⊙ (h W_h^T) + bias + beta
        const T* whb = wh_p + b * 4 * H;
        T* ab = a + b * 4 * H;
        for (int y = 0; y < 4; ++y) {
          vfor<T>(H, [&](int64_t j, int64_t c) {
            Vec<T> dx, dh, beta;
            scaling(zr, dw, E, H, y, j, c, dx, dh, beta);
            const int64_t o = y * H + j;
            Vec<T> w = ld(whb + o, c);
            if (keep_wh) w.store(whs + b * 4 * H + o, c);
            (dx * ld(xpb + o, c) + dh * w + ld(bias_p + o, c) + beta).store(ab + o, c);
          });
        }
        main.forward(ab, c0 + b * H, mm ? mm + b * H : nullptr, c1 + b * H, hs1 + b * NS, s + b * ns);
        std::copy(hs1 + b * NS, hs1 + b * NS + H, hb + b * H);
      }
    });
  }
}

void forward_loop(const Tensor& XP, const Tensor& HS, const Tensor& C, const Tensor& CH, const Tensor& A,
                  const Tensor& AH, const Tensor& WH, const Tensor& Z, const Tensor& S, const Tensor& SH,
                  const GemmArg& g_hh, const GemmArg& g_rec, const Tensor& bias, const Tensor& z_wT,
                  const Tensor& z_b, const Tensor& dwT, const std::vector<Tensor>& main_p,
                  const std::vector<Tensor>& hyper_p, const std::optional<Tensor>& m_main,
                  const std::optional<Tensor>& m_hyper, const std::vector<int64_t>& counts, bool layer_norm,
                  double eps, bool keep_wh) {
  // main_p / hyper_p: (ln_weight, shift, ln_cell_weight, ln_cell_bias); see Cell
  AT_DISPATCH_FLOATING_TYPES(XP.scalar_type(), "hyper_lstm_forward_loop", [&] {
    auto main = make_cell<scalar_t>(C.size(2), layer_norm, eps, main_p[0], main_p[1], main_p[2], main_p[3]);
    auto hyper = make_cell<scalar_t>(CH.size(2), layer_norm, eps, hyper_p[0], hyper_p[1], hyper_p[2], hyper_p[3]);
    forward_impl<scalar_t>(XP, HS, C, CH, A, AH, WH, Z, S, SH, make_gemm(g_hh), make_gemm(g_rec), bias, z_wT, z_b,
                           dwT, main, hyper, m_main, m_hyper, counts, keep_wh);
  });
}

// A whole inference call (no gradient kept, every sequence of full length) in one C++ call: the
// buffers, the state copies, the input projection (XP_CHUNK steps per GEMM into one reused
// buffer), the loop and the outputs, as fused_torch._forward does them op by op in Python. A
// one-step call (sampling, HyperLSTMCell) then crosses from Python once instead of ~40 times.
std::vector<Tensor> forward_infer(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& hh0,
                                  const Tensor& ch0, const Tensor& W_x, const Tensor& xp_bias, const GemmArg& g_hh,
                                  const GemmArg& g_rec, const Tensor& bias, const Tensor& z_wT, const Tensor& z_b,
                                  const Tensor& dwT, const std::vector<Tensor>& main_p,
                                  const std::vector<Tensor>& hyper_p, const std::optional<Tensor>& m_main,
                                  const std::optional<Tensor>& m_hyper, bool layer_norm, double eps, int64_t chunk) {
  const int64_t T_ = x.size(0), B = x.size(1), X = x.size(2), H = c0.size(-1), K = ch0.size(-1);
  const int64_t N = W_x.size(0), E = dwT.size(1), ns = layer_norm ? 10 : 0, NS = H + K;
  const auto opt = x.options();
  chunk = std::max<int64_t>(1, std::min(chunk, T_));
  // ONE workspace for every buffer of the call (the outputs apart: no two of them may alias)
  const int64_t nHS = (T_ + 1) * B * NS, nC = (T_ + 1) * B * H, nCH = (T_ + 1) * B * K, nA = B * 4 * H,
                nAH = B * 4 * K, nZ = B * 12 * E, nS = 2 * B * ns, nXP = chunk * B * N, nSc = B * (4 * K + 5 * H);
  Tensor ws = at::empty({nHS + nC + nCH + nA + nAH + nZ + nS + nXP + nSc}, opt);
  Tensor out = at::empty({T_, B, H}, opt), h1 = at::empty({B, H}, opt), c1 = at::empty({B, H}, opt);
  Tensor hh1 = at::empty({B, K}, opt), ch1 = at::empty({B, K}, opt);
  const Gemm gh = make_gemm(g_hh), gr = make_gemm(g_rec);
  const Tensor xc = x.contiguous(), h0c = h0.contiguous(), c0c = c0.contiguous(), hh0c = hh0.contiguous(),
               ch0c = ch0.contiguous();
  TORCH_CHECK(h0c.scalar_type() == x.scalar_type() && ch0c.scalar_type() == x.scalar_type(), "forward_infer: state dtype");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hyper_lstm_forward_infer", [&] {
    using T = scalar_t;
    T* w = ws.data_ptr<T>();
    T *HS = w, *C = HS + nHS, *CH = C + nC, *A = CH + nCH, *AH = A + nA, *Z = AH + nAH, *S = Z + nZ, *XP = S + nS;
    T* sc = XP + nXP;
    for (int64_t b = 0; b < B; ++b) {
      std::copy(h0c.data_ptr<T>() + b * H, h0c.data_ptr<T>() + (b + 1) * H, HS + b * NS);
      std::copy(hh0c.data_ptr<T>() + b * K, hh0c.data_ptr<T>() + (b + 1) * K, HS + b * NS + H);
    }
    std::copy(c0c.data_ptr<T>(), c0c.data_ptr<T>() + B * H, C);
    std::copy(ch0c.data_ptr<T>(), ch0c.data_ptr<T>() + B * K, CH);
    auto main = make_cell<T>(H, layer_norm, eps, main_p[0], main_p[1], main_p[2], main_p[3]);
    auto hyper = make_cell<T>(K, layer_norm, eps, hyper_p[0], hyper_p[1], hyper_p[2], hyper_p[3]);
    const T* xb = xc.data_ptr<T>();
    const T* xpb = xp_bias.data_ptr<T>();
    const bool small = chunk * B <= 4 && W_x.is_contiguous();
    for (int64_t t0 = 0; t0 < T_; t0 += chunk) {
      const int64_t n = std::min(T_, t0 + chunk) - t0;
      // the input projection of both cells for these n steps (hyper bias folded in)
      if (small) {
        dot_jobs<T>({DotJob{xb + t0 * B * X, X, n * B, W_x.data_ptr(), N, X, XP, N}});
        for (int64_t r = 0; r < n * B; ++r)
          vfor<T>(N, [&](int64_t j, int64_t c) { (ld(XP + r * N + j, c) + ld(xpb + j, c)).store(XP + r * N + j, c); });
      } else {
        Tensor xp_out = at::from_blob(XP, {n * B, N}, opt);
        at::addmm_out(xp_out, xp_bias, xc.narrow(0, t0, n).reshape({n * B, X}), W_x.t());
      }
      auto sl = [&](const std::optional<Tensor>& m) -> std::optional<Tensor> {
        return m.has_value() ? std::optional<Tensor>(m->narrow(0, t0, n)) : std::nullopt;
      };
      // per-step tensors: one step's worth, reused every step (stride 0 in time)
      Steps<T> st{XP, HS + t0 * B * NS, C + t0 * B * H, CH + t0 * B * K, A, AH, A, Z, S, S + B * ns,
                  B * N, B * NS, B * H, B * K, 0, 0, 0, 0, 0, 0, n, B, N, NS, ns,
                  sc, sc + B * 4 * K, sc + B * (4 * K + 4 * H)};
      forward_steps<T>(st, gh, gr, bias, z_wT, z_b, dwT, main, hyper, sl(m_main), sl(m_hyper),
                       std::vector<int64_t>(n, B), false, opt);
    }
    T *o = out.data_ptr<T>(), *last = HS + T_ * B * NS;
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t b = 0; b < B; ++b) std::copy(HS + ((t + 1) * B + b) * NS, HS + ((t + 1) * B + b) * NS + H, o + (t * B + b) * H);
    for (int64_t b = 0; b < B; ++b) {
      std::copy(last + b * NS, last + b * NS + H, h1.data_ptr<T>() + b * H);
      std::copy(last + b * NS + H, last + (b + 1) * NS, hh1.data_ptr<T>() + b * K);
    }
    std::copy(C + T_ * B * H, C + (T_ + 1) * B * H, c1.data_ptr<T>());
    std::copy(CH + T_ * B * K, CH + (T_ + 1) * B * K, ch1.data_ptr<T>());
  });
  return {out, h1, c1, hh1, ch1};
}

// ---------------------------------------------------------------------------------------------
// Backward loop (reverse time)
// ---------------------------------------------------------------------------------------------

// The batch sums of the backward (bias, d_weight, LN affine) are kept per CHUNK of ROWS rows:
// each step, the thread that ran a chunk's rows adds their terms (rows in order) into that chunk's
// own partial sums; after the loop the partials are added in chunk order. The result depends on
// neither the thread count nor the scheduling, and no batch sum needs a second pass over
// memory written by another core.
constexpr int64_t ROWS = 8;

// Offsets into one chunk's partial sums: bias [4H], d_weight^T [12, E, H], then (ln) the main
// cell's ln_w, ln_b [4H each], ln_cw, ln_cb [H each], and the hyper cell's the same with K.
struct Partials {
  int64_t H, K, E, size, ln_main, ln_hyper;
  Partials(int64_t H_, int64_t K_, int64_t E_, bool ln) : H(H_), K(K_), E(E_) {
    ln_main = 4 * H + 12 * E * H;
    ln_hyper = ln_main + 10 * H;
    size = ln ? ln_hyper + 10 * K : ln_main;
  }
};

// Adds the batch sums of rows [b0, b1) into `part`: bias and d_weight (main cell), and with ln
// the LN affine sums of both cells.
template <typename T>
void add_chunk_sums(const Partials& L, bool ln, int64_t b0, int64_t b1, const T* da, const T* xp, int64_t NX,
                    const T* whs, const T* z, const T* a, const T* dg, const T* s, const T* c1, const T* dcn,
                    const T* ah, const T* dgh, const T* sh, const T* ch1, const T* dcnh, int64_t ns,
                    std::vector<Vec<T>>& acc, T* part) {
  const int64_t H = L.H, K = L.K, E = L.E;
  for (int y = 0; y < 4; ++y) {
    vfor<T>(H, [&](int64_t j, int64_t c) {
      const int64_t o = y * H + j;
      for (auto& v : acc) v = Vec<T>(T(0));  // [0]: bias, [1 + p E + e]: d_weight path p
      for (int64_t b = b0; b < b1; ++b) {
        Vec<T> dav = ld(da + b * 4 * H + o, c);
        Vec<T> dd[3] = {dav * ld(xp + b * NX + o, c), dav * ld(whs + b * 4 * H + o, c), dav};
        const T* zr = z + b * 12 * E;
        acc[0] += dav;
        for (int p = 0; p < 3; ++p)
          for (int64_t e = 0; e < E; ++e)
            acc[1 + p * E + e] = at::vec::fmadd(dd[p], Vec<T>(zr[(4 * p + y) * E + e]), acc[1 + p * E + e]);
      }
      (ld(part + o, c) + acc[0]).store(part + o, c);
      for (int p = 0; p < 3; ++p)
        for (int64_t e = 0; e < E; ++e) {
          T* dst = part + 4 * H + ((4 * p + y) * E + e) * H + j;
          (ld(dst, c) + acc[1 + p * E + e]).store(dst, c);
        }
    });
  }
  if (!ln) return;
  // Σ d(post-LN) · (normalised input), Σ d(post-LN): per gate (stats slot y, 4 + y) and for LN(c) (8, 9)
  auto ln_sums = [&](int64_t Kc, const T* pre, const T* dpost, const T* st, const T* cval, const T* dcv, T* dst) {
    for (int y = 0; y < 5; ++y) {
      const bool cell = y == 4;
      const int64_t stride = cell ? Kc : 4 * Kc, off = cell ? 0 : y * Kc;
      const T *val = cell ? cval : pre, *dv = cell ? dcv : dpost;
      const int im = cell ? 8 : y, ir = cell ? 9 : 4 + y;
      T* dw_ = dst + (cell ? 8 * Kc : y * Kc);
      T* db_ = dst + (cell ? 9 * Kc : 4 * Kc + y * Kc);
      vfor<T>(Kc, [&](int64_t j, int64_t c) {
        Vec<T> gw(T(0)), gb(T(0));
        for (int64_t b = b0; b < b1; ++b) {
          Vec<T> d = ld(dv + b * stride + off + j, c);
          gw += d * (ld(val + b * stride + off + j, c) - Vec<T>(st[b * ns + im])) * Vec<T>(st[b * ns + ir]);
          gb += d;
        }
        (ld(dw_ + j, c) + gw).store(dw_ + j, c);
        (ld(db_ + j, c) + gb).store(db_ + j, c);
      });
    }
  };
  ln_sums(H, a, dg, s, c1, dcn, part + L.ln_main);
  ln_sums(K, ah, dgh, sh, ch1, dcnh, part + L.ln_hyper);
}

template <typename T>
void backward_impl(const Tensor& XP, const Tensor& C, const Tensor& CH, const Tensor& A,
                   const Tensor& AH, const Tensor& WH, const Tensor& Z, const Tensor& S, const Tensor& SH,
                   const std::optional<Tensor>& d_out, const Tensor& dh_c, const Tensor& dc_c, const Tensor& dhh_c,
                   const Tensor& dch_c, const Tensor& DXP, const Tensor& DWH, const Tensor& DZ,
                   const std::vector<Tensor>& acc, const Gemm& g_hh_t, const Gemm& g_rec_t, const Tensor& z_w,
                   const Tensor& dwT, const Cell<T>& main, const Cell<T>& hyper,
                   const std::optional<Tensor>& m_main, const std::optional<Tensor>& m_hyper,
                   const std::vector<int64_t>& counts) {
  const int64_t T_ = XP.size(0), B = XP.size(1), H = main.K, K = hyper.K, E = dwT.size(1);
  const int64_t NX = XP.size(2), ns = S.size(2);
  const bool ln = main.ln;
  const auto opt = XP.options();
  // per-step scratch: d pre-activations, d post-LN gates and d LN(c) of both cells
  Tensor DA = at::empty({B, 4 * H}, opt), DG = at::empty({B, 4 * H}, opt), DCN = at::empty({B, H}, opt);
  Tensor DAH = at::empty({B, 4 * K}, opt), DGH = at::empty({B, 4 * K}, opt), DCNH = at::empty({B, K}, opt);
  Tensor dhs_buf = at::empty({B, H + K}, opt), dh_buf = at::empty({B, H}, opt);
  T *da = DA.data_ptr<T>(), *dg = DG.data_ptr<T>(), *dcn = DCN.data_ptr<T>();
  T *dah = DAH.data_ptr<T>(), *dgh = DGH.data_ptr<T>(), *dcnh = DCNH.data_ptr<T>();
  T *dh_p = dh_c.data_ptr<T>(), *dc_p = dc_c.data_ptr<T>(), *dhh_p = dhh_c.data_ptr<T>(), *dch_p = dch_c.data_ptr<T>();
  const T *zw = z_w.data_ptr<T>(), *dw = dwT.data_ptr<T>();
  const T *mm_p = ptr_or_null<T>(m_main), *mh_p = ptr_or_null<T>(m_hyper);
  const Partials L(H, K, E, ln);
  Tensor part = at::zeros({(B + ROWS - 1) / ROWS, L.size}, opt);
  T* part_p = part.data_ptr<T>();

  // step t's slices by pointer arithmetic (no tensor operation per step), as in the forward
  auto base = [](const Tensor& X) { return X.data_ptr<T>(); };
  T *XP0 = base(XP), *A0 = base(A), *AH0 = base(AH), *WH0 = base(WH), *Z0 = base(Z), *S0 = base(S), *SH0 = base(SH);
  T *C0 = base(C), *CH0 = base(CH), *DXP0 = base(DXP), *DWH0 = base(DWH), *DZ0 = base(DZ);
  TORCH_CHECK(DAH.is_contiguous() && DWH.stride(1) == 4 * H && dh_c.is_contiguous() && dhh_c.is_contiguous(),
              "backward loop: dense rows expected");
  T *dhs_b = dhs_buf.data_ptr<T>(), *dhp_b = dh_buf.data_ptr<T>();
  for (int64_t t = T_ - 1; t >= 0; --t) {
    const int64_t n = counts[t];
    const T *xp = XP0 + t * XP.stride(0), *a = A0 + t * A.stride(0), *ah = AH0 + t * AH.stride(0);
    const T *whs = WH0 + t * WH.stride(0), *z = Z0 + t * Z.stride(0), *s = S0 + t * S.stride(0);
    const T *sh = SH0 + t * SH.stride(0);
    const T *c0 = C0 + t * C.stride(0), *c1 = C0 + (t + 1) * C.stride(0), *ch0 = CH0 + t * CH.stride(0);
    const T *ch1 = CH0 + (t + 1) * CH.stride(0);
    const T *mm = mm_p ? mm_p + t * B * H : nullptr, *mh = mh_p ? mh_p + t * B * K : nullptr;
    T *dxp = DXP0 + t * DXP.stride(0), *dwh = DWH0 + t * DWH.stride(0), *dz = DZ0 + t * DZ.stride(0);
    const T* dout = d_out.has_value() ? d_out->data_ptr<T>() + t * B * H : nullptr;  // d out[t], if any
    // ---- per chunk of rows: main cell, d/dz, d/dĥ, hyper cell; then the chunk's batch sums ----
    {
    RECORD_FUNCTION("hyper_lstm_cpu::backward_rows", std::vector<c10::IValue>());
    at::parallel_for(0, (n + ROWS - 1) / ROWS, 1, [&](int64_t k0, int64_t k1) {
      std::vector<Vec<T>> dzacc(12 * E), sums(3 * E + 1);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * ROWS, r1 = std::min(n, r0 + ROWS);
        for (int64_t b = r0; b < r1; ++b) {
          T* dhb = dh_p + b * H;
          if (dout) vfor<T>(H, [&](int64_t j, int64_t c) { (ld(dhb + j, c) + ld(dout + b * H + j, c)).store(dhb + j, c); });
          T* dab = da + b * 4 * H;
          main.backward(dhb, dc_p + b * H, a + b * 4 * H, s + b * ns, c0 + b * H, c1 + b * H,
                        mm ? mm + b * H : nullptr, dab, dg + b * 4 * H, dcn + b * H);
          // a = d_x ⊙ xp + d_h ⊙ wh + bias + beta: d xp, d wh, and d z through the scaling vectors
          const T *zr = z + b * 12 * E, *xpb = xp + b * NX, *whb = whs + b * 4 * H;
          for (auto& v : dzacc) v = Vec<T>(T(0));
          for (int y = 0; y < 4; ++y) {
            vfor<T>(H, [&](int64_t j, int64_t c) {
              const int64_t o = y * H + j;
              Vec<T> dx, dh, beta, dav = ld(dab + o, c);
              scaling(zr, dw, E, H, y, j, c, dx, dh, beta);
              (dav * dx).store(dxp + b * NX + o, c);
              (dav * dh).store(dwh + b * 4 * H + o, c);
              Vec<T> dd[3] = {dav * ld(xpb + o, c), dav * ld(whb + o, c), dav};
              for (int p = 0; p < 3; ++p)
                for (int64_t e = 0; e < E; ++e) {
                  Vec<T>& acc_ = dzacc[(4 * p + y) * E + e];
                  acc_ = at::vec::fmadd(dd[p], ld(dw + ((4 * p + y) * E + e) * H + j, c), acc_);
                }
            });
          }
          T* dzr = dz + b * 12 * E;
          for (int64_t m = 0; m < 12 * E; ++m) dzr[m] = hsum(dzacc[m]);
          // d ĥ_t = carried + dz z_w
          T* dhhb = dhh_p + b * K;
          for (int64_t m = 0; m < 12 * E; ++m) {
            const Vec<T> dm(dzr[m]);
            vfor<T>(K, [&](int64_t j, int64_t c) { at::vec::fmadd(dm, ld(zw + m * K + j, c), ld(dhhb + j, c)).store(dhhb + j, c); });
          }
          hyper.backward(dhhb, dch_p + b * K, ah + b * 4 * K, sh + b * ns, ch0 + b * K, ch1 + b * K,
                         mh ? mh + b * K : nullptr, dah + b * 4 * K, dgh + b * 4 * K, dcnh + b * K);
          std::copy(dah + b * 4 * K, dah + (b + 1) * 4 * K, dxp + b * NX + 4 * H);
        }
        add_chunk_sums<T>(L, ln, r0, r1, da, xp, NX, whs, z, a, dg, s, c1, dcn, ah, dgh, sh, ch1, dcnh, ns, sums,
                          part_p + k * L.size);
      }
    });
    }
    // ---- d h_{t-1} = (d_h ⊙ da) W_hh + dâ W_rec[:, :H];  d ĥ_{t-1} = dâ W_rec[:, H:] ------------
    const T *dhs_p, *dhp_p;
    Tensor dhs, dhp;  // the library variants' products (they may allocate their own)
    if (g_rec_t.kind == 3 && g_hh_t.kind == 3) {  // both "dot": one parallel region, no tensor made
      RECORD_FUNCTION("hyper_lstm_cpu::dot_pair", c10::ArrayRef<const c10::IValue>{});
      dot_jobs<T>({DotJob{dah, 4 * K, n, g_rec_t.w.data_ptr(), g_rec_t.w.size(0), g_rec_t.w.size(1), dhs_b, H + K},
                   DotJob{dwh, 4 * H, n, g_hh_t.w.data_ptr(), g_hh_t.w.size(0), g_hh_t.w.size(1), dhp_b, H}});
      dhs_p = dhs_b, dhp_p = dhp_b;
    } else {
      dhs = g_rec_t(DAH.narrow(0, 0, n), dhs_buf.narrow(0, 0, n)).contiguous();
      dhp = g_hh_t(DWH[t].narrow(0, 0, n), dh_buf.narrow(0, 0, n)).contiguous();
      dhs_p = dhs.data_ptr<T>(), dhp_p = dhp.data_ptr<T>();
    }
    for (int64_t b = 0; b < n; ++b) {  // dh = (d_h ⊙ da) W_hh + dâ W_rec[:, :H];  dĥ = dâ W_rec[:, H:]
      const T *r = dhs_p + b * (H + K), *q = dhp_p + b * H;
      T* o = dh_p + b * H;
      vfor<T>(H, [&](int64_t j, int64_t c) { (ld(q + j, c) + ld(r + j, c)).store(o + j, c); });
      std::copy(r + H, r + H + K, dhh_p + b * K);
    }
  }
  // the chunks' partial sums, in chunk order, into the accumulators (bias, d_weight^T, then ln)
  Tensor total = part[0].clone();
  for (int64_t k = 1; k < part.size(0); ++k) total.add_(part[k]);
  int64_t off = 0;
  for (const Tensor& g : acc) {
    g.add_(total.narrow(0, off, g.numel()).view(g.sizes()));
    off += g.numel();
  }
}

void backward_loop(const Tensor& XP, const Tensor& C, const Tensor& CH, const Tensor& A,
                   const Tensor& AH, const Tensor& WH, const Tensor& Z, const Tensor& S, const Tensor& SH,
                   const std::optional<Tensor>& d_out, const Tensor& dh, const Tensor& dc, const Tensor& dhh, const Tensor& dch,
                   const Tensor& DXP, const Tensor& DWH, const Tensor& DZ, const std::vector<Tensor>& acc,
                   const GemmArg& g_hh_t, const GemmArg& g_rec_t, const Tensor& z_w, const Tensor& dwT,
                   const std::vector<Tensor>& main_p, const std::vector<Tensor>& hyper_p,
                   const std::optional<Tensor>& m_main, const std::optional<Tensor>& m_hyper,
                   const std::vector<int64_t>& counts, bool layer_norm, double eps) {
  AT_DISPATCH_FLOATING_TYPES(XP.scalar_type(), "hyper_lstm_backward_loop", [&] {
    auto main = make_cell<scalar_t>(C.size(2), layer_norm, eps, main_p[0], main_p[1], main_p[2], main_p[3]);
    auto hyper = make_cell<scalar_t>(CH.size(2), layer_norm, eps, hyper_p[0], hyper_p[1], hyper_p[2], hyper_p[3]);
    backward_impl<scalar_t>(XP, C, CH, A, AH, WH, Z, S, SH, d_out, dh, dc, dhh, dch, DXP, DWH, DZ, acc,
                            make_gemm(g_hh_t), make_gemm(g_rec_t), z_w, dwT, main, hyper, m_main, m_hyper, counts);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_loop", &forward_loop, "HyperLSTM forward time loop (see fused_torch.py)");
  m.def("forward_infer", &forward_infer, "HyperLSTM inference call, buffers to outputs (see fused_torch.py)");
  m.def("param_key", [](const std::vector<Tensor>& ts) {
    std::vector<int64_t> key;
    key.reserve(2 * ts.size());
    for (const Tensor& t : ts) {
      key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
      key.push_back(static_cast<int64_t>(t._version()));
    }
    return key;
  }, "(data_ptr, version) of each tensor, flat: the derived-weight cache's key (fused_torch._derived)");
  m.def("backward_loop", &backward_loop, "HyperLSTM backward time loop (see fused_torch.py)");
  m.def("gemm", [](const GemmArg& g, const Tensor& x) {
    return make_gemm(g)(x, at::empty({x.size(0), std::get<1>(g).size(0)}, x.options()));
  }, "x @ W^T through the loop's own Gemm (tests check every variant against mm)");
  m.def("dot_pair", [](const Tensor& x1, const Tensor& w1, const Tensor& x2, const Tensor& w2) {
    Tensor y1 = at::empty({x1.size(0), w1.size(0)}, x1.options()), y2 = at::empty({x2.size(0), w2.size(0)}, x2.options());
    Tensor v1 = w1.contiguous(), v2 = w2.contiguous();
    AT_DISPATCH_FLOATING_TYPES(w1.scalar_type(), "hyper_lstm_dot", [&] {
      dot_jobs<scalar_t>({dot_job(x1, v1, y1), dot_job(x2, v2, y2)});
    });
    return std::make_tuple(y1, y2);
  }, "(x1 @ w1^T, x2 @ w2^T) in one parallel region, as the loop runs two \"dot\" products of a step");
}
