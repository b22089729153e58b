#include "ftune/train/metrics.hpp"

#include <unistd.h>

#include <cmath>
#include <iostream>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace ftune {

MetricsLog::MetricsLog(const std::string& path, const std::string& previous)
    : out_(path, std::ios::trunc), contents_(previous) {
  if (!out_) throw std::runtime_error("cannot write metrics file '" + path + "'");
  out_ << previous;
  out_.flush();
}

void MetricsLog::write(const std::string& line) {
  contents_ += line + '\n';
  out_ << line << '\n';
  out_.flush();  // a crashed or killed run still leaves every logged step
}

void MetricsLog::log_step(const StepReport& r) {
  nlohmann::ordered_json j;
  j["step"] = r.step;
  j["epoch"] = r.epoch;
  j["loss"] = r.loss;
  j["lr"] = r.lr;
  j["grad_norm"] = r.grad_norm;
  j["tokens"] = r.tokens;
  j["tokens_per_s"] = r.tokens_per_s;
  j["elapsed_s"] = r.elapsed_s;
  if (r.peak_gpu_mem_gib >= 0) j["peak_gpu_mem_gib"] = r.peak_gpu_mem_gib;
  write(j.dump());
}

void MetricsLog::log_eval(int64_t step, const std::string& name, double loss, int64_t tokens) {
  nlohmann::ordered_json j;
  j["step"] = step;
  j[name + "_loss"] = loss;
  j[name + "_ppl"] = std::exp(loss);
  j[name + "_tokens"] = tokens;
  write(j.dump());
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600),
                  (long long)(t / 60 % 60), (long long)(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

ProgressLine::ProgressLine() : tty_(isatty(STDERR_FILENO)) {}

void ProgressLine::update(const StepReport& r) {
  const double remaining =
      r.step > 0 ? r.elapsed_s / r.step * static_cast<double>(r.total_steps - r.step) : NAN;
  char buf[256];
  std::snprintf(buf, sizeof buf, "step %lld/%lld | loss %.4f | lr %.2e | %.1fk tok/s | ETA %s",
                (long long)r.step, (long long)r.total_steps, r.loss, r.lr, r.tokens_per_s / 1000.0,
                format_duration(remaining).c_str());
  if (tty_) {
    std::cerr << "\r\033[K" << buf << std::flush;
    open_ = true;
  } else {
    std::cerr << buf << '\n';
  }
}

void ProgressLine::message(const std::string& text) {
  if (open_) std::cerr << "\r\033[K";
  std::cerr << text << '\n';
  open_ = false;
}

void ProgressLine::finish() {
  if (open_) std::cerr << '\n';
  open_ = false;
}

}  // namespace ftune
