#include "step_update.hpp"

#include <algorithm>
#include <cmath>

namespace ktrt {
namespace {

enum Column { P, Q, CLIP_MIN, CLIP_MAX, U, V, W, R, S, LEARNED, LOG_VAR_MIN, LOG_VAR_MAX };

float learned_std(const Row& c, float var) {
  const float frac = (var + 1.0f) * 0.5f;
  const float log_var = c[LOG_VAR_MIN] + frac * (c[LOG_VAR_MAX] - c[LOG_VAR_MIN]);
  return c[S] + c[LEARNED] * std::exp(0.5f * log_var);
}

}  // namespace

StepShapes StepShapes::of(const Network& step_graph, bool cfg) {
  const Tensor& latents = step_graph.input("latents");
  const Tensor& output = step_graph.input("model_output");
  if (latents.shape.size() < 2 || output.shape.size() != latents.shape.size())
    throw ContractError(step_graph.name + ": expected latents and model_output of the same rank >= 2");
  StepShapes s;
  s.batch = static_cast<size_t>(latents.shape[0]);
  s.channels = static_cast<size_t>(latents.shape[1]);
  s.out_channels = static_cast<size_t>(output.shape[1]);
  s.cfg = cfg;
  for (size_t i = 2; i < latents.shape.size(); ++i) s.plane *= static_cast<size_t>(latents.shape[i]);
  if (static_cast<size_t>(output.shape[0]) != (cfg ? 2 : 1) * s.batch || s.out_channels < s.channels)
    throw ContractError(step_graph.name + ".model_output: expected (" + std::to_string((cfg ? 2 : 1) * s.batch) +
                        ", >= " + std::to_string(s.channels) + ", ...), found another shape");
  return s;
}

void step_update(const Row& c, const StepShapes& s, float g, const std::vector<float>& out,
                 const std::vector<float>& noise, StepState& state) {
  const bool has_var = s.out_channels > s.channels;
  std::vector<float> next(state.latents.size()), x0(state.latents.size());
  for (size_t b = 0; b < s.batch; ++b) {
    const size_t cond_row = s.cfg ? s.batch + b : b;  // model_output is [uncond; cond] with guidance
    for (size_t ch = 0; ch < s.channels; ++ch) {
      for (size_t p = 0; p < s.plane; ++p) {
        const size_t i = (b * s.channels + ch) * s.plane + p;
        const float cond = out[(cond_row * s.out_channels + ch) * s.plane + p];
        float eps = cond;
        if (s.cfg) {
          const float uncond = out[(b * s.out_channels + ch) * s.plane + p];
          eps = uncond + g * (cond - uncond);
        }
        const float std = has_var ? learned_std(c, out[(cond_row * s.out_channels + s.channels + ch) * s.plane + p])
                                  : c[S];
        const float x = state.latents[i];
        x0[i] = std::min(std::max(c[P] * x + c[Q] * eps, c[CLIP_MIN]), c[CLIP_MAX]);
        next[i] = c[U] * x0[i] + c[V] * x + c[W] * eps + c[R] * state.x0_prev[i] + std * noise[i];
      }
    }
  }
  state.latents.swap(next);
  state.x0_prev.swap(x0);
}

}  // namespace ktrt
