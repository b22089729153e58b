// Probe: are the 8B MLP products (N or K = 14336) slower than the 4096-wide ones because of
// their shape, or because of the card's power limit once the work is sustained? Times each
// product whole and split into column / row / K pieces, with cuBLASLt's first and fastest
// offers, over 10 runs and over >= 300 ms of back-to-back runs, and once on all-zero
// activations (same instructions, far less switching power). Prints a table and writes it to
// the file named by the first argument. Answer on an H200 (tools/results/bench_gemm.md): power.
//   build/probe_gemm_split [OUT.txt]
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cstdio>
#include <memory>
#include <cstdlib>
#include <string>
#include <vector>

#define CK(x) do { auto e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)
#define LK(x) do { auto s_ = (x); if (s_ != CUBLAS_STATUS_SUCCESS) { printf("%s:%d cublasLt %d\n", __FILE__, __LINE__, (int)s_); exit(1); } } while (0)

static cublasLtHandle_t H;
static void* WS;
static const size_t WSB = 32u << 20;

__global__ void fill(__nv_bfloat16* p, size_t n, float scale, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    // sum of 4 uniforms ~ normal-ish
    float u = ((h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24)) / 255.f - 2.f;
    p[i] = __float2bfloat16(u * 1.7f * scale);
  }
}

// Row-major C[M,N] (ldc) = A op B; op NT: A[M,K] (lda) B[N,K] (ldb); NN: A[M,K] B[K,N].
struct P {
  cublasLtMatmulDesc_t d; cublasLtMatrixLayout_t la, lb, lc;
  std::vector<cublasLtMatmulAlgo_t> algos;
};
static P plan(bool nt, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
  P p;
  LK(cublasLtMatmulDescCreate(&p.d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = nt ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
  LK(cublasLtMatmulDescSetAttribute(p.d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  LK(cublasLtMatmulDescSetAttribute(p.d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  if (nt) LK(cublasLtMatrixLayoutCreate(&p.la, CUDA_R_16BF, K, N, ldb));
  else LK(cublasLtMatrixLayoutCreate(&p.la, CUDA_R_16BF, N, K, ldb));
  LK(cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_16BF, K, M, lda));
  LK(cublasLtMatrixLayoutCreate(&p.lc, CUDA_R_16BF, N, M, ldc));
  cublasLtMatmulPreference_t pr;
  LK(cublasLtMatmulPreferenceCreate(&pr));
  uint64_t ws = WSB;
  LK(cublasLtMatmulPreferenceSetAttribute(pr, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  cublasLtMatmulHeuristicResult_t r[64];
  int found = 0;
  LK(cublasLtMatmulAlgoGetHeuristic(H, p.d, p.la, p.lb, p.lc, p.lc, pr, 64, r, &found));
  for (int i = 0; i < found; ++i) if (r[i].state == CUBLAS_STATUS_SUCCESS) p.algos.push_back(r[i].algo);
  cublasLtMatmulPreferenceDestroy(pr);
  return p;
}
static bool launch(const P& p, int ai, void* C, const void* A, const void* B, float beta, cudaStream_t s) {
  float alpha = 1.f;
  return cublasLtMatmul(H, p.d, &alpha, B, p.la, A, p.lb, &beta, C, p.lc, C, p.lc, &p.algos[ai], WS, WSB, s) == CUBLAS_STATUS_SUCCESS;
}

struct Piece { P p; const void* A; const void* B; void* C; float beta; };
// ms per whole product (all pieces), `reps` repetitions after warm-up; algo index ai per piece
// (clamped to the piece's offers).
static float time_pieces(std::vector<Piece>& ps, int ai, int reps) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  auto once = [&] { bool ok = true; for (auto& x : ps) ok &= launch(x.p, ai < (int)x.p.algos.size() ? ai : 0, x.C, x.A, x.B, x.beta, 0); return ok; };
  for (int i = 0; i < 3; ++i) if (!once()) return -1;
  cudaEventRecord(a);
  for (int i = 0; i < reps; ++i) once();
  cudaEventRecord(b); cudaEventSynchronize(b);
  float t; cudaEventElapsedTime(&t, a, b);
  cudaEventDestroy(a); cudaEventDestroy(b);
  return t / reps;
}

int main(int argc, char** argv) {
  FILE* out = fopen(argc > 1 ? argv[1] : "probe_gemm_split.txt", "w");
  LK(cublasLtCreate(&H));
  CK(cudaMalloc(&WS, WSB));
  const int64_t T = 8192, Hd = 4096, I = 14336;
  // Device buffers owned for the whole run (freed at exit).
  auto dev_alloc = [](size_t bytes) {
    void* p = nullptr;
    CK(cudaMalloc(&p, bytes));
    return std::unique_ptr<void, decltype(&cudaFree)>(p, &cudaFree);
  };
  auto xb = dev_alloc(T * I * 2), wb = dev_alloc(I * Hd * 2), yb = dev_alloc(T * I * 2);
  auto* x = static_cast<__nv_bfloat16*>(xb.get());
  auto* w = static_cast<__nv_bfloat16*>(wb.get());
  auto* y = static_cast<__nv_bfloat16*>(yb.get());
  fill<<<1024, 256>>>(x, T * I, 1.f, 1); fill<<<1024, 256>>>(w, I * Hd, 0.02f, 2); fill<<<1024, 256>>>(y, T * I, 1.f, 3);
  CK(cudaDeviceSynchronize());
  auto row = [&](const char* name, std::vector<Piece> ps, double flop) {
    float best = 1e9; int bi = 0;
    int na = 1e9; for (auto& p : ps) na = std::min<int>(na, p.p.algos.size());
    for (int ai = 0; ai < na && ai < 16; ++ai) { float t = time_pieces(ps, ai, 10); if (t > 0 && t < best) { best = t; bi = ai; } }
    const int long_reps = std::max(20, (int)(300.0 / std::max(best, 0.01f)));
    float first_s = time_pieces(ps, 0, 10), first_l = time_pieces(ps, 0, long_reps);
    float best_l = time_pieces(ps, bi, long_reps);
    char buf[512];
    snprintf(buf, sizeof buf, "| %-44s | %3d | %7.3f | %6.1f | %7.3f | %6.1f | %7.3f | %6.1f (%d) |\n", name,
             (int)ps.size(), first_s, flop / first_s / 1e9, first_l, flop / first_l / 1e9, best_l, flop / best_l / 1e9, bi);
    printf("%s", buf); fputs(buf, out); fflush(stdout); fflush(out);
  };
  printf("| product | pieces | first ms (10) | TF/s | first ms (300 ms) | TF/s | best ms (300 ms) | TF/s (pick) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
  // NT: y[T, n] = x[T, K] W[n, K]^T
  auto nt_cols = [&](int64_t N, int64_t K, int64_t chunk) {
    std::vector<Piece> ps;
    for (int64_t j = 0; j < N; j += chunk) {
      int64_t c = std::min(chunk, N - j);
      ps.push_back({plan(true, T, c, K, K, K, N), x, w + j * K, y + j, 0.f});
    }
    return ps;
  };
  auto nt_rows = [&](int64_t N, int64_t K, int64_t chunk) {
    std::vector<Piece> ps;
    for (int64_t i = 0; i < T; i += chunk) ps.push_back({plan(true, chunk, N, K, K, K, N), x + i * K, w, y + i * N, 0.f});
    return ps;
  };
  // NN: y[T, N] = d[T, K] W[K, N]; split over K with beta 1 after the first piece.
  auto nn_k = [&](int64_t N, int64_t K, int64_t chunk) {
    std::vector<Piece> ps;
    for (int64_t k = 0; k < K; k += chunk) ps.push_back({plan(false, T, N, std::min(chunk, K - k), K, N, N), x + k, w + k * N, y, k ? 1.f : 0.f});
    return ps;
  };
  auto nn_cols = [&](int64_t N, int64_t K, int64_t chunk) {
    std::vector<Piece> ps;
    for (int64_t j = 0; j < N; j += chunk) ps.push_back({plan(false, T, std::min(chunk, N - j), K, K, N, N), x, w + j, y + j, 0.f});
    return ps;
  };
  const double f_q = 2.0 * T * Hd * Hd, f_g = 2.0 * T * I * Hd;
  row("q fwd NT 8192x4096x4096", nt_cols(Hd, Hd, Hd), f_q);
  row("gate fwd NT 8192x14336x4096 whole", nt_cols(I, Hd, I), f_g);
  row("gate fwd, 2 column pieces (7168)", nt_cols(I, Hd, 7168), f_g);
  row("gate fwd, 4 column pieces (3584)", nt_cols(I, Hd, 3584), f_g);
  row("gate fwd, 7 column pieces (2048)", nt_cols(I, Hd, 2048), f_g);
  row("gate fwd, 2 row pieces (4096)", nt_rows(I, Hd, 4096), f_g);
  row("gate fwd, 4 row pieces (2048)", nt_rows(I, Hd, 2048), f_g);
  row("down fwd NT 8192x4096x14336 whole", nt_cols(Hd, I, Hd), f_g);
  row("down fwd, 2 column pieces (2048)", nt_cols(Hd, I, 2048), f_g);
  row("gate bwd dx NN 8192x4096x14336 whole", nn_k(Hd, I, I), f_g);
  row("gate bwd dx, 2 K pieces (7168)", nn_k(Hd, I, 7168), f_g);
  row("gate bwd dx, 4 K pieces (3584)", nn_k(Hd, I, 3584), f_g);
  row("down bwd dx NN 8192x14336x4096 whole", nn_cols(I, Hd, I), f_g);
  row("down bwd dx, 4 column pieces (3584)", nn_cols(I, Hd, 3584), f_g);
  row("q bwd dx NN 8192x4096x4096", nn_cols(Hd, Hd, Hd), f_q);
  // Power probe: the same gate product on all-zero activations.
  CK(cudaMemset(x, 0, T * I * 2));
  row("gate fwd whole, x = 0 (power probe)", nt_cols(I, Hd, I), f_g);
  row("q fwd, x = 0 (power probe)", nt_cols(Hd, Hd, Hd), f_q);
  fclose(out);
  return 0;
}
