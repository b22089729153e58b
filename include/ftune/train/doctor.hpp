#pragma once
// train module: `ftune doctor`, the seed's troubleshooting checklist run by every rank:
// rendezvous reached, world layout, GPUs and driver visible, an all-reduce with its
// bandwidth, data directories readable and the output directory writable.
#include <string>
#include <vector>

namespace ftune {

// args: the words after "doctor". Returns the process exit code (0 = every check passed).
int run_doctor(const std::vector<std::string>& args);

}  // namespace ftune
