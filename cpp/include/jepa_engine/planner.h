// jepa_engine::Planner: a world model's decision step, exported by `jepa-engine export` as an
// AOTInductor package (.pt2), run from C++ with no Python. One header; link libtorch and the native
// operator library jepa_engine/_C.so (it defines the jepa_engine ops a CPU package calls: sample_actions,
// elite_refit, masked_attention), or pass the library's path to the constructor to load it at run time.
// A package exported with `--device cuda` holds its Triton kernels and calls no jepa_engine op.
//
//   jepa_engine::Planner planner("plan.pt2");
//   jepa_engine::Decision d = planner.decide(frames, past, goal);   // execute d.action, then decide again
//
// Inputs (float32 CPU tensors, shapes fixed at export; Planner::shape(name) gives them; a CUDA package
// copies them to the device and returns the decision on the CPU):
//   frames [E, T, C, S, S]  the last T observed frames in [0, 1] (T = the model's history)
//   past   [E, T-1, A]      the actions taken between them
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
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package, "model");
    reset();
  }

  // The fixed shape of input `name` ("frames", "past", "goal"; "prev" is the planner's own state).
  const std::vector<int64_t>& shape(const std::string& name) const {
    for (size_t i = 0; i < names_.size(); ++i)
      if (names_[i] == name) return shapes_[i];
    throw std::invalid_argument("jepa_engine::Planner::shape: no input named " + name);
  }

  // A package metadata entry ("jepa_engine.planner", "jepa_engine.config", ...), or "" when absent.
  std::string metadata(const std::string& key) const {
    auto it = meta_.find(key);
    return it == meta_.end() ? "" : it->second;
  }

  // The next decision is a cold start (zero mean), as at the start of an episode.
  void reset() { prev_ = at::zeros(shape("prev"), at::TensorOptions(at::kFloat).device(device_)); }

  // Where the package computes: the CPU, or CUDA for a package exported for it.
  at::Device device() const { return device_; }

  Decision decide(const at::Tensor& frames, const at::Tensor& past, const at::Tensor& goal) {
    check("frames", frames);
    check("past", past);
    check("goal", goal);
    auto on = [&](const at::Tensor& t) { return t.to(device_).contiguous(); };
    std::vector<at::Tensor> out = loader_->run({on(frames), on(past), on(goal), prev_});
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

  void check(const std::string& name, const at::Tensor& t) const {
    const auto& want = shape(name);
    if (!t.defined() || t.sizes() != at::IntArrayRef(want))
      throw std::invalid_argument("jepa_engine::Planner::decide: " + name + " must be " + str(want) + ", got " +
                                  (t.defined() ? str(t.sizes()) : std::string("an undefined tensor")));
    if (t.scalar_type() != at::kFloat || !t.device().is_cpu())
      throw std::invalid_argument("jepa_engine::Planner::decide: " + name + " must be a float32 CPU tensor, got " +
                                  std::string(c10::toString(t.scalar_type())) + " on " + t.device().str());
  }

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  std::map<std::string, std::string> meta_;
  std::vector<std::string> names_;
  std::vector<std::vector<int64_t>> shapes_;
  at::Tensor prev_;
  at::Device device_ = at::kCPU;
};

}  // namespace jepa_engine
