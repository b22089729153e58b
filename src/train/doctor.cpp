#include "ftune/train/doctor.hpp"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "ftune/config/parse.hpp"
#include "ftune/data/pretokenized.hpp"
#include "ftune/dist/communicator.hpp"
#if FTUNE_HAVE_NCCL
#include "ftune/dist/nccl.hpp"  // GPU ranks: NCCL all-reduce and per-rank GPU/driver lines
#endif

namespace fs = std::filesystem;

namespace ftune {

namespace {

struct Check {
  bool ok;
  std::string text;
};

std::string gpu_report(bool* ok) {
  // The CUDA backend is not part of this build yet: report what the machine shows.
  std::ostringstream s;
  int n = 0;
  for (int i = 0; i < 64; ++i)
    if (fs::exists("/dev/nvidia" + std::to_string(i))) ++n;
  *ok = true;  // a CPU-only machine is a valid setup for the CPU backend
  if (n == 0) {
    s << "no NVIDIA GPU devices visible (/dev/nvidia*): the CPU backend will be used";
  } else {
    s << n << " NVIDIA GPU device(s) visible";
    if (std::ifstream drv("/proc/driver/nvidia/version"); drv) {
      std::string line;
      std::getline(drv, line);
      s << "; driver: " << line.substr(0, 80);
    }
  }
  if (const char* v = std::getenv("CUDA_VISIBLE_DEVICES")) s << "; CUDA_VISIBLE_DEVICES=" << v;
  return s.str();
}

Check allreduce_check(Communicator& comm, size_t mib) {
  const size_t n = mib * 1024 * 1024 / sizeof(float);
  std::vector<float> buf(n, 1.0f);
  comm.barrier();
  comm.all_reduce_sum(buf);  // warm-up
  const int iters = 5;
  comm.barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) {
    std::fill(buf.begin(), buf.end(), 1.0f);
    comm.all_reduce_sum(buf);
  }
  comm.barrier();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
  const bool ok = buf[0] == static_cast<float>(comm.size()) && buf[n - 1] == static_cast<float>(comm.size());
  // nccl-tests' convention: algbw = bytes / time; busbw = algbw * 2 (N - 1) / N.
  const double algbw = static_cast<double>(n * sizeof(float)) / s / 1e9;
  const double busbw = algbw * 2.0 * (comm.size() - 1) / std::max(1, comm.size());
  std::ostringstream t;
  t << std::fixed << std::setprecision(2) << "all-reduce of " << mib << " MiB: " << s * 1e3
    << " ms, algbw " << algbw << " GB/s, busbw " << busbw << " GB/s"
    << (ok ? "" : " -- WRONG RESULT");
  return {ok, t.str()};
}

}  // namespace

int run_doctor(const std::vector<std::string>& args) {
  CLI::App app{"Check that a (multi-rank) ftune job can run: rendezvous, GPUs, collectives, "
               "data and output directories. Launch it exactly as you launch `ftune train`.",
               "ftune doctor"};
  std::string config;
  std::vector<std::string> data_dirs;
  std::string output_dir;
  size_t mib = 64;
  app.add_option("--config", config, "a training config: its train/validation dirs and output_dir are checked");
  app.add_option("--train_file_dir", data_dirs, "data directories to check (comma-separated)")->delimiter(',');
  app.add_option("--output_dir", output_dir, "output directory to check for writing");
  app.add_option("--allreduce_mib", mib, "all-reduce size for the bandwidth test")->capture_default_str();
#if FTUNE_HAVE_NCCL
  size_t nccl_mib = 1024;
  app.add_option("--nccl_mib", nccl_mib, "NCCL all-reduce size when GPUs are visible")->capture_default_str();
#endif
  std::vector<std::string> rev(args.rbegin(), args.rend());
  try {
    app.parse(rev);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (!config.empty()) {
    TrainConfig c = load_train_config_file(config);
    for (auto& d : c.train_file_dir) data_dirs.push_back(d);
    for (auto& d : c.validation_file_dir) data_dirs.push_back(d);
    if (output_dir.empty()) output_dir = c.output_dir;
  }

  auto comm = bootstrap();
  const WorldInfo& w = comm->world();
  std::vector<Check> checks;
  {
    std::ostringstream s;
    s << "rendezvous: rank " << w.rank << " of " << w.size << " on " << w.host << " (local rank "
      << w.local_rank << " of " << w.local_size << ", launcher " << w.launcher << ", pid " << getpid() << ")";
    checks.push_back({true, s.str()});
  }
  bool gpu_ok = true;
  std::string gpu = gpu_report(&gpu_ok);
  checks.push_back({gpu_ok, "gpus: " + gpu});
  checks.push_back(allreduce_check(*comm, mib));
#if FTUNE_HAVE_NCCL
  for (const NcclDoctorLine& l : nccl_doctor_checks(*comm, nccl_mib)) checks.push_back({l.ok, l.text});
#endif
  for (const std::string& d : data_dirs) {
    try {
      const auto files = list_data_files({d});
      size_t readable = 0;
      for (const auto& f : files) readable += std::ifstream(f).good();
      checks.push_back({readable == files.size(), "data '" + d + "': " + std::to_string(readable) + "/" +
                                                      std::to_string(files.size()) + " files readable"});
    } catch (const std::exception& e) {
      checks.push_back({false, std::string("data: ") + e.what()});
    }
  }
  if (!output_dir.empty()) {
    std::error_code ec;
    fs::create_directories(output_dir, ec);
    const fs::path probe = fs::path(output_dir) / (".ftune_doctor_rank" + std::to_string(w.rank));
    bool ok = static_cast<bool>(std::ofstream(probe) << "ok");
    fs::remove(probe, ec);
    checks.push_back({ok, "output_dir '" + output_dir + "': " + (ok ? "writable" : "NOT writable")});
  }

  // Rank 0 prints every rank's report, in rank order.
  std::ostringstream mine;
  bool all_ok = true;
  for (const Check& c : checks) {
    mine << "  [" << (c.ok ? " ok " : "FAIL") << "] " << c.text << "\n";
    all_ok = all_ok && c.ok;
  }
  const auto reports = comm->all_gather_strings(std::string(all_ok ? "1" : "0") + mine.str());
  int failed = 0;
  for (const auto& r : reports) failed += r[0] != '1';
  if (w.rank == 0) {
    for (size_t r = 0; r < reports.size(); ++r) std::cout << "rank " << r << ":\n" << reports[r].substr(1);
    std::cout << (failed ? "doctor: " + std::to_string(failed) + " rank(s) with failed checks\n"
                         : "doctor: all checks passed on " + std::to_string(reports.size()) + " rank(s)\n");
  }
  return failed ? 1 : 0;
}

}  // namespace ftune
