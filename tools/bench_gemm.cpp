// Base GEMM benchmark on one GPU: every frozen-weight product of one micro-step (batch 4 x
// seq 2048 = N tokens, checkpointing on) at the Llama-3-8B and Llama-3.2-1B shapes, each run
// with every algorithm cuBLASLt's heuristic offers (Gemm::time_algorithms, mean of 20 after
// 2 warm-ups). Prints, per product, the heuristic's first choice against the fastest offer,
// and the micro-step's GEMM time both ways (each product weighted by how often a step runs
// it); writes every candidate's time to the JSON file named by the first argument.
//   build/bench_gemm [OUT.json] [N]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "cuda_bench_util.hpp"
#include "ftune/kernels/cuda_device.hpp"
#include "ftune/kernels/cuda_gemm.hpp"

namespace cu = ftune::cuda;
using cu::bench::random_bf16;

namespace {

struct Product {
  std::string model, name;
  cu::GemmOp op;
  int64_t M, N, K;
  float beta;
  int per_step;  // times one checkpointed micro-step runs it (all layers)
};

const char* op_name(cu::GemmOp op) {
  return op == cu::GemmOp::NT ? "NT" : op == cu::GemmOp::NN ? "NN" : "TN";
}

// One model's products: forward x W^T (run again by the recompute except down), backward
// dx = dy W, and the loss head's chunked lm_head products (head rows per chunk as ftune
// picks them: 256 MiB of bf16 logits).
void add_model(std::vector<Product>& out, const std::string& model, int64_t T, int64_t H,
               int64_t I, int64_t kv, int64_t L, int64_t V) {
  struct Proj { const char* name; int64_t in, out; bool recomputed, acc_bwd; };
  const Proj projs[] = {{"q", H, H, true, false},    {"k", H, kv, true, true},
                        {"v", H, kv, true, true},    {"o", H, H, true, false},
                        {"gate", H, I, true, false}, {"up", H, I, true, true},
                        {"down", I, H, false, false}};
  for (const Proj& p : projs) {
    out.push_back({model, std::string(p.name) + " fwd", cu::GemmOp::NT, T, p.out, p.in, 0.f,
                   static_cast<int>(L * (p.recomputed ? 2 : 1))});
    out.push_back({model, std::string(p.name) + " bwd dx", cu::GemmOp::NN, T, p.in, p.out,
                   p.acc_bwd ? 1.f : 0.f, static_cast<int>(L)});
  }
  const int64_t chunk = std::min<int64_t>((int64_t(256) << 20) / (2 * V), T);
  const int chunks = static_cast<int>((T + chunk - 1) / chunk);
  out.push_back({model, "lm_head fwd", cu::GemmOp::NT, chunk, V, H, 0.f, chunks});
  out.push_back({model, "lm_head bwd dx", cu::GemmOp::NN, chunk, H, V, 0.f, chunks});
}

}  // namespace

int main(int argc, char** argv) {
  if (cu::cuda_device_count() == 0) {
    std::printf("bench_gemm: no GPU\n");
    return 0;
  }
  const std::string out_path = argc > 1 ? argv[1] : "bench_gemm.json";
  const int64_t T = argc > 2 ? std::stoll(argv[2]) : 8192;
  std::vector<Product> prods;
  add_model(prods, "8b", T, 4096, 14336, 1024, 32, 128256);
  add_model(prods, "1b", T, 2048, 8192, 512, 16, 128256);

  cu::Stream stream;
  const cu::stream_t s = stream.get();
  cu::Gemm gemm;
  std::mt19937 g(1);
  int64_t max_a = 0, max_b = 0, max_c = 0;
  for (const Product& p : prods) {
    max_a = std::max(max_a, p.M * p.K);
    max_b = std::max(max_b, p.N * p.K);
    max_c = std::max(max_c, p.M * p.N);
  }
  cu::DeviceBuffer A = random_bf16(max_a, g, 1.f), B = random_bf16(max_b, g, 0.02f);
  cu::DeviceBuffer C = random_bf16(max_c, g, 1.f);

  std::printf("%s, N = %lld tokens\n", cu::device_description(0).c_str(),
              static_cast<long long>(T));
  std::printf("%-4s %-16s %-2s %6s %6s %6s %4s %9s %8s %9s %8s %5s\n", "", "product", "op", "M",
              "N", "K", "x", "first ms", "TFLOP/s", "best ms", "TFLOP/s", "pick");
  std::ofstream js(out_path);
  js << "{\"device\": \"" << cu::device_description(0) << "\", \"tokens\": " << T
     << ", \"rows\": [\n";
  std::string model;
  double step_first = 0, step_best = 0;
  auto print_total = [&] {
    if (model.empty()) return;
    std::printf("%-4s micro-step GEMMs: heuristic %.1f ms, fastest offers %.1f ms (%.1f%% less)\n",
                model.c_str(), step_first, step_best, 100.0 * (1 - step_best / step_first));
    step_first = step_best = 0;
  };
  for (size_t i = 0; i < prods.size(); ++i) {
    const Product& p = prods[i];
    if (p.model != model) {
      print_total();
      model = p.model;
    }
    const std::vector<float> ms =
        gemm.time_algorithms(p.op, C.as<cu::bf16>(), A.as<cu::bf16>(), B.as<cu::bf16>(), p.M,
                             p.N, p.K, 1.f, p.beta, s, 20);
    const size_t best = std::min_element(ms.begin(), ms.end()) - ms.begin();
    const double flops = 2.0 * p.M * p.N * p.K;
    step_first += ms[0] * p.per_step;
    step_best += ms[best] * p.per_step;
    std::printf("%-4s %-16s %-2s %6lld %6lld %6lld %4d %9.3f %8.1f %9.3f %8.1f %2zu/%-2zu\n",
                p.model.c_str(), p.name.c_str(), op_name(p.op), static_cast<long long>(p.M),
                static_cast<long long>(p.N), static_cast<long long>(p.K), p.per_step, ms[0],
                flops / (ms[0] * 1e9), ms[best], flops / (ms[best] * 1e9), best, ms.size());
    js << "  {\"model\": \"" << p.model << "\", \"product\": \"" << p.name << "\", \"op\": \""
       << op_name(p.op) << "\", \"M\": " << p.M << ", \"N\": " << p.N << ", \"K\": " << p.K
       << ", \"beta\": " << p.beta << ", \"per_step\": " << p.per_step << ", \"ms\": [";
    for (size_t j = 0; j < ms.size(); ++j)
      js << (j ? ", " : "") << (std::isinf(ms[j]) ? -1.0 : ms[j]);
    js << "]}" << (i + 1 < prods.size() ? "," : "") << "\n";
  }
  print_total();
  js << "]}\n";
  return 0;
}
