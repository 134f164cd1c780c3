// The jepa_engine operator library: every schema defined here is the op's one definition; the CPU
// kernels are registered below, and the Python package registers onto the same schemas what belongs
// in Python (the Triton CUDA kernels and the fake kernels that shape inference and export use).
#include "planning.h"

#include <torch/library.h>

TORCH_LIBRARY(jepa_engine, m) {
  m.def("sample_actions(Tensor mean, Tensor std, Tensor low, Tensor high, Tensor rng, int n, "
        "bool include_mean=True) -> Tensor");
  m.def("elite_refit(Tensor costs, Tensor samples, Tensor mean, Tensor std, str mode=\"cem\", int k=1, "
        "float temperature=1.0, float momentum=0.0, float min_std=0.0) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(jepa_engine, CPU, m) {
  m.impl("sample_actions", &jepa_engine::sample_actions_cpu);
  m.impl("elite_refit", &jepa_engine::elite_refit_cpu);
}
