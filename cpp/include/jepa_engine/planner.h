// jepa_engine::Planner: a world model's decision step, exported by `jepa-engine export` as an
// AOTInductor package (.pt2), run from C++ with no Python. One header; link libtorch and the native
// operator library jepa_engine/_C.so (it defines the jepa_engine ops a CPU package calls: sample_actions,
// elite_refit, masked_attention), or pass the library's path to the constructor to load it at run time.
// A package exported with `--device cuda` holds its Triton kernels and calls no jepa_engine op.
//
//   jepa_engine::Planner planner("plan.pt2");
//   jepa_engine::Decision d = planner.decide(frames, past, goal);   // execute d.action, then decide again
//
// Inputs (float32 CPU tensors, shapes fixed at export; Planner::shape(name, h) gives them; a CUDA package
// copies them to the device and returns the decision on the CPU):
//   frames [E, h, C, S, S]  the last h observed frames in [0, 1]: h = T (the model's history), or fewer at
//                           an episode's start where the package holds a model for h (`export --histories
//                           all`, the default: every h in 1..T; Planner::histories() lists them)
//   past   [E, h-1, A]      the actions taken between them
//   goal   [E, C, S, S]     the goal frame
// decide() warm-starts from the previous decision (its mean shifted by one step, as the Python planner
// does with warm_start); reset() makes the next decision a cold start (a new episode).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <dlfcn.h>

#include <cstdint>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace jepa_engine {

struct Decision {
  at::Tensor action;  // [E, A]     the first action of the plan: execute it
  at::Tensor plan;    // [E, H, A]  the planned action sequence (clipped to the bounds)
  at::Tensor cost;    // [E]        the cost of the best candidate of the last iteration
  at::Tensor mean;    // [E, H*A]   the final sampling mean (the next decision's warm start)
};

// Loads the native operator library (RTLD_GLOBAL, so its TORCH_LIBRARY registrations stay); throws
// std::runtime_error naming the path and dlerror() when it cannot.
inline void load_ops_library(const std::string& path) {
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* err = dlerror();
    throw std::runtime_error("jepa_engine: cannot load the operator library " + path + ": " +
                             (err ? err : "unknown error"));
  }
}

class Planner {
 public:
  // package: a .pt2 from `jepa-engine export`. ops_library: the path of jepa_engine/_C.so to load
  // first, or "" when the program links it already.
  explicit Planner(const std::string& package, const std::string& ops_library = "") {
    if (!ops_library.empty()) load_ops_library(ops_library);
    std::map<std::string, std::string> meta;
    try {
      auto m = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package, "model");
      meta.insert(m.begin(), m.end());
    } catch (const std::exception& e) {
      throw std::runtime_error("jepa_engine::Planner: cannot read the package " + package + ": " + e.what());
    }
    auto names = meta.find("jepa_engine.inputs");
    if (names == meta.end())
      throw std::runtime_error("jepa_engine::Planner: " + package +
                               " is not a decision step exported by `jepa-engine export` (no jepa_engine.inputs "
                               "in its metadata)");
    for (const auto& name : split(names->second, ',')) {
      std::vector<int64_t> shape;
      for (const auto& s : split(meta.at("jepa_engine.input." + name), ',')) shape.push_back(std::stoll(s));
      names_.push_back(name);
      shapes_.push_back(shape);
    }
    meta_ = meta;
    // A package exported for CUDA (`jepa-engine export --device cuda`) runs on the current CUDA device:
    // observations come from the host, are copied there, and the decision comes back to the host.
    auto dev = meta.find("jepa_engine.device");
    device_ = at::Device(dev == meta.end() || dev->second == "cpu" ? at::kCPU : at::kCUDA);
    // One model per history length: "model" plans from T frames, "history<h>" from h < T (packages from
    // before history lengths hold "model" alone).
    const int64_t T = shape("frames").at(1);
    auto lengths = meta.find("jepa_engine.histories");
    if (lengths == meta.end()) {
      histories_ = {T};
    } else {
      for (const auto& h : split(lengths->second, ',')) histories_.push_back(std::stoll(h));
    }
    for (int64_t h : histories_) {
      const std::string name = h == T ? "model" : "history" + std::to_string(h);
      loaders_[h] = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package, name);
    }
    reset();
  }

  // The shape of input `name` ("frames", "past", "goal"; "prev" is the planner's own state) for the
  // model's full history T, or for `history` frames (one of histories()).
  std::vector<int64_t> shape(const std::string& name, int64_t history = 0) const {
    for (size_t i = 0; i < names_.size(); ++i) {
      if (names_[i] != name) continue;
      std::vector<int64_t> s = shapes_[i];
      if (history > 0 && name == "frames") s.at(1) = history;
      if (history > 0 && name == "past") s.at(1) = history - 1;
      return s;
    }
    throw std::invalid_argument("jepa_engine::Planner::shape: no input named " + name);
  }

  // The numbers of frames the package can plan from, ascending (T last).
  const std::vector<int64_t>& histories() const { return histories_; }

  // A package metadata entry ("jepa_engine.planner", "jepa_engine.config", ...), or "" when absent.
  std::string metadata(const std::string& key) const {
    auto it = meta_.find(key);
    return it == meta_.end() ? "" : it->second;
  }

  // The next decision is a cold start (zero mean), as at the start of an episode.
  void reset() { prev_ = at::zeros(shape("prev"), at::TensorOptions(at::kFloat).device(device_)); }

  // Where the package computes: the CPU, or CUDA for a package exported for it.
  at::Device device() const { return device_; }

  // One decision from the last h observed frames (h one of histories()), warm-started from the last one.
  Decision decide(const at::Tensor& frames, const at::Tensor& past, const at::Tensor& goal) {
    const int64_t h = frames.defined() && frames.dim() == 5 ? frames.size(1) : shape("frames").at(1);
    auto loader = loaders_.find(h);
    if (loader == loaders_.end()) {
      std::string have;
      for (int64_t x : histories_) have += (have.empty() ? "" : ", ") + std::to_string(x);
      throw std::invalid_argument("jepa_engine::Planner::decide: frames must be [E, h, C, S, S] with h one of the "
                                  "package's history lengths (" + have + "; `jepa-engine export --histories all` "
                                  "compiles every one), got " + str(frames.sizes()));
    }
    check("frames", frames, h);
    check("past", past, h);
    check("goal", goal, h);
    auto on = [&](const at::Tensor& t) { return t.to(device_).contiguous(); };
    std::vector<at::Tensor> out = loader->second->run({on(frames), on(past), on(goal), prev_});
    if (out.size() != 4)
      throw std::runtime_error("jepa_engine::Planner::decide: the package returned " + std::to_string(out.size()) +
                               " outputs, expected 4 (action, plan, cost, mean)");
    // the next call's input: the package reads its inputs with the strides it was exported with
    prev_ = out[3].clone(at::MemoryFormat::Contiguous);
    return Decision{out[0].cpu(), out[1].cpu(), out[2].cpu(), out[3].cpu()};
  }

 private:
  static std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> parts;
    std::stringstream in(s);
    for (std::string p; std::getline(in, p, sep);) parts.push_back(p);
    return parts;
  }

  static std::string str(at::IntArrayRef shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }

  void check(const std::string& name, const at::Tensor& t, int64_t history) const {
    const auto want = shape(name, history);
    if (!t.defined() || t.sizes() != at::IntArrayRef(want))
      throw std::invalid_argument("jepa_engine::Planner::decide: " + name + " must be " + str(want) + ", got " +
                                  (t.defined() ? str(t.sizes()) : std::string("an undefined tensor")));
    if (t.scalar_type() != at::kFloat || !t.device().is_cpu())
      throw std::invalid_argument("jepa_engine::Planner::decide: " + name + " must be a float32 CPU tensor, got " +
                                  std::string(c10::toString(t.scalar_type())) + " on " + t.device().str());
  }

  std::vector<int64_t> histories_;
  std::map<int64_t, std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> loaders_;
  std::map<std::string, std::string> meta_;
  std::vector<std::string> names_;
  std::vector<std::vector<int64_t>> shapes_;
  at::Tensor prev_;
  at::Device device_ = at::kCPU;
};

}  // namespace jepa_engine
