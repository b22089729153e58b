// Flash attention forward (FlashAttention-2 scheme) on mma.sync bf16 tensor cores.
// One block = one query tile (BM rows) of one query head of one sequence; its warps own
// 16*MT rows each, so softmax statistics never leave a warp (quad shuffles only). The block
// walks the key/value tiles of its sequence from the diagonal back to key 0 (only the
// first one or two tiles need the causal mask), with K/V double-buffered in shared memory
// by cp.async so the next tile's loads overlap this tile's math.
#include "attention_flash.cuh"
#include "attention_flash_sm90.cuh"

namespace ftune::cuda {
namespace fa {
namespace {

template <int D, int MT, int NW, int BN>
struct Fwd {
  static constexpr int BM = 16 * MT * NW, NT = 32 * NW, P = D + 8;
  static constexpr bool kQReg = MT * D <= 128;  // Q fragments held in registers if cheap
  static constexpr size_t kSmem = size_t(BM + 4 * BN) * P * sizeof(bf);  // Q, 2x(K, V)
};

template <int D, int MT, int NW, int BN>
__global__ void __launch_bounds__(32 * NW)
    fwd_kernel(bf* __restrict__ out, float* __restrict__ lse, const bf* __restrict__ q,
               const bf* __restrict__ k, const bf* __restrict__ v,
               const int64_t* __restrict__ seq_start, int Hq, int Hkv, float scale_log2) {
  using C = Fwd<D, MT, NW, BN>;
  constexpr int BM = C::BM, P = C::P, NT = C::NT;
  extern __shared__ __align__(16) unsigned char smem[];
  bf* sQ = reinterpret_cast<bf*>(smem);
  bf* sK = sQ + BM * P;      // [2][BN][P]
  bf* sV = sK + 2 * BN * P;  // [2][BN][P]

  // Reversed tile index: within a (head, sequence) the long diagonal tiles start first.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM, h = blockIdx.y;
  const int64_t t0 = seq_start[blockIdx.z];
  const int len = static_cast<int>(seq_start[blockIdx.z + 1] - t0);
  if (m0 >= len) return;  // grid is sized by max_seqlen
  const int kh = h / (Hq / Hkv);
  const int64_t qs = int64_t(Hq) * D, kvs = int64_t(Hkv) * D;
  const bf* kb = k + t0 * kvs + kh * D;
  const bf* vb = v + t0 * kvs + kh * D;
  const int nblocks = (min(len, m0 + BM) + BN - 1) / BN;  // causal: keys < m0 + BM

  auto load_kv = [&](int n, int st) {
    load_tile<BN, D, NT>(sK + st * BN * P, kb + int64_t(n) * BN * kvs, kvs, len - n * BN);
    load_tile<BN, D, NT>(sV + st * BN * P, vb + int64_t(n) * BN * kvs, kvs, len - n * BN);
  };
  load_tile<BM, D, NT>(sQ, q + (t0 + m0) * qs + h * D, qs, len - m0);
  load_kv(nblocks - 1, 0);
  cp_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wr = warp * 16 * MT;  // first tile row of this warp

  float o[MT][D / 8][4];
  float mx[MT][2], ls[MT][2];  // running max (raw scores) and this thread's partial row sum
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    mx[mt][0] = mx[mt][1] = -INFINITY;
    ls[mt][0] = ls[mt][1] = 0.f;
  }
  uint32_t qf[C::kQReg ? MT : 1][C::kQReg ? D / 16 : 1][4];

  for (int it = 0; it < nblocks; ++it) {
    const int n = nblocks - 1 - it, st = it & 1;
    if (it + 1 < nblocks) {
      load_kv(n - 1, st ^ 1);  // that stage was released by the barrier ending it - 1
      cp_commit();
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    __syncthreads();
    if constexpr (C::kQReg) {
      if (it == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk)
            ldsm4(qf[mt][kk], sQ + (wr + mt * 16 + a_row(lane)) * P + kk * 16 + a_col(lane));
      }
    }
    const bf* cK = sK + st * BN * P;
    const bf* cV = sV + st * BN * P;

    // S = Q K^T (raw, unscaled) for this warp's rows.
    float sc[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) sc[mt][j][0] = sc[mt][j][1] = sc[mt][j][2] = sc[mt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
      if constexpr (C::kQReg) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int r = 0; r < 4; ++r) a[mt][r] = qf[mt][kk][r];
      } else {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldsm4(a[mt], sQ + (wr + mt * 16 + a_row(lane)) * P + kk * 16 + a_col(lane));
      }
#pragma unroll
      for (int nb = 0; nb < BN / 16; ++nb) {
        uint32_t b[4];
        ldsm4(b, cK + (nb * 16 + bn_row(lane)) * P + kk * 16 + bn_col(lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(sc[mt][2 * nb], a[mt], b[0], b[1]);
          mma(sc[mt][2 * nb + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // Causal mask, only on tiles that reach past the tile's first query.
    if (n * BN + BN - 1 > m0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m0 + wr + mt * 16 + g + (e >= 2 ? 8 : 0);
            const int col = n * BN + j * 8 + 2 * t + (e & 1);
            if (col > row) sc[mt][j][e] = -INFINITY;
          }
    }

    // Online softmax: rescale the running output by exp(old max - new max).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float m = mx[mt][r];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) m = fmaxf(m, fmaxf(sc[mt][j][2 * r], sc[mt][j][2 * r + 1]));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        // A row with every key so far masked keeps max -inf: use 0 so no inf - inf = NaN.
        const float ms = m == -INFINITY ? 0.f : m * scale_log2;
        const float corr = ex2(mx[mt][r] * scale_log2 - ms);
        mx[mt][r] = m;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          sc[mt][j][2 * r] = ex2(fmaf(sc[mt][j][2 * r], scale_log2, -ms));
          sc[mt][j][2 * r + 1] = ex2(fmaf(sc[mt][j][2 * r + 1], scale_log2, -ms));
          sum += sc[mt][j][2 * r] + sc[mt][j][2 * r + 1];
        }
        ls[mt][r] = ls[mt][r] * corr + sum;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          o[mt][j][2 * r] *= corr;
          o[mt][j][2 * r + 1] *= corr;
        }
      }

    // O += P V, P repacked from the S accumulators as bf16 A fragments.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
        pa[mt][1] = pack(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
        pa[mt][2] = pack(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
        pa[mt][3] = pack(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int db = 0; db < D / 16; ++db) {
        uint32_t b[4];
        ldsm4t(b, cV + (kk * 16 + bk_row(lane)) * P + db * 16 + bk_col(lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(o[mt][2 * db], pa[mt], b[0], b[1]);
          mma(o[mt][2 * db + 1], pa[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage may be overwritten by the next iteration's prefetch
  }

  // Epilogue: normalise, lse, stage the warp's rows in sQ (its own rows only) and write them
  // out with 16-byte stores.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = ls[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int tr = wr + mt * 16 + g + 8 * r;
      if (t == 0 && m0 + tr < len)
        lse[(t0 + m0 + tr) * Hq + h] = (mx[mt][r] * scale_log2 + __log2f(l)) * kLn2;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<uint32_t*>(sQ + tr * P + j * 8 + 2 * t) =
            pack(o[mt][j][2 * r] * inv, o[mt][j][2 * r + 1] * inv);
    }
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = lane; i < 16 * MT * kChunks; i += 32) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    if (m0 + wr + r < len)
      *reinterpret_cast<uint4*>(out + (t0 + m0 + wr + r) * qs + h * D + c) =
          *reinterpret_cast<const uint4*>(sQ + (wr + r) * P + c);
  }
}

template <int D, int MT, int NW, int BN>
void launch(bf* out, float* lse, const bf* q, const bf* k, const bf* v, const int64_t* ss,
            const AttentionShape& s, cudaStream_t stream) {
  using C = Fwd<D, MT, NW, BN>;
  auto kern = fwd_kernel<D, MT, NW, BN>;
  FTUNE_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(C::kSmem)));
  const dim3 grid(static_cast<unsigned>((s.max_seqlen + C::BM - 1) / C::BM), s.Hq,
                  static_cast<unsigned>(s.num_seqs));
  const float scale_log2 = kLog2e / sqrtf(static_cast<float>(D));
  kern<<<grid, C::NT, C::kSmem, stream>>>(out, lse, q, k, v, ss, s.Hq, s.Hkv, scale_log2);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fa

void flash_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                             const int64_t* seq_start, const AttentionShape& s, stream_t stream) {
  const void* ptrs[] = {out, q, k, v};
  fa::check_flash_args(s, ptrs, 4);
  if (s.num_tokens == 0 || s.num_seqs == 0 || s.max_seqlen == 0) return;
  auto* o = detail::dev(out);
  const auto *dq = detail::dev(q), *dk = detail::dev(k), *dv = detail::dev(v);
  // Variants (FTUNE_FA_FWD) of the mma.sync kernel: <d, 16-row m-tiles per warp, warps,
  // key-tile width>; the default (0 without sm_90a, 8 anywhere) is the fastest of them
  // measured on an H200 (tools/results/attention_bench.md).
  const int var = fa::variant_from_env("FTUNE_FA_FWD");
  // On sm_90a the default is the Hopper wgmma kernels; 5, 6, 7 pick the 128-key, 64-key and
  // 64-key-at-two-blocks-per-SM tiles, 9, 10 the overlapped kernel with 128- and 64-key
  // tiles (attention_flash_fwd_sm90.cu; elsewhere they fall back to the mma.sync default);
  // 8 is the mma.sync default there too.
  if (fa::sm90_available() && (var == 0 || (var >= 5 && var != 8))) {
    fa::flash_forward_sm90(o, lse, dq, dk, dv, seq_start, s, var == 0 ? 0 : var - 4, stream);
    return;
  }
  if (s.d == 64) {
    if (var == 1) fa::launch<64, 1, 4, 64>(o, lse, dq, dk, dv, seq_start, s, stream);
    else if (var == 2) fa::launch<64, 2, 4, 128>(o, lse, dq, dk, dv, seq_start, s, stream);
    else if (var == 3) fa::launch<64, 1, 8, 128>(o, lse, dq, dk, dv, seq_start, s, stream);
    else if (var == 4) fa::launch<64, 2, 8, 64>(o, lse, dq, dk, dv, seq_start, s, stream);
    else fa::launch<64, 2, 4, 64>(o, lse, dq, dk, dv, seq_start, s, stream);
  } else {
    if (var == 1) fa::launch<128, 1, 4, 64>(o, lse, dq, dk, dv, seq_start, s, stream);
    else if (var == 2) fa::launch<128, 2, 4, 64>(o, lse, dq, dk, dv, seq_start, s, stream);
    else if (var == 3) fa::launch<128, 1, 8, 128>(o, lse, dq, dk, dv, seq_start, s, stream);
    else if (var == 4) fa::launch<128, 1, 8, 64>(o, lse, dq, dk, dv, seq_start, s, stream);
    else fa::launch<128, 2, 4, 32>(o, lse, dq, dk, dv, seq_start, s, stream);
  }
}

}  // namespace ftune::cuda
