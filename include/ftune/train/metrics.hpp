#pragma once
// train module: what a run reports: metrics.jsonl lines and the live progress line.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>

namespace ftune {

struct StepReport {
  int64_t step = 0, total_steps = 0;
  double epoch = 0, loss = 0, lr = 0, grad_norm = 0;
  int64_t tokens = 0;          // input tokens processed since the start
  double tokens_per_s = 0;     // over the logging window
  double elapsed_s = 0;
  double peak_gpu_mem_gib = -1;  // most device memory ftune held during the window; < 0: no GPU
};

// Writes one JSON object per line to output_dir/metrics.jsonl. The file starts with
// `previous` (the lines a resumed run had logged before its checkpoint), then grows.
class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path, const std::string& previous = "");
  const std::string& contents() const { return contents_; }  // everything written
  void log_step(const StepReport& r);
  void log_eval(int64_t step, const std::string& name, double loss, int64_t tokens);
 private:
  std::ofstream out_;
  std::string contents_;
  void write(const std::string& line);
};

// "step 12/100 | loss 5.931 | lr 2.0e-05 | 12.3k tok/s | ETA 01:23" on stderr: redrawn in
// place on a terminal, one line per report otherwise (logs of batch jobs stay readable).
class ProgressLine {
 public:
  ProgressLine();
  void update(const StepReport& r);
  void finish();
  void message(const std::string& text);  // a normal line that does not break the bar
 private:
  bool tty_;
  bool open_ = false;
};

std::string format_duration(double seconds);

}  // namespace ftune
