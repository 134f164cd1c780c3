// CPU kernels of the planning ops (candidate sampling, elite refit) and the argument checks they
// share with the Python front end: the same order, the same exception types, the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace jepa_engine {

at::Tensor sample_actions_cpu(const at::Tensor& mean, const at::Tensor& std, const at::Tensor& low,
                              const at::Tensor& high, const at::Tensor& rng, int64_t n, bool include_mean);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> elite_refit_cpu(
    const at::Tensor& costs, const at::Tensor& samples, const at::Tensor& mean, const at::Tensor& std,
    c10::string_view mode, int64_t k, double temperature, double momentum, double min_std);

}  // namespace jepa_engine
