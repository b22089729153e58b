// The backward of LoRA's up product (see cuda_lora.hpp): dB += scale dy^T u and du = scale dy B
// in one tensor-core pass over dy [N, out], the largest operand, which the two cuBLASLt
// GEMMs it replaces read once each (at rank 8 both are bound by that read).
//
// A block of 8 warps owns kCols = 512 adjacent columns of dy (64 per warp) and one group of
// rows, walked in stages of kStageRows rows (cp.async, kStages deep, padded rows so that the
// 8 row addresses of an ldmatrix fall in distinct bank groups). For each 16x16 block of dy a
// warp issues two mma.m16n8k16 against the 8 (padded) ranks:
//   du: A = the block (rows n, k = c; ldmatrix),         B = B[c, rank] (registers, loaded once)
//   dB: A = its transpose (rows c, k = n; ldmatrix.trans), B = u[n, rank] (one stage ahead)
// dB accumulates in registers over the block's rows; du sums over columns, so each stage's
// per-warp partials are added across the 8 warps in shared memory and stored as the block's
// partial. A second kernel adds the partials in a fixed order (the sums never depend on
// scheduling) and applies scale: du rounded to bf16 once, dB += in fp32, as cuBLASLt's
// alpha / beta epilogue does.
// Measured on an H200 (N = 8192, out = 14336): 0.098 ms against 0.067 + 0.071 for the two
// GEMMs; of that the streaming alone (no mma) is about 0.071, the reduce kernel 0.007. Three
// stages at two blocks per SM beat four or six stages at one block per SM (0.150): the other
// block's loads are what hide a block's compute and barriers.
#include <algorithm>
#include <mutex>
#include <string>

#include "common.cuh"
#include "ftune/kernels/cuda_lora.hpp"
#include "mma.cuh"

namespace ftune::cuda {
namespace {
using namespace detail;
using namespace tc;

constexpr int kWarps = 8, kWarpCols = 64, kCols = kWarps * kWarpCols;
constexpr int kThreads = kWarps * 32;
constexpr int kStageRows = 32, kStages = 3, kPitch = kCols + 8;
constexpr int kRank = 8;            // the mma's n: ranks r < 8 are zero-padded
constexpr int kMinGroupRows = 128;  // keeps the dB partials small next to dy
static_assert(kStageRows * kRank == kThreads, "the du reduction gives each thread one value");
constexpr size_t kTileBytes = size_t(kStages) * kStageRows * kPitch * sizeof(bf);
constexpr size_t kSmemBytes = kTileBytes + size_t(kWarps) * kStageRows * kRank * sizeof(float);

struct Args {
  const bf* dy;     // [N, out]
  const bf* u;      // [N, r]
  const bf* B;      // [out, r]
  float* du_part;   // [col_blocks][N][kRank]
  float* dB_part;   // [row_groups][out][kRank]
  int64_t N, out;
  int r, group_rows;
};

__device__ __forceinline__ float rank_value(const bf* m, int64_t row, int64_t rows, int k, int r) {
  return row < rows && k < r ? __bfloat162float(m[row * r + k]) : 0.f;
}

// The dB product's B operand for one 16-row tile starting at n: lane (g, t) holds
// u[n + 2t, g], u[n + 2t + 1, g] and the same 8 rows further.
__device__ __forceinline__ void load_u(float (&v)[4], const Args& a, int64_t n, int64_t n_end) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t row = n + 2 * t;
  v[0] = rank_value(a.u, row, n_end, g, a.r);
  v[1] = rank_value(a.u, row + 1, n_end, g, a.r);
  v[2] = rank_value(a.u, row + 8, n_end, g, a.r);
  v[3] = rank_value(a.u, row + 9, n_end, g, a.r);
}

__global__ void __launch_bounds__(kThreads, 2) up_backward_partial(Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf* tiles = reinterpret_cast<bf*>(smem);
  float* du_s = reinterpret_cast<float*>(smem + kTileBytes);  // [warp][row][rank]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t c_block = int64_t(blockIdx.x) * kCols;
  const int width = static_cast<int>(a.out - c_block < kCols ? a.out - c_block : kCols);  // % 8 == 0
  const int64_t n_begin = int64_t(blockIdx.y) * a.group_rows;
  const int64_t n_end = a.N < n_begin + a.group_rows ? a.N : n_begin + a.group_rows;
  const int stages = static_cast<int>((n_end - n_begin + kStageRows - 1) / kStageRows);

  // The du product's B operand for the warp's 4 column steps: B[c + 2t.., g], B[c + 8 + 2t.., g].
  uint32_t bfrag[4][2];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const int64_t c = c_block + warp * kWarpCols + ks * 16 + 2 * t;
    bfrag[ks][0] = pack(rank_value(a.B, c, a.out, g, a.r), rank_value(a.B, c + 1, a.out, g, a.r));
    bfrag[ks][1] = pack(rank_value(a.B, c + 8, a.out, g, a.r), rank_value(a.B, c + 9, a.out, g, a.r));
  }
  float dB[4][4] = {};

  auto load_stage = [&](int s) {
    bf* buf = tiles + (s % kStages) * kStageRows * kPitch;
    const int64_t n0 = n_begin + int64_t(s) * kStageRows;
#pragma unroll
    for (int it = 0; it < kStageRows * (kCols / 8) / kThreads; ++it) {
      const int i = it * kThreads + static_cast<int>(threadIdx.x);
      const int row = i / (kCols / 8), col = (i % (kCols / 8)) * 8;
      const bool ok = n0 + row < n_end && col < width;
      cp16(buf + row * kPitch + col, ok ? a.dy + (n0 + row) * a.out + c_block + col : a.dy, ok);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < stages) load_stage(s);
    cp_commit();
  }
  float u_next[2][4];
  load_u(u_next[0], a, n_begin, n_end);
  load_u(u_next[1], a, n_begin + 16, n_end);

  for (int s = 0; s < stages; ++s) {
    cp_wait<kStages - 2>();
    __syncthreads();  // stage s landed for every thread; stage s - 1's buffer and du_s are free
    if (s + kStages - 1 < stages) load_stage(s + kStages - 1);
    cp_commit();
    const int64_t n0 = n_begin + int64_t(s) * kStageRows;
    uint32_t ub[2][2];
#pragma unroll
    for (int rt = 0; rt < 2; ++rt) {
      ub[rt][0] = pack(u_next[rt][0], u_next[rt][1]);
      ub[rt][1] = pack(u_next[rt][2], u_next[rt][3]);
    }
    if (s + 1 < stages) {  // issued now, consumed next stage: the loads' latency hides behind it
      load_u(u_next[0], a, n0 + kStageRows, n_end);
      load_u(u_next[1], a, n0 + kStageRows + 16, n_end);
    }
    const bf* buf = tiles + (s % kStages) * kStageRows * kPitch + warp * kWarpCols;
#pragma unroll
    for (int rt = 0; rt < 2; ++rt) {
      float du[4] = {};
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        const bf* blk = buf + rt * 16 * kPitch + ks * 16;
        uint32_t x[4], xt[4];
        ldsm4(x, blk + a_row(lane) * kPitch + a_col(lane));
        mma(du, x, bfrag[ks][0], bfrag[ks][1]);
        ldsm4t(xt, blk + bn_row(lane) * kPitch + bn_col(lane));
        mma(dB[ks], xt, ub[rt][0], ub[rt][1]);
      }
      float* d = du_s + (warp * kStageRows + rt * 16 + g) * kRank + 2 * t;
      d[0] = du[0];
      d[1] = du[1];
      d[8 * kRank] = du[2];
      d[8 * kRank + 1] = du[3];
    }
    __syncthreads();
    const int row = static_cast<int>(threadIdx.x) / kRank, k = static_cast<int>(threadIdx.x) % kRank;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += du_s[(w * kStageRows + row) * kRank + k];
    if (n0 + row < n_end) a.du_part[(int64_t(blockIdx.x) * a.N + n0 + row) * kRank + k] = sum;
  }
  // dB accumulator of column step ks: rows c + g and c + g + 8, ranks 2t and 2t + 1.
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const int64_t c = c_block + warp * kWarpCols + ks * 16 + g;
    float* p = a.dB_part + (int64_t(blockIdx.y) * a.out + c) * kRank + 2 * t;
    if (c < a.out) *reinterpret_cast<float2*>(p) = make_float2(dB[ks][0], dB[ks][1]);
    if (c + 8 < a.out) *reinterpret_cast<float2*>(p + 8 * kRank) = make_float2(dB[ks][2], dB[ks][3]);
  }
}

// blockIdx.y == 0: du[n, k] = bf16(scale * sum over column blocks); 1: dB[c, k] += scale *
// sum over row groups. Both in ascending partial order.
__global__ void up_backward_reduce(float* dB, bf* du, const float* du_part, const float* dB_part,
                                   int64_t N, int64_t out, int r, int col_blocks, int row_groups,
                                   float scale) {
  const bool is_du = blockIdx.y == 0;
  const int64_t rows = is_du ? N : out;
  const int parts = is_du ? col_blocks : row_groups;
  const float* part = is_du ? du_part : dB_part;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * r;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / r;
    const int k = static_cast<int>(i % r);
    float s = 0.f;
    for (int p = 0; p < parts; ++p) s += part[(p * rows + row) * kRank + k];
    if (is_du)
      du[i] = __float2bfloat16_rn(scale * s);
    else
      dB[i] += scale * s;
  }
}

// What the launch needs of the current device, read once per device (under a lock: ranks
// may drive the GPU from more than one host thread): detail::device_facts(), and how many
// blocks of the partial kernel one SM holds (two, with the whole carveout as shared
// memory; over 48 KiB of dynamic shared memory is opt-in, per device).
struct DeviceInfo {
  int sms = 0, major = 0, blocks_per_sm = 0;
};
DeviceInfo device_info() {
  static std::mutex mu;
  static DeviceInfo info[64];
  int dev = 0;
  FTUNE_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  DeviceInfo& d = info[dev % 64];
  if (d.sms == 0) {
    const detail::DeviceFacts f = detail::device_facts();
    int blocks = 1;
    if (f.major >= 8) {
      FTUNE_CUDA_CHECK(cudaFuncSetAttribute(up_backward_partial,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kSmemBytes)));
      FTUNE_CUDA_CHECK(cudaFuncSetAttribute(up_backward_partial,
                                            cudaFuncAttributePreferredSharedMemoryCarveout,
                                            cudaSharedmemCarveoutMaxShared));
      FTUNE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, up_backward_partial, kThreads, kSmemBytes));
    }
    d.major = f.major;
    d.blocks_per_sm = blocks < 1 ? 1 : blocks;
    d.sms = f.sms;
  }
  return d;
}

struct Grid {
  int col_blocks, row_groups, group_rows;
};

// Column blocks cover out; row groups make one full wave of resident blocks (a second,
// partial wave would double the time), each at least kMinGroupRows rows so the dB partials
// stay small next to dy.
Grid grid_for_shape(int64_t N, int64_t out) {
  const DeviceInfo d = device_info();
  const int64_t slots = int64_t(d.sms) * d.blocks_per_sm;
  Grid gr;
  gr.col_blocks = static_cast<int>((out + kCols - 1) / kCols);
  const int64_t most = std::max<int64_t>(1, N / kMinGroupRows);
  const int64_t groups = std::clamp<int64_t>(slots / gr.col_blocks, 1, most);
  const int64_t rows = (N + groups - 1) / groups;
  gr.group_rows = static_cast<int>((rows + kStageRows - 1) / kStageRows * kStageRows);
  gr.row_groups = static_cast<int>(std::max<int64_t>(1, (N + gr.group_rows - 1) / gr.group_rows));
  return gr;
}

}  // namespace

bool lora_up_backward_supported(int64_t r, int64_t out, const void* dy) {
  return r >= 1 && r <= kRank && out > 0 && out % 8 == 0 && aligned16(dy) &&
         device_info().major >= 8;  // bf16 mma.sync
}

int64_t lora_up_backward_workspace(int64_t N, int64_t out, int64_t r) {
  if (!lora_up_backward_supported(r, out, nullptr) || N <= 0)
    return 0;
  const Grid gr = grid_for_shape(N, out);
  return (int64_t(gr.col_blocks) * N + int64_t(gr.row_groups) * out) * kRank;
}

void lora_up_backward(float* dB, bf16* du, const bf16* dy, const bf16* u, const bf16* B,
                      int64_t N, int64_t out, int64_t r, float scale, float* workspace,
                      stream_t stream) {
  if (!lora_up_backward_supported(r, out, dy))
    throw CudaError("lora_up_backward: r = " + std::to_string(r) + ", out = " +
                    std::to_string(out) + " not supported (r <= 8, out % 8 == 0, dy 16-byte aligned, compute capability 8.0+)");
  if (N <= 0) return;
  const Grid gr = grid_for_shape(N, out);
  Args a{dev(dy), dev(u), dev(B), workspace, workspace + int64_t(gr.col_blocks) * N * kRank,
         N, out, static_cast<int>(r), gr.group_rows};
  up_backward_partial<<<dim3(gr.col_blocks, gr.row_groups), kThreads, kSmemBytes, stream>>>(a);
  FTUNE_CUDA_LAUNCH_CHECK();
  const int64_t most = std::max(N, out) * r;
  up_backward_reduce<<<dim3(grid_for(most, 256), 2), 256, 0, stream>>>(
      dB, dev(du), a.du_part, a.dB_part, N, out, static_cast<int>(r), gr.col_blocks,
      gr.row_groups, scale);
  FTUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace ftune::cuda
