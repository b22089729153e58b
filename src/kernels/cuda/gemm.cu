// Row-major bf16 GEMMs through cuBLASLt. cuBLASLt is column-major, and a row-major X[r,c]
// is the column-major matrix X^T (c x r), so every product is computed transposed:
//   NT: C^T = B A^T  ->  Lt A := B (stored K x N, op T), Lt B := A (K x M, op N)
//   NN: C^T = B^T A^T -> Lt A := B (stored N x K, op N), Lt B := A (K x M, op N)
//   TN: C^T = B^T A  ->  Lt A := B (stored N x K, op N), Lt B := A (M x K, op T)
// with Lt's m = N, n = M, k = K and C stored N x M (ld N). Plans (descriptors, layouts, the
// heuristic's algorithm) are cached per (op, shape, output type, alignments).
#include <cublasLt.h>

#include <algorithm>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "common.cuh"
#include "ftune/kernels/cuda_gemm.hpp"

namespace ftune::cuda {
namespace {

// RAII for cuBLASLt objects: unique_ptr with the matching destroy call.
template <typename T, cublasStatus_t (*Destroy)(T*)>
struct LtDelete {
  void operator()(T* p) const noexcept {
    const cublasStatus_t st = Destroy(p);
    if (st != CUBLAS_STATUS_SUCCESS)
      detail::warn("cuBLASLt", cublasLtGetStatusName(st), cublasLtGetStatusString(st),
                   "destroy", __FILE__, __LINE__);
  }
};
template <typename T, cublasStatus_t (*Destroy)(T*)>
using LtPtr = std::unique_ptr<T, LtDelete<T, Destroy>>;

using HandlePtr = LtPtr<cublasLtContext, cublasLtDestroy>;
using DescPtr = LtPtr<cublasLtMatmulDescOpaque_t, cublasLtMatmulDescDestroy>;
using LayoutPtr = LtPtr<cublasLtMatrixLayoutOpaque_t, cublasLtMatrixLayoutDestroy>;
using PrefPtr = LtPtr<cublasLtMatmulPreferenceOpaque_t, cublasLtMatmulPreferenceDestroy>;

LayoutPtr make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t l = nullptr;
  FTUNE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, type, rows, cols, ld));
  return LayoutPtr(l);
}

// Largest power of two (<= 256) dividing both the base address and the row pitch: the
// alignment every row of the operand has (cuBLASLt's heuristic assumes 256 unless told).
uint32_t alignment(const void* p, int64_t ld, size_t elem) {
  const uint64_t bits = reinterpret_cast<uint64_t>(p) | (static_cast<uint64_t>(ld) * elem) | 256;
  return static_cast<uint32_t>(bits & (~bits + 1));
}

struct Key {
  int op, out_f32;
  int64_t M, N, K;
  uint32_t align_a, align_b, align_c;
  bool operator<(const Key& o) const {
    return std::tie(op, out_f32, M, N, K, align_a, align_b, align_c) <
           std::tie(o.op, o.out_f32, o.M, o.N, o.K, o.align_a, o.align_b, o.align_c);
  }
};

struct Plan {
  DescPtr desc;
  LayoutPtr a, b, c;  // Lt's A (our B), Lt's B (our A), C = D
  cublasLtMatmulAlgo_t algo{};
  std::vector<cublasLtMatmulAlgo_t> candidates;  // the heuristic's offers, its choice first
};

// How many of the heuristic's offers time_algorithms() looks at.
constexpr int kMaxCandidates = 16;

// RAII pair of timing events (gemm.cu times candidates on the caller's stream).
struct EventPair {
  cudaEvent_t a = nullptr, b = nullptr;
  EventPair() {
    FTUNE_CUDA_CHECK(cudaEventCreate(&a));
    FTUNE_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~EventPair() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;
};

}  // namespace

struct Gemm::Impl {
  HandlePtr handle;
  DeviceBuffer workspace;
  std::map<Key, Plan> plans;

  Plan& plan(const Key& k) {
    if (auto it = plans.find(k); it != plans.end()) return it->second;
    Plan p;
    cublasLtMatmulDesc_t d = nullptr;
    FTUNE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    p.desc.reset(d);
    const auto op = static_cast<GemmOp>(k.op);
    const cublasOperation_t ta = op == GemmOp::NT ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t tb = op == GemmOp::TN ? CUBLAS_OP_T : CUBLAS_OP_N;
    FTUNE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &ta,
                                                      sizeof ta));
    FTUNE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &tb,
                                                      sizeof tb));
    p.a = op == GemmOp::NT ? make_layout(CUDA_R_16BF, k.K, k.N, k.K)
                           : make_layout(CUDA_R_16BF, k.N, k.K, k.N);
    p.b = op == GemmOp::TN ? make_layout(CUDA_R_16BF, k.M, k.K, k.M)
                           : make_layout(CUDA_R_16BF, k.K, k.M, k.K);
    p.c = make_layout(k.out_f32 ? CUDA_R_32F : CUDA_R_16BF, k.N, k.M, k.N);

    cublasLtMatmulPreference_t pr = nullptr;
    FTUNE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pr));
    PrefPtr pref(pr);
    const uint64_t ws = workspace.bytes();
    FTUNE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pr, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    // Lt's A is our B and vice versa.
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, k.align_b},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, k.align_a},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, k.align_c},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, k.align_c}};
    for (const auto& [attr, val] : aligns)
      FTUNE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pr, attr, &val, sizeof val));

    cublasLtMatmulHeuristicResult_t res[kMaxCandidates]{};
    int found = 0;
    FTUNE_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle.get(), d, p.a.get(), p.b.get(),
                                                      p.c.get(), p.c.get(), pr, kMaxCandidates,
                                                      res, &found));
    for (int i = 0; i < found; ++i)
      if (res[i].state == CUBLAS_STATUS_SUCCESS) p.candidates.push_back(res[i].algo);
    if (p.candidates.empty())
      throw CudaError("cuBLASLt: no algorithm for GEMM op " + std::to_string(k.op) + " M=" +
                      std::to_string(k.M) + " N=" + std::to_string(k.N) +
                      " K=" + std::to_string(k.K));
    p.algo = p.candidates.front();
    return plans.emplace(k, std::move(p)).first->second;
  }

  static Key key_of(GemmOp op, const void* C, bool out_f32, const bf16* A, const bf16* B,
                    int64_t M, int64_t N, int64_t K) {
    // Row pitches (elements) of our operands as stored.
    const int64_t lda = op == GemmOp::TN ? M : K;
    const int64_t ldb = op == GemmOp::NT ? K : N;
    return Key{static_cast<int>(op), out_f32 ? 1 : 0, M, N, K, alignment(A, lda, 2),
               alignment(B, ldb, 2), alignment(C, N, out_f32 ? 4 : 2)};
  }

  cublasStatus_t launch(const Plan& p, const cublasLtMatmulAlgo_t& algo, void* C,
                        const bf16* A, const bf16* B, float alpha, float beta,
                        stream_t stream) {
    return cublasLtMatmul(handle.get(), p.desc.get(), &alpha, B, p.a.get(), A, p.b.get(),
                          &beta, C, p.c.get(), C, p.c.get(), &algo, workspace.get(),
                          workspace.bytes(), stream);
  }

  // Mean ms of `reps` runs (after two warm-ups) of each candidate, in the plan's order; a
  // candidate cuBLASLt refuses at launch gets +inf. Synchronises the stream.
  std::vector<float> time_candidates(const Plan& p, void* C, const bf16* A, const bf16* B,
                                     float alpha, float beta, stream_t stream, int reps) {
    std::vector<float> ms;
    EventPair ev;
    for (const cublasLtMatmulAlgo_t& algo : p.candidates) {
      bool ok = true;
      for (int i = 0; i < 2 && ok; ++i)
        ok = launch(p, algo, C, A, B, alpha, beta, stream) == CUBLAS_STATUS_SUCCESS;
      FTUNE_CUDA_CHECK(cudaEventRecord(ev.a, stream));
      for (int i = 0; i < reps && ok; ++i)
        ok = launch(p, algo, C, A, B, alpha, beta, stream) == CUBLAS_STATUS_SUCCESS;
      FTUNE_CUDA_CHECK(cudaEventRecord(ev.b, stream));
      FTUNE_CUDA_CHECK(cudaEventSynchronize(ev.b));
      float t = 0.f;
      FTUNE_CUDA_CHECK(cudaEventElapsedTime(&t, ev.a, ev.b));
      ms.push_back(ok ? t / static_cast<float>(reps) : std::numeric_limits<float>::infinity());
    }
    return ms;
  }

  void run(GemmOp op, void* C, bool out_f32, const bf16* A, const bf16* B, int64_t M,
           int64_t N, int64_t K, float alpha, float beta, stream_t stream) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) throw CudaError("Gemm::matmul: K must be positive");
    const Plan& p = plan(key_of(op, C, out_f32, A, B, M, N, K));
    FTUNE_CUBLAS_CHECK(launch(p, p.algo, C, A, B, alpha, beta, stream));
  }
};

Gemm::Gemm(size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
  cublasLtHandle_t h = nullptr;
  FTUNE_CUBLAS_CHECK(cublasLtCreate(&h));
  impl_->handle.reset(h);
  impl_->workspace = DeviceBuffer(workspace_bytes);
}

Gemm::~Gemm() = default;

void Gemm::matmul(GemmOp op, bf16* C, const bf16* A, const bf16* B, int64_t M, int64_t N,
                  int64_t K, float alpha, float beta, stream_t stream) {
  impl_->run(op, C, false, A, B, M, N, K, alpha, beta, stream);
}

void Gemm::matmul(GemmOp op, float* C, const bf16* A, const bf16* B, int64_t M, int64_t N,
                  int64_t K, float alpha, float beta, stream_t stream) {
  impl_->run(op, C, true, A, B, M, N, K, alpha, beta, stream);
}

size_t Gemm::cached_plans() const { return impl_->plans.size(); }

std::vector<float> Gemm::time_algorithms(GemmOp op, bf16* C, const bf16* A, const bf16* B,
                                         int64_t M, int64_t N, int64_t K, float alpha,
                                         float beta, stream_t stream, int reps) {
  if (M <= 0 || N <= 0 || K <= 0) throw CudaError("Gemm::time_algorithms: empty product");
  const Plan& p = impl_->plan(Impl::key_of(op, C, false, A, B, M, N, K));
  return impl_->time_candidates(p, C, A, B, alpha, beta, stream, std::max(reps, 1));
}

}  // namespace ftune::cuda
