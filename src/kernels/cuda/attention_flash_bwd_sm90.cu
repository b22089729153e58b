// Flash attention backward on Hopper warpgroup MMA (wgmma, sm_90a): the scheme of
// attention_flash_bwd.cu (its mma.sync twin; D, dQ workspace and conversion are shared)
// with the five products on wgmma. One block = 128 keys of one kv head of one sequence, two
// warpgroups of 64 keys each; it loops over every query head of its GQA group and every
// 64-query tile at or past the diagonal, Q / dO / lse / D double-buffered by cp.async.
// Per tile, each warpgroup:
//   S^T = K Q^T, dP^T = V dO^T        (A = K / V, B = Q / dO, both K-major in shared memory)
//   P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - D) scale   (registers)
//   dV += P^T dO, dK += dS^T Q        (A = P^T / dS^T from registers, B N-major)
// then dS^T goes to shared memory and warpgroup w adds dQ[:, w-th half of d] = dS K over all
// 128 keys (A = dS, M-major; B = K, N-major) into the fp32 workspace with float2 atomics.
// dK, dV stay in registers for the whole loop (deterministic, no GQA expansion).
// Where the time goes (H200, variants that leave a stage out): without the dQ atomics the
// kernel takes 0.556 against 0.718 ms at d = 128 and 0.640 against 0.809 at d = 64, so they
// are a fifth of it. Tried and measured no faster: dQ through a shared-memory tile and one
// bulk reduction (cp.reduce.async.bulk) per row behind block barriers (236 against 248
// TFLOP/s at d = 128); tile i's dQ product issued after tile i + 1's S^T / dP^T, so that it
// overlaps their softmax (245-250 TFLOP/s either way).
#include "attention_flash.cuh"
#include "attention_flash_sm90.cuh"
#include "wgmma.cuh"

namespace ftune::cuda {
namespace fa {
namespace {

template <int D, int BM>
struct Bwd90 {
  static constexpr int BN = 128, NT = 256;
  // dQ: with 64-query tiles warpgroup w takes columns [w d/2, (w+1) d/2) of all 64 rows;
  // with 128 it takes rows [64 w, 64 w + 64) and every column.
  static constexpr int kDqN = BM == 64 ? D / 2 : D;
  static constexpr int kKV = BN * D * 2, kQ = BM * D * 2, kS = BN * BM * 2;
  static constexpr size_t kSmem = size_t(2 * kKV + 4 * kQ + kS) + 4 * BM * sizeof(float) + 1024;
};

template <int D, int BM>
__global__ void __launch_bounds__(256, 1)
    bwd90_kernel(float* __restrict__ dq_acc, bf* __restrict__ dk, bf* __restrict__ dv,
                 const bf* __restrict__ dout, const bf* __restrict__ q,
                 const bf* __restrict__ k, const bf* __restrict__ v,
                 const float* __restrict__ lse, const float* __restrict__ Dv,
                 const int64_t* __restrict__ seq_start, int Hq, int Hkv, float scale,
                 float scale_log2) {
  using C = Bwd90<D, BM>;
  constexpr int BN = C::BN, NT = C::NT, DQN = C::kDqN;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sK = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sV = sK + C::kKV;
  unsigned char* sQ = sV + C::kKV;      // [2] tiles of BM x D
  unsigned char* sdO = sQ + 2 * C::kQ;  // [2]
  unsigned char* sdS = sdO + 2 * C::kQ; // dS^T: BN keys x BM queries (BM / 64 chunks)
  float* sL = reinterpret_cast<float*>(sdS + C::kS);  // [2][BM]
  float* sD = sL + 2 * BM;                            // [2][BM]

  const int n0 = blockIdx.x * BN, kh = blockIdx.y;
  const int64_t t0 = seq_start[blockIdx.z];
  const int len = static_cast<int>(seq_start[blockIdx.z + 1] - t0);
  if (n0 >= len) return;
  const int G = Hq / Hkv;
  const int64_t qs = int64_t(Hq) * D, kvs = int64_t(Hkv) * D;
  const int m_begin = (n0 / BM) * BM;
  const int nm = (len - m_begin + BM - 1) / BM, total = G * nm;

  wg::load_tile_sw<BN, D, NT>(sK, k + (t0 + n0) * kvs + kh * D, kvs, len - n0);
  wg::load_tile_sw<BN, D, NT>(sV, v + (t0 + n0) * kvs + kh * D, kvs, len - n0);
  auto load_q = [&](int i, int st) {
    const int h = kh * G + i / nm, m0 = m_begin + (i % nm) * BM;
    const int64_t off = (t0 + m0) * qs + h * D;
    wg::load_tile_sw<BM, D, NT>(sQ + st * C::kQ, q + off, qs, len - m0);
    wg::load_tile_sw<BM, D, NT>(sdO + st * C::kQ, dout + off, qs, len - m0);
    for (int r = threadIdx.x; r < BM; r += NT) {
      const bool ok = m0 + r < len;
      const int64_t e = ok ? (t0 + m0 + r) * Hq + h : 0;
      cp4(sL + st * BM + r, lse + e, ok);
      cp4(sD + st * BM + r, Dv + e, ok);
    }
  };
  load_q(0, 0);
  cp_commit();

  const int grp = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int kr = grp * 64 + warp * 16;  // this warp's first key row in the tile
  float dka[D / 2], dva[D / 2];
#pragma unroll
  for (int j = 0; j < D / 2; ++j) dka[j] = dva[j] = 0.f;

  for (int i = 0; i < total; ++i) {
    const int st = i & 1, h = kh * G + i / nm, m0 = m_begin + (i % nm) * BM;
    cp_wait<0>();
    wg::fence_async_smem();
    __syncthreads();  // tile i visible; everyone is done with tile i - 1 and with sdS
    if (i + 1 < total) {
      load_q(i + 1, st ^ 1);
      cp_commit();
    }
    const unsigned char* cQ = sQ + st * C::kQ;
    const unsigned char* cO = sdO + st * C::kQ;
    const float* cL = sL + st * BM;
    const float* cD = sD + st * BM;

    float sc[BM / 2], dp[BM / 2];
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk % 4) * 32;
      wg::mma_ss<0, 0>(sc, wg::desc(sK + (kk / 4) * BN * 128 + grp * 64 * 128 + koff, 16, 1024),
                       wg::desc(cQ + (kk / 4) * BM * 128 + koff, 16, 1024), kk > 0);
    }
    wg::commit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk % 4) * 32;
      wg::mma_ss<0, 0>(dp, wg::desc(sV + (kk / 4) * BN * 128 + grp * 64 * 128 + koff, 16, 1024),
                       wg::desc(cO + (kk / 4) * BM * 128 + koff, 16, 1024), kk > 0);
    }
    wg::commit();

    // P^T (0 above the diagonal and past the sequence's end), then dS^T in place of dP^T.
    wg::wait<1>();
    wg::fence_regs(sc);
    const bool mask = m0 < n0 + kr + 15 || m0 + BM > len;
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      const int qc = j * 8 + 2 * t;
      const float2 L = *reinterpret_cast<const float2*>(cL + qc);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float p = ex2(fmaf(sc[4 * j + e], scale_log2, -((e & 1) ? L.y : L.x) * kLog2e));
        if (mask) {
          const int key = n0 + kr + g + (e >= 2 ? 8 : 0), query = m0 + qc + (e & 1);
          if (query < key || query >= len) p = 0.f;
        }
        sc[4 * j + e] = p;
      }
    }
    wg::wait<0>();
    wg::fence_regs(dp);
    uint32_t ap[BM / 16][4], as[BM / 16][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      const float2 Dq = *reinterpret_cast<const float2*>(cD + j * 8 + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e)
        dp[4 * j + e] = sc[4 * j + e] * (dp[4 * j + e] - ((e & 1) ? Dq.y : Dq.x)) * scale;
    }
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        ap[kq][r] = pack(sc[8 * kq + 2 * r], sc[8 * kq + 2 * r + 1]);
        as[kq][r] = pack(dp[8 * kq + 2 * r], dp[8 * kq + 2 * r + 1]);
      }

    // dV += P^T dO, dK += dS^T Q (B = dO / Q, rows = queries = the reduction, N-major).
    wg::fence();
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq)
      wg::mma_rs<1>(dva, ap[kq], wg::desc(cO + kq * 16 * 128, BM * 128, 1024), true);
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq)
      wg::mma_rs<1>(dka, as[kq], wg::desc(cQ + kq * 16 * 128, BM * 128, 1024), true);
    wg::commit();

    // dS^T -> shared memory (swizzled; as[kq] = rows g / g+8, columns 16kq + 2t (+8)).
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = kr + g + 8 * (r & 1), col = kq * 16 + 8 * (r >> 1) + 2 * t;
        *reinterpret_cast<uint32_t*>(sdS + wg::sw_offset<BN>(row, col)) = as[kq][r];
      }
    wg::fence_async_smem();
    __syncthreads();

    // dQ (this warpgroup's share, C::kDqN) = dS K: A = dS (queries x keys) read M-major
    // from dS^T, B = K rows (keys = the reduction) N-major.
    const int q_row0 = BM == 64 ? 0 : grp * 64, q_col0 = BM == 64 ? grp * (D / 2) : 0;
    float dqa[DQN / 2];
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      // column q_col0 of K: chunk q_col0 / 64, then (d = 64, N = 32) 64 bytes into the row
      const unsigned char* kb =
          sK + (q_col0 / 64) * BN * 128 + (q_col0 % 64) * 2 + kk * 16 * 128;
      wg::mma_ss<1, 1>(dqa, wg::desc(sdS + (q_row0 / 64) * BN * 128 + kk * 16 * 128, BN * 128, 1024),
                       wg::desc(kb, BN * 128, 1024), kk > 0);
    }
    wg::commit();
    wg::wait<0>();
    wg::fence_regs(dqa);
    wg::fence_regs(dka);
    wg::fence_regs(dva);
    wg::fence_regs(ap);
    wg::fence_regs(as);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + q_row0 + warp * 16 + g + 8 * r;
      if (row < len) {
        float* dst = dq_acc + (t0 + row) * qs + h * D + q_col0 + 2 * t;
#pragma unroll
        for (int j = 0; j < DQN / 8; ++j) atomic_add2(dst + j * 8, dqa[4 * j + 2 * r], dqa[4 * j + 2 * r + 1]);
      }
    }
  }

  // dK, dV of this warp's keys (rows g, g+8; columns 2t, 2t+1 of each 8-column block).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + kr + g + 8 * r;
    if (key < len) {
      const int64_t off = (t0 + key) * kvs + kh * D + 2 * t;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<uint32_t*>(dk + off + j * 8) = pack(dka[4 * j + 2 * r], dka[4 * j + 2 * r + 1]);
        *reinterpret_cast<uint32_t*>(dv + off + j * 8) = pack(dva[4 * j + 2 * r], dva[4 * j + 2 * r + 1]);
      }
    }
  }
}

template <int D, int BM>
void launch90(float* dq_acc, bf* dk, bf* dv, const bf* dout, const bf* q, const bf* k,
              const bf* v, const float* lse, const float* Dv, const int64_t* ss,
              const AttentionShape& s, cudaStream_t stream) {
  using C = Bwd90<D, BM>;
  auto kern = bwd90_kernel<D, BM>;
  FTUNE_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(C::kSmem)));
  const dim3 grid(static_cast<unsigned>((s.max_seqlen + C::BN - 1) / C::BN), s.Hkv,
                  static_cast<unsigned>(s.num_seqs));
  const float scale = 1.f / sqrtf(static_cast<float>(D));
  kern<<<grid, C::NT, C::kSmem, stream>>>(dq_acc, dk, dv, dout, q, k, v, lse, Dv, ss, s.Hq,
                                          s.Hkv, scale, scale * kLog2e);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace

void flash_backward_sm90(float* dq_acc, bf* dk, bf* dv, const bf* dout, const bf* q,
                         const bf* k, const bf* v, const float* lse, const float* Dv,
                         const int64_t* seq_start, const AttentionShape& s, int variant,
                         cudaStream_t stream) {
  // Query tiles: d = 64 defaults to 128 (220 against 199 TFLOP/s on an H200), variant 1
  // takes 64; d = 128 always 64 (at 128 the accumulators would not fit in registers).
  if (s.d == 64 && variant != 1)
    launch90<64, 128>(dq_acc, dk, dv, dout, q, k, v, lse, Dv, seq_start, s, stream);
  else if (s.d == 64)
    launch90<64, 64>(dq_acc, dk, dv, dout, q, k, v, lse, Dv, seq_start, s, stream);
  else
    launch90<128, 64>(dq_acc, dk, dv, dout, q, k, v, lse, Dv, seq_start, s, stream);
}

}  // namespace fa
}  // namespace ftune::cuda
