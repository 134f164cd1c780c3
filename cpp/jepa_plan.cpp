// jepa_plan: one decision of a world model's planner from C++ (no Python), through jepa_engine::Planner.
//
//   jepa_plan PACKAGE.pt2 [--obs FILE] [--history H] [--decisions K] [--repeat N] [--threads N] [--out FILE]
//             [--ops LIB]
//
// --obs FILE    the observations: raw little-endian float32, the values of frames [E, H, C, S, S],
//               then past [E, H-1, A], then goal [E, C, S, S], each row-major (numpy's
//               np.concatenate([frames.ravel(), past.ravel(), goal.ravel()]).astype("<f4").tofile(FILE));
//               without it every input is zeros (a latency check).
// --history H   the number of frames in --obs: one of the package's history lengths (default: all T of
//               the model's history; fewer, as at an episode's start, where it was exported with them).
// --decisions K report the K-th of K consecutive decisions from these observations, each warm-started
//               from the one before (default 1: a cold start).
// --repeat N    time N cold-start decisions after one warm-up (default 1); the median is reported.
// --threads N   intra-op threads (default: libtorch's).
// --out FILE    also write action [E, A], plan [E, H, A] and cost [E] as raw float32, in that order.
// --ops LIB     the native operator library to load (default: the one this program links).
//
// Prints one JSON line: {"action": [...], "plan": [...], "cost": [...], "median_ms": .., "repeat": ..}.
// Exit status 2 for bad arguments or input, 1 for a failure while loading or running the package.
#include "jepa_engine/planner.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

struct Args {
  std::string package, obs, out, ops;
  int history = 0;   // 0: the model's full history
  int repeat = 1;
  int decisions = 1;
  int threads = 0;
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::cerr << "jepa_plan: " << msg << "\nusage: jepa_plan PACKAGE.pt2 [--obs FILE] [--history H] [--decisions K] "
            << "[--repeat N] [--threads N] [--out FILE] [--ops LIB]\n";
  std::exit(2);
}

int positive(const std::string& flag, const std::string& v) {
  try {
    size_t used = 0;
    int n = std::stoi(v, &used);
    if (used == v.size() && n >= 1) return n;
  } catch (const std::exception&) {
  }
  usage_error("argument " + flag + ": must be an int >= 1, got '" + v + "'");
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error("argument " + s + ": expected a value");
      return argv[++i];
    };
    if (s == "--obs") a.obs = value();
    else if (s == "--out") a.out = value();
    else if (s == "--ops") a.ops = value();
    else if (s == "--history") a.history = positive(s, value());
    else if (s == "--repeat") a.repeat = positive(s, value());
    else if (s == "--decisions") a.decisions = positive(s, value());
    else if (s == "--threads") a.threads = positive(s, value());
    else if (s == "-h" || s == "--help") usage_error("plan one decision with an exported world model");
    else if (!s.empty() && s[0] == '-') usage_error("unknown argument " + s);
    else if (a.package.empty()) a.package = s;
    else usage_error("unexpected argument " + s);
  }
  if (a.package.empty()) usage_error("the package (.pt2 from `jepa-engine export`) is required");
  if (!std::ifstream(a.package).good()) usage_error("package: no readable file " + a.package);
  return a;
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// frames, past, goal of `history` frames (0: the full history) from the raw float32 file (or zeros).
std::vector<at::Tensor> observations(const jepa_engine::Planner& planner, const std::string& path, int history) {
  const auto& have = planner.histories();
  if (history && std::find(have.begin(), have.end(), history) == have.end()) {
    std::string list;
    for (int64_t h : have) list += (list.empty() ? "" : ", ") + std::to_string(h);
    usage_error("argument --history: must be one of the package's history lengths (" + list + "), got " +
                std::to_string(history));
  }
  const char* names[] = {"frames", "past", "goal"};
  std::vector<at::Tensor> t;
  int64_t total = 0;
  for (const char* n : names) total += numel(planner.shape(n, history));
  if (path.empty()) {
    for (const char* n : names) t.push_back(at::zeros(planner.shape(n, history), at::kFloat));
    return t;
  }
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) usage_error("argument --obs: cannot read " + path);
  const int64_t bytes = f.tellg();
  if (bytes != total * 4) {
    std::string want;
    for (const char* n : names)
      want += std::string(want.empty() ? "" : ", ") + n + " " + shape_str(planner.shape(n, history));
    usage_error("argument --obs: " + path + " must hold " + std::to_string(total) + " float32 values (" + want +
                "), got " + std::to_string(bytes) + " bytes");
  }
  f.seekg(0);
  for (const char* n : names) {
    at::Tensor x = at::empty(planner.shape(n, history), at::kFloat);
    f.read(reinterpret_cast<char*>(x.data_ptr<float>()), x.numel() * 4);
    t.push_back(x);
  }
  return t;
}

void json_list(std::ostream& o, const at::Tensor& t) {
  at::Tensor c = t.contiguous().to(at::kFloat);
  const float* p = c.data_ptr<float>();
  char buf[32];
  o << "[";
  for (int64_t i = 0; i < c.numel(); ++i) {
    std::snprintf(buf, sizeof buf, "%.9g", p[i]);
    o << (i ? ", " : "") << buf;
  }
  o << "]";
}

}  // namespace

int main(int argc, char** argv) {
  Args args = parse(argc, argv);
  if (args.threads) at::set_num_threads(args.threads);
  try {
    jepa_engine::Planner planner(args.package, args.ops);
    std::vector<at::Tensor> obs = observations(planner, args.obs, args.history);
    jepa_engine::Decision shown = planner.decide(obs[0], obs[1], obs[2]);   // also the warm-up
    for (int k = 1; k < args.decisions; ++k) shown = planner.decide(obs[0], obs[1], obs[2]);
    std::vector<double> ms;
    for (int r = 0; r < args.repeat; ++r) {
      planner.reset();
      auto t0 = std::chrono::steady_clock::now();
      planner.decide(obs[0], obs[1], obs[2]);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    const double median = ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
    if (!args.out.empty()) {
      std::ofstream f(args.out, std::ios::binary);
      for (const at::Tensor& t : {shown.action, shown.plan, shown.cost}) {
        at::Tensor c = t.contiguous().to(at::kFloat);
        f.write(reinterpret_cast<const char*>(c.data_ptr<float>()), c.numel() * 4);
      }
      if (!f) throw std::runtime_error("cannot write " + args.out);
    }
    std::ostringstream o;
    o << "{\"action\": ";
    json_list(o, shown.action);
    o << ", \"plan\": ";
    json_list(o, shown.plan);
    o << ", \"cost\": ";
    json_list(o, shown.cost);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.4f", median);
    o << ", \"median_ms\": " << buf << ", \"repeat\": " << args.repeat << ", \"threads\": " << at::get_num_threads()
      << ", \"history\": " << obs[0].size(1) << ", \"planner\": \"" << planner.metadata("jepa_engine.planner")
      << "\"}";
    std::cout << o.str() << std::endl;
  } catch (const std::invalid_argument& e) {
    std::cerr << "jepa_plan: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "jepa_plan: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
