// Flash attention forward on Hopper warpgroup MMA (wgmma, sm_90a). Same scheme and outputs
// as attention_flash_fwd.cu (its mma.sync twin): one block = one 128-query tile of one
// query head of one sequence, two warpgroups of 64 queries each; the block walks the
// key/value tiles from the diagonal back to key 0 with K/V double-buffered by cp.async.
// S = Q K^T reads Q and K straight from swizzled shared memory; O += P V takes P from the
// S accumulators in registers (no shared-memory round trip) and V from shared memory.
#include "attention_flash.cuh"
#include "attention_flash_sm90.cuh"
#include "wgmma.cuh"

namespace ftune::cuda {
namespace fa {
namespace {

template <int D, int BN>
struct Fwd90 {
  static constexpr int BM = 128, NT = 256;
  static constexpr int kQ = BM * D * 2, kKV = BN * D * 2;
  static constexpr size_t kSmem = size_t(kQ) + 4 * kKV + 1024;  // + alignment slack
};

// Causal mask, then the online-softmax update of one 64 x BN score tile in place: sc
// becomes the unnormalised P, mx / ls the running max and sum of this thread's two rows
// (g, g + 8), corr the factors the output accumulated so far must be scaled by.
template <int BN>
__device__ __forceinline__ void softmax_tile(float (&sc)[BN / 2], float (&mx)[2], float (&ls)[2],
                                             float (&corr)[2], bool need_mask, int row0,
                                             int col0, int g, int t, float scale_log2) {
  if (need_mask) {
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row0 + g + (e >= 2 ? 8 : 0), col = col0 + j * 8 + 2 * t + (e & 1);
        if (col > row) sc[4 * j + e] = -INFINITY;
      }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float m = mx[r];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) m = fmaxf(m, fmaxf(sc[4 * j + 2 * r], sc[4 * j + 2 * r + 1]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    const float ms = m == -INFINITY ? 0.f : m * scale_log2;
    corr[r] = ex2(mx[r] * scale_log2 - ms);
    mx[r] = m;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      sc[4 * j + 2 * r] = ex2(fmaf(sc[4 * j + 2 * r], scale_log2, -ms));
      sc[4 * j + 2 * r + 1] = ex2(fmaf(sc[4 * j + 2 * r + 1], scale_log2, -ms));
      sum += sc[4 * j + 2 * r] + sc[4 * j + 2 * r + 1];
    }
    ls[r] = ls[r] * corr[r] + sum;
  }
}

template <int D>
__device__ __forceinline__ void scale_rows(float (&o)[D / 2], const float (&corr)[2]) {
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    o[4 * j] *= corr[0];
    o[4 * j + 1] *= corr[0];
    o[4 * j + 2] *= corr[1];
    o[4 * j + 3] *= corr[1];
  }
}

template <int BN>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[BN / 16][4], const float (&sc)[BN / 2]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) pa[kk][r] = pack(sc[8 * kk + 2 * r], sc[8 * kk + 2 * r + 1]);
}

// Normalise, lse, stage this warpgroup's 64 rows (plain row-major, pitch D + 8) in `stage`
// and write them out with 16-byte stores.
template <int D>
__device__ __forceinline__ void store_output(bf* __restrict__ out, float* __restrict__ lse,
                                             bf* stage, const float (&o)[D / 2],
                                             const float (&mx)[2], const float (&ls)[2],
                                             int64_t t0, int m0, int len, int h, int Hq,
                                             int grp, int warp, int g, int t,
                                             float scale_log2) {
  const int64_t qs = int64_t(Hq) * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = ls[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int tr = warp * 16 + g + 8 * r;  // row within the warpgroup's 64
    if (t == 0 && m0 + grp * 64 + tr < len)
      lse[(t0 + m0 + grp * 64 + tr) * Hq + h] = (mx[r] * scale_log2 + __log2f(l)) * kLn2;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<uint32_t*>(stage + tr * (D + 8) + j * 8 + 2 * t) =
          pack(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
  }
  wg::group_sync(grp);
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x % 128; i < 64 * kChunks; i += 128) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const int row = m0 + grp * 64 + r;
    if (row < len)
      *reinterpret_cast<uint4*>(out + (t0 + row) * qs + h * D + c) =
          *reinterpret_cast<const uint4*>(stage + r * (D + 8) + c);
  }
}

template <int D, int BN, int MINB>
__global__ void __launch_bounds__(256, MINB)
    fwd90_kernel(bf* __restrict__ out, float* __restrict__ lse, const bf* __restrict__ q,
                 const bf* __restrict__ k, const bf* __restrict__ v,
                 const int64_t* __restrict__ seq_start, int Hq, int Hkv, float scale_log2) {
  using C = Fwd90<D, BN>;
  constexpr int BM = C::BM, NT = C::NT;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sQ = sm;
  unsigned char* sK = sQ + C::kQ;       // [2] tiles of BN x D
  unsigned char* sV = sK + 2 * C::kKV;  // [2]

  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM, h = blockIdx.y;
  const int64_t t0 = seq_start[blockIdx.z];
  const int len = static_cast<int>(seq_start[blockIdx.z + 1] - t0);
  if (m0 >= len) return;
  const int kh = h / (Hq / Hkv);
  const int64_t qs = int64_t(Hq) * D, kvs = int64_t(Hkv) * D;
  const bf* kb = k + t0 * kvs + kh * D;
  const bf* vb = v + t0 * kvs + kh * D;
  const int nblocks = (min(len, m0 + BM) + BN - 1) / BN;

  auto load_kv = [&](int n, int st) {
    wg::load_tile_sw<BN, D, NT>(sK + st * C::kKV, kb + int64_t(n) * BN * kvs, kvs, len - n * BN);
    wg::load_tile_sw<BN, D, NT>(sV + st * C::kKV, vb + int64_t(n) * BN * kvs, kvs, len - n * BN);
  };
  wg::load_tile_sw<BM, D, NT>(sQ, q + (t0 + m0) * qs + h * D, qs, len - m0);
  load_kv(nblocks - 1, 0);
  cp_commit();

  const int grp = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wr = grp * 64 + warp * 16;  // this warp's first query row in the tile

  float o[D / 2];
  float mx[2] = {-INFINITY, -INFINITY}, ls[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;

  for (int it = 0; it < nblocks; ++it) {
    const int n = nblocks - 1 - it, st = it & 1;
    if (it + 1 < nblocks) {
      load_kv(n - 1, st ^ 1);  // that stage was released by the barrier ending it - 1
      cp_commit();
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    wg::fence_async_smem();
    __syncthreads();
    const unsigned char* cK = sK + st * C::kKV;
    const unsigned char* cV = sV + st * C::kKV;

    // S = Q K^T for this warpgroup's 64 queries x BN keys (raw, unscaled).
    float sc[BN / 2];
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk % 4) * 32;  // 16 columns = 32 bytes into the chunk
      const uint64_t da = wg::desc(sQ + (kk / 4) * BM * 128 + grp * 64 * 128 + koff, 16, 1024);
      const uint64_t db = wg::desc(cK + (kk / 4) * BN * 128 + koff, 16, 1024);
      wg::mma_ss<0, 0>(sc, da, db, kk > 0);
    }
    wg::commit();
    wg::wait<0>();
    wg::fence_regs(sc);

    float corr[2];
    softmax_tile<BN>(sc, mx, ls, corr, n * BN + BN - 1 > m0 + wr, m0 + wr, n * BN, g, t,
                     scale_log2);
    scale_rows<D>(o, corr);

    // O += P V: P from the S accumulators (bf16 A fragments), V N-major from shared memory.
    uint32_t pa[BN / 16][4];
    pack_p<BN>(pa, sc);
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      wg::mma_rs<1>(o, pa[kk], wg::desc(cV + kk * 16 * 128, BN * 128, 1024), true);
    wg::commit();
    wg::wait<0>();
    wg::fence_regs(o);
    wg::fence_regs(pa);
    __syncthreads();  // this stage may be overwritten by the next iteration's prefetch
  }

  // Epilogue over this warpgroup's own part of sQ (the loop ended in a barrier).
  bf* stage = reinterpret_cast<bf*>(sQ) + grp * 64 * (D + 8);
  static_assert(64 * (D + 8) * 2 * 2 <= C::kQ + 2 * C::kKV, "staging fits");
  store_output<D>(out, lse, stage, o, mx, ls, t0, m0, len, h, Hq, grp, warp, g, t, scale_log2);
}

// The same with FlashAttention-3's intra-warpgroup overlap: S for key tile it + 1 is issued
// together with O += P V for tile it, so the tensor cores work on both while the warps run
// the softmax of tile it + 1. V tiles arrive one iteration after their K tile (the V stage
// is free only once the P V product reading it is done).
template <int D, int BN, int MINB>
__global__ void __launch_bounds__(256, MINB)
    fwd90p_kernel(bf* __restrict__ out, float* __restrict__ lse, const bf* __restrict__ q,
                  const bf* __restrict__ k, const bf* __restrict__ v,
                  const int64_t* __restrict__ seq_start, int Hq, int Hkv, float scale_log2) {
  using C = Fwd90<D, BN>;
  constexpr int BM = C::BM, NT = C::NT;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sm = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sQ = sm;
  unsigned char* sK = sQ + C::kQ;       // [2] tiles of BN x D
  unsigned char* sV = sK + 2 * C::kKV;  // [2]

  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM, h = blockIdx.y;
  const int64_t t0 = seq_start[blockIdx.z];
  const int len = static_cast<int>(seq_start[blockIdx.z + 1] - t0);
  if (m0 >= len) return;
  const int kh = h / (Hq / Hkv);
  const int64_t qs = int64_t(Hq) * D, kvs = int64_t(Hkv) * D;
  const bf* kb = k + t0 * kvs + kh * D;
  const bf* vb = v + t0 * kvs + kh * D;
  const int nblocks = (min(len, m0 + BM) + BN - 1) / BN;
  // Iteration it works on key tile n = nblocks - 1 - it, in stage it & 1.
  auto load_k = [&](int it) {
    const int n = nblocks - 1 - it;
    wg::load_tile_sw<BN, D, NT>(sK + (it & 1) * C::kKV, kb + int64_t(n) * BN * kvs, kvs, len - n * BN);
  };
  auto load_v = [&](int it) {
    const int n = nblocks - 1 - it;
    wg::load_tile_sw<BN, D, NT>(sV + (it & 1) * C::kKV, vb + int64_t(n) * BN * kvs, kvs, len - n * BN);
  };

  const int grp = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wr = grp * 64 + warp * 16;  // this warp's first query row in the tile
  auto issue_s = [&](float (&sc)[BN / 2], int it) {
    const unsigned char* cK = sK + (it & 1) * C::kKV;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk % 4) * 32;  // 16 columns = 32 bytes into the chunk
      const uint64_t da = wg::desc(sQ + (kk / 4) * BM * 128 + grp * 64 * 128 + koff, 16, 1024);
      const uint64_t db = wg::desc(cK + (kk / 4) * BN * 128 + koff, 16, 1024);
      wg::mma_ss<0, 0>(sc, da, db, kk > 0);
    }
    wg::commit();
  };
  auto issue_pv = [&](float (&o)[D / 2], const uint32_t (&pa)[BN / 16][4], int it) {
    const unsigned char* cV = sV + (it & 1) * C::kKV;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      wg::mma_rs<1>(o, pa[kk], wg::desc(cV + kk * 16 * 128, BN * 128, 1024), true);
    wg::commit();
  };
  auto mask_needed = [&](int it) { return (nblocks - 1 - it) * BN + BN - 1 > m0 + wr; };

  wg::load_tile_sw<BM, D, NT>(sQ, q + (t0 + m0) * qs + h * D, qs, len - m0);
  load_k(0);
  cp_commit();
  cp_wait<0>();
  wg::fence_async_smem();
  __syncthreads();
  if (nblocks > 1) load_k(1);
  load_v(0);
  cp_commit();

  float o[D / 2];
  float mx[2] = {-INFINITY, -INFINITY}, ls[2] = {0.f, 0.f}, corr[2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  uint32_t pa[BN / 16][4];
  {
    float sc[BN / 2];
    wg::fence();
    issue_s(sc, 0);
    wg::wait<0>();
    wg::fence_regs(sc);
    softmax_tile<BN>(sc, mx, ls, corr, mask_needed(0), m0 + wr, (nblocks - 1) * BN, g, t,
                     scale_log2);
    pack_p<BN>(pa, sc);
  }

  for (int it = 1; it < nblocks; ++it) {
    // K(it) and V(it - 1) landed; everyone is done with K(it - 1) and V(it - 2).
    cp_wait<0>();
    wg::fence_async_smem();
    __syncthreads();
    if (it + 1 < nblocks) load_k(it + 1);
    load_v(it);
    cp_commit();

    float sc[BN / 2];
    wg::fence();
    issue_s(sc, it);
    issue_pv(o, pa, it - 1);
    wg::wait<1>();
    wg::fence_regs(sc);
    softmax_tile<BN>(sc, mx, ls, corr, mask_needed(it), m0 + wr, (nblocks - 1 - it) * BN, g,
                     t, scale_log2);
    wg::wait<0>();
    wg::fence_regs(o);
    wg::fence_regs(pa);
    scale_rows<D>(o, corr);
    pack_p<BN>(pa, sc);
  }
  cp_wait<0>();
  wg::fence_async_smem();
  __syncthreads();
  wg::fence();
  issue_pv(o, pa, nblocks - 1);
  wg::wait<0>();
  wg::fence_regs(o);
  wg::fence_regs(pa);
  __syncthreads();  // every warpgroup is done with sQ / sK before the staging overwrites them

  bf* stage = reinterpret_cast<bf*>(sQ) + grp * 64 * (D + 8);
  store_output<D>(out, lse, stage, o, mx, ls, t0, m0, len, h, Hq, grp, warp, g, t, scale_log2);
}

template <int D, int BN, int MINB = 1, bool PIPE = false>
void launch90(bf* out, float* lse, const bf* q, const bf* k, const bf* v, const int64_t* ss,
              const AttentionShape& s, cudaStream_t stream) {
  using C = Fwd90<D, BN>;
  auto kern = [] {
    if constexpr (PIPE) return fwd90p_kernel<D, BN, MINB>;
    else return fwd90_kernel<D, BN, MINB>;
  }();
  FTUNE_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(C::kSmem)));
  const dim3 grid(static_cast<unsigned>((s.max_seqlen + C::BM - 1) / C::BM), s.Hq,
                  static_cast<unsigned>(s.num_seqs));
  const float scale_log2 = kLog2e / sqrtf(static_cast<float>(D));
  kern<<<grid, C::NT, C::kSmem, stream>>>(out, lse, q, k, v, ss, s.Hq, s.Hkv, scale_log2);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace

void flash_forward_sm90(bf* out, float* lse, const bf* q, const bf* k, const bf* v,
                        const int64_t* seq_start, const AttentionShape& s, int variant,
                        cudaStream_t stream) {
  // variant 1: 128-key tiles, 2: 64, 3: 64 at two blocks per SM (registers capped at 128,
  // which costs d = 128 a few spilled bytes and still wins: 321 against 294 TFLOP/s); 5, 6:
  // the overlapped kernel (fwd90p) with 128- and 64-key tiles (d = 64: 64 at two blocks per
  // SM, it fits in 128 registers). 0, the default, is the fastest measured on an H200
  // (tools/results/attention_bench.md): 6 at d = 64 (298 against 287-292 for 3), 3 at
  // d = 128 (the overlapped kernel at one block per SM: 312 against 316-325).
  if (s.d == 64) {
    if (variant == 1) launch90<64, 128>(out, lse, q, k, v, seq_start, s, stream);
    else if (variant == 2) launch90<64, 64>(out, lse, q, k, v, seq_start, s, stream);
    else if (variant == 3) launch90<64, 64, 2>(out, lse, q, k, v, seq_start, s, stream);
    else if (variant == 5) launch90<64, 128, 1, true>(out, lse, q, k, v, seq_start, s, stream);
    else launch90<64, 64, 2, true>(out, lse, q, k, v, seq_start, s, stream);
  } else {
    if (variant == 1) launch90<128, 128>(out, lse, q, k, v, seq_start, s, stream);
    else if (variant == 2) launch90<128, 64>(out, lse, q, k, v, seq_start, s, stream);
    else if (variant == 5) launch90<128, 128, 1, true>(out, lse, q, k, v, seq_start, s, stream);
    else if (variant == 6) launch90<128, 64, 1, true>(out, lse, q, k, v, seq_start, s, stream);
    else launch90<128, 64, 2>(out, lse, q, k, v, seq_start, s, stream);
  }
}

}  // namespace fa
}  // namespace ftune::cuda
