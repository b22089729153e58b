// LoRA product benchmark on one GPU at the Llama-3-8B shapes of a batch-4, seq-2048 micro-step
// (N = 8192 tokens, r = 8): every product a LoRA projection runs, timed alone with CUDA events
// (median of 20 after 3 warm-ups, random bf16 inputs), with the bytes it must move at least
// and the bandwidth that implies. Prints a table; writes every number to the JSON file named
// by the first argument (default bench_lora.json).
//   build/bench_lora [OUT.json] [N]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cuda_bench_util.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_gemm.hpp"
#include "ftune/kernels/cuda_lora.hpp"
#include "ftune/kernels/cuda_ops.hpp"

namespace cu = ftune::cuda;
using cu::bench::random_bf16;

namespace {

struct Row {
  std::string name, shape;
  double ms, bytes, flops;
};

double median_ms(const std::function<void()>& f, cu::stream_t s) {
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> t;
  cu::Event a, b;
  for (int i = 0; i < 20; ++i) {
    a.record(s);
    f();
    b.record(s);
    b.synchronize();
    t.push_back(b.elapsed_ms_since(a));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (cu::cuda_device_count() == 0) {
    std::printf("bench_lora: no GPU\n");
    return 0;
  }
  const std::string out_path = argc > 1 ? argv[1] : "bench_lora.json";
  const int64_t N = argc > 2 ? std::stoll(argv[2]) : 8192, r = 8;
  cu::Stream stream;
  const cu::stream_t s = stream.get();
  cu::Gemm gemm;
  std::mt19937 g(1);
  const int64_t widest = 14336;
  cu::DeviceBuffer x = random_bf16(N * widest, g, 1.f), y = random_bf16(N * widest, g, 1.f);
  cu::DeviceBuffer A = random_bf16(r * widest, g, 0.02f), B = random_bf16(widest * r, g, 0.02f);
  cu::DeviceBuffer W = random_bf16(widest * 4096, g, 0.02f);
  cu::DeviceBuffer u = random_bf16(N * r, g, 1.f), du = random_bf16(N * r, g, 1.f);
  cu::DeviceBuffer dA(r * widest * sizeof(float)), dB(widest * r * sizeof(float));
  dA.zero();
  dB.zero();
  cu::DeviceBuffer ws(std::max(cu::lora_down_backward_workspace(N, widest, r),
                               cu::lora_up_backward_workspace(N, widest, r)) *
                      sizeof(float));
  auto* xp = x.as<cu::bf16>();
  auto* yp = y.as<cu::bf16>();
  std::vector<Row> rows;
  auto add = [&](std::string name, int64_t in, int64_t out, double bytes, double flops,
                 const std::function<void()>& f) {
    rows.push_back({std::move(name), std::to_string(in) + "->" + std::to_string(out),
                    median_ms(f, s), bytes, flops});
  };
  const int64_t ins[] = {4096, 14336};
  for (double p : {0.05, 0.0}) {
    const std::string tag = p > 0 ? " p=.05" : " p=0";
    for (int64_t in : ins) {
      add("down_fwd u=(keep x)A^T" + tag, in, r, 2.0 * N * in, 2.0 * N * in * r, [&] {
        cu::lora_down_forward(u.as<cu::bf16>(), xp, A.as<cu::bf16>(), N, in, r, p, 7, s);
      });
      add("down_bwd dA+=du^T(keep x)" + tag, in, r, 2.0 * N * in, 2.0 * N * in * r, [&] {
        cu::lora_down_backward(dA.as<float>(), du.as<cu::bf16>(), xp, N, in, r, p, 7, 1.f,
                               ws.as<float>(), s);
      });
      add("dx_bwd dx+=keep(du A)" + tag, r, in, 4.0 * N * in, 2.0 * N * in * r, [&] {
        cu::lora_dx_backward(yp, du.as<cu::bf16>(), A.as<cu::bf16>(), N, in, r, p, 7, s);
      });
    }
  }
  // Backward groups reading one x of 4096 columns (q/k/v: 3, gate/up: 2) at p = .05: one
  // launch for the group against `count` single-projection launches (the rows above).
  {
    cu::DeviceBuffer ws3(cu::lora_down_backward_workspace(N, 4096, r, 3) * sizeof(float));
    cu::DeviceBuffer dAs(3 * r * 4096 * sizeof(float));
    dAs.zero();
    for (int count : {3, 2}) {
      cu::LoraGroup grp;
      grp.count = count;
      float* dA_ptr[3];
      const cu::bf16* du_ptr[3];
      for (int i = 0; i < count; ++i) {
        grp.A[i] = A.as<cu::bf16>() + i * r * 4096;
        grp.seed[i] = 7 + i;
        dA_ptr[i] = dAs.as<float>() + i * r * 4096;
        du_ptr[i] = du.as<cu::bf16>();
      }
      const std::string tag = " x" + std::to_string(count) + " p=.05";
      add("group down_bwd" + tag, 4096, count * r, 2.0 * N * 4096, 2.0 * N * 4096 * r * count,
          [&] {
            cu::lora_down_backward_group(grp, dA_ptr, du_ptr, xp, N, 4096, r, 0.05, 1.f,
                                         ws3.as<float>(), s);
          });
      add("group dx_bwd" + tag, count * r, 4096, 4.0 * N * 4096, 2.0 * N * 4096 * r * count,
          [&] { cu::lora_dx_backward_group(grp, yp, du_ptr, N, 4096, r, 0.05, s); });
    }
  }
  for (int64_t out : {int64_t(1024), int64_t(4096), int64_t(14336)}) {
    add("gemm up y+=s u B^T (K=8, beta 1)", r, out, 4.0 * N * out, 2.0 * N * out * r, [&] {
      gemm.matmul(cu::GemmOp::NT, yp, u.as<cu::bf16>(), B.as<cu::bf16>(), N, out, r, 2.f, 1.f, s);
    });
    add("up_fwd y+=s u B^T (fused kernel)", r, out, 4.0 * N * out, 2.0 * N * out * r, [&] {
      cu::lora_up_forward(yp, u.as<cu::bf16>(), B.as<cu::bf16>(), N, out, r, 2.f, s);
    });
    add("gemm dB+=s dy^T u (TN)", out, r, 2.0 * N * out, 2.0 * N * out * r, [&] {
      gemm.matmul(cu::GemmOp::TN, dB.as<float>(), yp, u.as<cu::bf16>(), out, r, N, 2.f, 1.f, s);
    });
    add("gemm du=s dy B (NN)", out, r, 2.0 * N * out, 2.0 * N * out * r, [&] {
      gemm.matmul(cu::GemmOp::NN, du.as<cu::bf16>(), yp, B.as<cu::bf16>(), N, r, out, 2.f, 0.f, s);
    });
    add("up_bwd dB+=s dy^T u, du=s dy B (one pass)", out, r, 2.0 * N * out, 4.0 * N * out * r,
        [&] {
          cu::lora_up_backward(dB.as<float>(), du.as<cu::bf16>(), yp, u.as<cu::bf16>(),
                               B.as<cu::bf16>(), N, out, r, 2.f, ws.as<float>(), s);
        });
  }
  // The forward passes the up products are folded into (8B shapes: I = 14336, q = 32 heads
  // of 128), and plain swiglu_forward for the SwiGLU pass's floor.
  {
    const int64_t I = widest, heads = 32, hd = 128, half = hd / 2;
    cu::DeviceBuffer h = random_bf16(N * I, g, 1.f);
    std::vector<float> cs(2048 * half), sn(2048 * half);
    for (int64_t i = 0; i < 2048 * half; ++i) cs[i] = std::cos(0.001f * i), sn[i] = std::sin(0.001f * i);
    std::vector<int32_t> pos(N);
    for (int64_t n = 0; n < N; ++n) pos[n] = static_cast<int32_t>(n % 2048);
    cu::DeviceBuffer dcos = cu::to_device(cs), dsin = cu::to_device(sn), dpos = cu::to_device(pos);
    auto* hp = h.as<cu::bf16>();
    for (bool keep : {true, false})
      add(std::string("swiglu_up h=silu(g+sBu) (u+sBu)") + (keep ? " keep g,u" : ""), r, I,
          (keep ? 10.0 : 6.0) * N * I, 4.0 * N * I * r, [&] {
            cu::lora_swiglu_forward(hp, xp, yp, u.as<cu::bf16>(), du.as<cu::bf16>(),
                                    B.as<cu::bf16>(), A.as<cu::bf16>(), N, I, r, 0.01f, s, keep);
          });
    add("swiglu_forward h=silu(g) u (no LoRA)", I, I, 6.0 * N * I, 0, [&] {
      cu::swiglu_forward(hp, xp, yp, N * I, s);
    });
    add("up_residual out=res+(y+sBu)", r, 4096, 6.0 * N * 4096, 2.0 * N * 4096 * r, [&] {
      cu::lora_up_residual_forward(hp, xp, yp, u.as<cu::bf16>(), B.as<cu::bf16>(), N, 4096, r,
                                   0.01f, s);
    });
    add("up_rope x=rope(x+sBu) (32x128)", r, heads * hd, 4.0 * N * heads * hd,
        2.0 * N * heads * hd * r, [&] {
          cu::lora_up_rope_forward(yp, u.as<cu::bf16>(), B.as<cu::bf16>(), dcos.as<float>(),
                                   dsin.as<float>(), dpos.as<int32_t>(), N, heads, hd, r, 0.01f, s);
        });
  }
  add("dropout_apply (reference pass)", 4096, 4096, 4.0 * N * 4096, 0, [&] {
    cu::dropout_apply(yp, xp, N * 4096, 0.05, 7, false, s);
  });
  add("base gemm x W^T", 4096, 4096, 2.0 * (2 * N * 4096 + 4096 * 4096),
      2.0 * N * 4096 * 4096, [&] {
        gemm.matmul(cu::GemmOp::NT, yp, xp, W.as<cu::bf16>(), N, 4096, 4096, 1.f, 0.f, s);
      });
  add("base gemm x W^T", 4096, 14336, 2.0 * (N * 4096 + N * 14336 + 4096 * 14336),
      2.0 * N * 4096 * 14336, [&] {
        gemm.matmul(cu::GemmOp::NT, yp, xp, W.as<cu::bf16>(), N, 14336, 4096, 1.f, 0.f, s);
      });

  std::printf("%s, N = %lld tokens, r = %lld\n", cu::device_description(0).c_str(),
              static_cast<long long>(N), static_cast<long long>(r));
  // The row groups lora_up_backward launches (its workspace is (col_blocks N + groups out) 8).
  for (int64_t out : {int64_t(1024), int64_t(4096), int64_t(14336)}) {
    const int64_t cb = (out + 511) / 512;
    std::printf("up_bwd grid at out %lld: %lld column blocks x %lld row groups\n",
                static_cast<long long>(out), static_cast<long long>(cb),
                static_cast<long long>((cu::lora_up_backward_workspace(N, out, r) / 8 - cb * N) / out));
  }
  std::printf("%-38s %12s %9s %8s %8s\n", "product", "in->out", "ms", "GB/s", "TFLOP/s");
  std::ofstream js(out_path);
  js << "{\"device\": \"" << cu::device_description(0) << "\", \"N\": " << N << ", \"r\": " << r
     << ", \"rows\": [\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& w = rows[i];
    const double gbs = w.bytes / (w.ms * 1e6), tf = w.flops / (w.ms * 1e9);
    std::printf("%-38s %12s %9.3f %8.0f %8.1f\n", w.name.c_str(), w.shape.c_str(), w.ms, gbs, tf);
    js << "  {\"name\": \"" << w.name << "\", \"shape\": \"" << w.shape << "\", \"ms\": " << w.ms
       << ", \"min_bytes\": " << w.bytes << ", \"flops\": " << w.flops << ", \"GBps\": " << gbs
       << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  js << "]}\n";
  return 0;
}
