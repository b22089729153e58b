// Flash attention backward (FlashAttention-2 scheme) on mma.sync bf16 tensor cores.
//   1. D = rowsum(dO * O) per (token, query head), fp32, into the workspace.
//   2. One block = one key/value tile (BN = 16 keys per warp) of one kv head of one
//      sequence. It loops over every query head of its GQA group and every query tile at or
//      past the diagonal, recomputing P = exp(S - lse) and dS = P (dP - D) * scale, and
//      keeps dK, dV for its keys in registers (so GQA needs no expanded dK/dV buffers and no
//      reduction pass; dK/dV are deterministic). Q, dO (+ lse, D) tiles are double-buffered
//      by cp.async.
//      dQ = dS K needs all the keys of the tile: dS goes through shared memory and the
//      warps re-split the product by query rows, then add it into an fp32 [N, Hq, d]
//      workspace with float2 atomics. Chosen over a separate dQ pass, which would recompute
//      S and dP (7 matrix products per tile pair instead of 5); the price is that dQ's
//      fp32 summation order, hence its last bits, varies from run to run.
//   3. dQ fp32 -> bf16.
#include "attention_flash.cuh"
#include "attention_flash_sm90.cuh"

namespace ftune::cuda {
namespace fa {
namespace {

template <int D, int NW, int BM>
struct Bwd {
  static constexpr int BN = 16 * NW, NT = 32 * NW, P = D + 8, PS = BM + 8;
  static constexpr int MTQ = BM / 16;    // dQ: query m-tiles
  static constexpr int NDQ = NW / MTQ;   // warps per dQ m-tile
  static constexpr int DQC = D / NDQ;    // dQ columns per warp
  static_assert(NW % MTQ == 0 && DQC % 16 == 0, "dQ split must tile the warps");
  // K, V, 2x(Q, dO), dS^T (bf16); 2x(lse, D) (fp32).
  static constexpr size_t kSmem =
      size_t(2 * BN * P + 4 * BM * P + BN * PS) * sizeof(bf) + 4 * BM * sizeof(float);
};

// D[row] = sum(dO[row, :] * O[row, :]) for row = token * Hq + head; one warp per row.
template <int D>
__global__ void dot_do_o_kernel(float* __restrict__ Dv, const bf* __restrict__ dout,
                                const bf* __restrict__ out, int64_t rows) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float acc = 0.f;
  if (lane < D / 8) {
    float a[8], b[8];
    detail::load8(dout + row * D + lane * 8, a);
    detail::load8(out + row * D + lane * 8, b);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += a[i] * b[i];
  }
  acc = detail::warp_sum(acc);
  if (lane == 0) Dv[row] = acc;
}

__global__ void dq_convert_kernel(bf* __restrict__ dq, const float* __restrict__ acc,
                                  int64_t n8) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n8;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(acc)[2 * i];
    const float4 b = reinterpret_cast<const float4*>(acc)[2 * i + 1];
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    detail::store8(dq + 8 * i, v);
  }
}

template <int D, int NW, int BM>
__global__ void __launch_bounds__(32 * NW, 1)
    bwd_kernel(float* __restrict__ dq_acc, bf* __restrict__ dk, bf* __restrict__ dv,
               const bf* __restrict__ dout, const bf* __restrict__ q, const bf* __restrict__ k,
               const bf* __restrict__ v, const float* __restrict__ lse,
               const float* __restrict__ Dv, const int64_t* __restrict__ seq_start, int Hq,
               int Hkv, float scale, float scale_log2) {
  using C = Bwd<D, NW, BM>;
  constexpr int BN = C::BN, NT = C::NT, P = C::P, PS = C::PS;
  extern __shared__ __align__(16) unsigned char smem[];
  bf* sK = reinterpret_cast<bf*>(smem);
  bf* sV = sK + BN * P;
  bf* sQ = sV + BN * P;       // [2][BM][P]
  bf* sdO = sQ + 2 * BM * P;  // [2][BM][P]
  bf* sdS = sdO + 2 * BM * P; // [BN][PS], dS^T: rows = keys
  float* sL = reinterpret_cast<float*>(sdS + BN * PS);  // [2][BM]
  float* sD = sL + 2 * BM;                              // [2][BM]

  const int n0 = blockIdx.x * BN, kh = blockIdx.y;  // low n first: the longest blocks
  const int64_t t0 = seq_start[blockIdx.z];
  const int len = static_cast<int>(seq_start[blockIdx.z + 1] - t0);
  if (n0 >= len) return;
  const int G = Hq / Hkv;
  const int64_t qs = int64_t(Hq) * D, kvs = int64_t(Hkv) * D;
  const int m_begin = (n0 / BM) * BM;  // first query tile holding a query >= n0
  const int nm = (len - m_begin + BM - 1) / BM, total = G * nm;

  load_tile<BN, D, NT>(sK, k + (t0 + n0) * kvs + kh * D, kvs, len - n0);
  load_tile<BN, D, NT>(sV, v + (t0 + n0) * kvs + kh * D, kvs, len - n0);
  auto load_q = [&](int i, int st) {
    const int h = kh * G + i / nm, m0 = m_begin + (i % nm) * BM;
    const int64_t off = (t0 + m0) * qs + h * D;
    load_tile<BM, D, NT>(sQ + st * BM * P, q + off, qs, len - m0);
    load_tile<BM, D, NT>(sdO + st * BM * P, dout + off, qs, len - m0);
    for (int r = threadIdx.x; r < BM; r += NT) {
      const bool ok = m0 + r < len;
      const int64_t e = ok ? (t0 + m0 + r) * Hq + h : 0;
      cp4(sL + st * BM + r, lse + e, ok);
      cp4(sD + st * BM + r, Dv + e, ok);
    }
  };
  load_q(0, 0);
  cp_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int kr = warp * 16;  // this warp's first key row in the tile
  float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dka[j][e] = dva[j][e] = 0.f;

  for (int i = 0; i < total; ++i) {
    const int st = i & 1, h = kh * G + i / nm, m0 = m_begin + (i % nm) * BM;
    cp_wait<0>();
    __syncthreads();  // tile i visible; everyone is done with tile i - 1 and with sdS
    if (i + 1 < total) {
      load_q(i + 1, st ^ 1);
      cp_commit();
    }
    const bf* cQ = sQ + st * BM * P;
    const bf* cO = sdO + st * BM * P;
    const float* cL = sL + st * BM;
    const float* cD = sD + st * BM;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries.
    float sc[BM / 8][4], dp[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] = dp[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm4(ak, sK + (kr + a_row(lane)) * P + kk * 16 + a_col(lane));
      ldsm4(av, sV + (kr + a_row(lane)) * P + kk * 16 + a_col(lane));
#pragma unroll
      for (int nb = 0; nb < BM / 16; ++nb) {
        uint32_t bq[4], bo[4];
        ldsm4(bq, cQ + (nb * 16 + bn_row(lane)) * P + kk * 16 + bn_col(lane));
        ldsm4(bo, cO + (nb * 16 + bn_row(lane)) * P + kk * 16 + bn_col(lane));
        mma(sc[2 * nb], ak, bq[0], bq[1]);
        mma(sc[2 * nb + 1], ak, bq[2], bq[3]);
        mma(dp[2 * nb], av, bo[0], bo[1]);
        mma(dp[2 * nb + 1], av, bo[2], bo[3]);
      }
    }

    // P^T = exp(S^T * scale - lse) (0 above the diagonal and past the sequence's end);
    // dS^T = P^T (dP^T - D) * scale, in place of dP^T.
    const bool mask = m0 < n0 + BN - 1 || m0 + BM > len;
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      const int qc = j * 8 + 2 * t;
      const float2 L = *reinterpret_cast<const float2*>(cL + qc);
      const float2 Dq = *reinterpret_cast<const float2*>(cD + qc);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = e & 1;
        float p = ex2(fmaf(sc[j][e], scale_log2, -(c ? L.y : L.x) * kLog2e));
        if (mask) {
          const int key = n0 + kr + g + (e >= 2 ? 8 : 0), query = m0 + qc + c;
          if (query < key || query >= len) p = 0.f;
        }
        sc[j][e] = p;
        dp[j][e] = p * (dp[j][e] - (c ? Dq.y : Dq.x)) * scale;
      }
    }

    // dV += P^T dO, dK += dS^T Q: A fragments straight from the accumulators.
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq) {
      const uint32_t ap[4] = {pack(sc[2 * kq][0], sc[2 * kq][1]), pack(sc[2 * kq][2], sc[2 * kq][3]),
                              pack(sc[2 * kq + 1][0], sc[2 * kq + 1][1]),
                              pack(sc[2 * kq + 1][2], sc[2 * kq + 1][3])};
      const uint32_t as[4] = {pack(dp[2 * kq][0], dp[2 * kq][1]), pack(dp[2 * kq][2], dp[2 * kq][3]),
                              pack(dp[2 * kq + 1][0], dp[2 * kq + 1][1]),
                              pack(dp[2 * kq + 1][2], dp[2 * kq + 1][3])};
#pragma unroll
      for (int db = 0; db < D / 16; ++db) {
        uint32_t bo[4], bq[4];
        ldsm4t(bo, cO + (kq * 16 + bk_row(lane)) * P + db * 16 + bk_col(lane));
        ldsm4t(bq, cQ + (kq * 16 + bk_row(lane)) * P + db * 16 + bk_col(lane));
        mma(dva[2 * db], ap, bo[0], bo[1]);
        mma(dva[2 * db + 1], ap, bo[2], bo[3]);
        mma(dka[2 * db], as, bq[0], bq[1]);
        mma(dka[2 * db + 1], as, bq[2], bq[3]);
      }
    }

    // dS^T -> shared, then dQ[m-tile mq, cols dc0..] = dS K over all BN keys.
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      *reinterpret_cast<uint32_t*>(sdS + (kr + g) * PS + j * 8 + 2 * t) = pack(dp[j][0], dp[j][1]);
      *reinterpret_cast<uint32_t*>(sdS + (kr + g + 8) * PS + j * 8 + 2 * t) =
          pack(dp[j][2], dp[j][3]);
    }
    __syncthreads();
    const int mq = warp % C::MTQ, dc0 = (warp / C::MTQ) * C::DQC;
    float dqa[C::DQC / 8][4];
#pragma unroll
    for (int j = 0; j < C::DQC / 8; ++j) dqa[j][0] = dqa[j][1] = dqa[j][2] = dqa[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];  // dS (m = query, k = key) read transposed from dS^T
      ldsm4t(a, sdS + (kk * 16 + bn_row(lane)) * PS + mq * 16 + bn_col(lane));
#pragma unroll
      for (int db = 0; db < C::DQC / 16; ++db) {
        uint32_t b[4];
        ldsm4t(b, sK + (kk * 16 + bk_row(lane)) * P + dc0 + db * 16 + bk_col(lane));
        mma(dqa[2 * db], a, b[0], b[1]);
        mma(dqa[2 * db + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + mq * 16 + g + 8 * r;
      if (row < len) {
        float* dst = dq_acc + (t0 + row) * qs + h * D + dc0 + 2 * t;
#pragma unroll
        for (int j = 0; j < C::DQC / 8; ++j)
          atomic_add2(dst + j * 8, dqa[j][2 * r], dqa[j][2 * r + 1]);
      }
    }
  }

  // dK, dV of this warp's keys (each thread: rows g, g+8; columns 2t, 2t+1 of each block).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + kr + g + 8 * r;
    if (key < len) {
      const int64_t off = (t0 + key) * kvs + kh * D + 2 * t;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<uint32_t*>(dk + off + j * 8) = pack(dka[j][2 * r], dka[j][2 * r + 1]);
        *reinterpret_cast<uint32_t*>(dv + off + j * 8) = pack(dva[j][2 * r], dva[j][2 * r + 1]);
      }
    }
  }
}

template <int D, int NW, int BM>
void launch(float* dq_acc, bf* dk, bf* dv, const bf* dout, const bf* q, const bf* k,
            const bf* v, const float* lse, const float* Dv, const int64_t* ss,
            const AttentionShape& s, cudaStream_t stream) {
  using C = Bwd<D, NW, BM>;
  auto kern = bwd_kernel<D, NW, BM>;
  FTUNE_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(C::kSmem)));
  const dim3 grid(static_cast<unsigned>((s.max_seqlen + C::BN - 1) / C::BN), s.Hkv,
                  static_cast<unsigned>(s.num_seqs));
  const float scale = 1.f / sqrtf(static_cast<float>(D));
  kern<<<grid, C::NT, C::kSmem, stream>>>(dq_acc, dk, dv, dout, q, k, v, lse, Dv, ss, s.Hq,
                                          s.Hkv, scale, scale * kLog2e);
  FTUNE_CUDA_LAUNCH_CHECK();
}

size_t round256(size_t b) { return (b + 255) / 256 * 256; }

}  // namespace
}  // namespace fa

size_t flash_attention_backward_workspace(const AttentionShape& s) {
  const size_t rows = static_cast<size_t>(s.num_tokens) * s.Hq;
  return fa::round256(rows * s.d * sizeof(float)) + fa::round256(rows * sizeof(float));
}

void flash_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                              const float* lse, const bf16* q, const bf16* k, const bf16* v,
                              const int64_t* seq_start, const AttentionShape& s, void* workspace,
                              stream_t stream) {
  const void* ptrs[] = {dq, dk, dv, dout, out, q, k, v, workspace};
  fa::check_flash_args(s, ptrs, 9);
  if (s.num_tokens == 0 || s.num_seqs == 0 || s.max_seqlen == 0) return;
  const int64_t rows = s.num_tokens * s.Hq;
  float* dq_acc = static_cast<float*>(workspace);
  float* Dv = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                       fa::round256(size_t(rows) * s.d * sizeof(float)));
  FTUNE_CUDA_CHECK(cudaMemsetAsync(dq_acc, 0, size_t(rows) * s.d * sizeof(float), stream));
  const unsigned dblocks = static_cast<unsigned>((rows + 7) / 8);
  if (s.d == 64)
    fa::dot_do_o_kernel<64><<<dblocks, 256, 0, stream>>>(Dv, detail::dev(dout), detail::dev(out), rows);
  else
    fa::dot_do_o_kernel<128><<<dblocks, 256, 0, stream>>>(Dv, detail::dev(dout), detail::dev(out), rows);
  FTUNE_CUDA_LAUNCH_CHECK();

  auto* gk = detail::dev(dk);
  auto* gv = detail::dev(dv);
  const auto *go = detail::dev(dout), *gq = detail::dev(q), *gk_in = detail::dev(k),
             *gv_in = detail::dev(v);
  // Variants (FTUNE_FA_BWD) of the mma.sync kernel: <d, warps (keys per block = 16 x
  // warps), query-tile rows>; the default (0 without sm_90a, 4 or 8 anywhere) is the fastest
  // of them measured on an H200 (tools/results/attention_bench.md).
  const int var = fa::variant_from_env("FTUNE_FA_BWD");
  // On sm_90a the default is the Hopper wgmma kernel (attention_flash_bwd_sm90.cu); 5 picks
  // its 64-query tiles at d = 64 (6, 7, 9, 10 = its default); 8 is the mma.sync default
  // there too.
  if (fa::sm90_available() && (var == 0 || (var >= 5 && var != 8))) {
    fa::flash_backward_sm90(dq_acc, gk, gv, go, gq, gk_in, gv_in, lse, Dv, seq_start, s,
                            var == 5 ? 1 : 0, stream);
  } else if (s.d == 64) {
    if (var == 1) fa::launch<64, 4, 64>(dq_acc, gk, gv, go, gq, gk_in, gv_in, lse, Dv, seq_start, s, stream);
    else if (var == 3) fa::launch<64, 8, 128>(dq_acc, gk, gv, go, gq, gk_in, gv_in, lse, Dv, seq_start, s, stream);
    else if (var == 2) fa::launch<64, 8, 32>(dq_acc, gk, gv, go, gq, gk_in, gv_in, lse, Dv, seq_start, s, stream);
    else fa::launch<64, 8, 64>(dq_acc, gk, gv, go, gq, gk_in, gv_in, lse, Dv, seq_start, s, stream);
  } else {
    if (var == 1) fa::launch<128, 4, 64>(dq_acc, gk, gv, go, gq, gk_in, gv_in, lse, Dv, seq_start, s, stream);
    else if (var == 3) fa::launch<128, 4, 32>(dq_acc, gk, gv, go, gq, gk_in, gv_in, lse, Dv, seq_start, s, stream);
    else if (var == 2) fa::launch<128, 8, 32>(dq_acc, gk, gv, go, gq, gk_in, gv_in, lse, Dv, seq_start, s, stream);
    else fa::launch<128, 8, 64>(dq_acc, gk, gv, go, gq, gk_in, gv_in, lse, Dv, seq_start, s, stream);
  }
  const int64_t n8 = rows * s.d / 8;
  fa::dq_convert_kernel<<<detail::grid_for(n8, 256, 8192), 256, 0, stream>>>(
      detail::dev(dq), dq_acc, n8);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
