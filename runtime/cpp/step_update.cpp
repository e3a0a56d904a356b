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

std::string dims_text(const std::vector<int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? "," : "") + std::to_string(dims[i]);
  return text + "]";
}

// A per-row input the graph lists must be (batch, width): schema 4 has one row per latents row.
void check_per_row(const Network& step_graph, const std::string& name, int64_t batch, int64_t width) {
  const std::vector<int64_t> expected{batch, width};
  for (const auto& t : step_graph.inputs)
    if (t.name == name && (t.dtype != "float32" || t.shape != expected))
      throw ContractError(step_graph.name + ".inputs." + name + ": expected float32" + dims_text(expected) +
                          " (one row per latents row), found " + t.dtype + dims_text(t.shape));
}

}  // namespace

StepShapes StepShapes::of(const Network& step_graph, bool cfg) {
  const Tensor& latents = step_graph.input("latents");
  const Tensor& output = step_graph.input("model_output");
  const std::string where = step_graph.name + ".inputs.model_output";
  if (latents.dtype != "float32" || output.dtype != "float32")
    throw ContractError(step_graph.name + ".inputs: expected float32 latents and model_output, found " + latents.dtype +
                        " and " + output.dtype);
  if (latents.shape.size() < 2 || output.shape.size() != latents.shape.size())
    throw ContractError(where + ": expected the rank of latents (>= 2), found rank " + std::to_string(output.shape.size()) +
                        " for latents of rank " + std::to_string(latents.shape.size()));
  // Dims are in [1, 2^31 - 1] (shape_of), so these products cannot overflow int64.
  const int64_t rows = (cfg ? 2 : 1) * latents.shape[0], channels = latents.shape[1];
  bool same = output.shape[0] == rows && (output.shape[1] == channels || output.shape[1] == 2 * channels);
  for (size_t i = 2; i < latents.shape.size(); ++i) same = same && output.shape[i] == latents.shape[i];
  if (!same)
    throw ContractError(where + ": expected (" + std::to_string(rows) + ", " + std::to_string(channels) + " or " +
                        std::to_string(2 * channels) + ", the latents' other dims), found another shape");
  check_per_row(step_graph, "coefficients", latents.shape[0], static_cast<int64_t>(kColumns.size()));
  check_per_row(step_graph, "guidance_scale", latents.shape[0], 1);
  StepShapes s;
  s.batch = static_cast<size_t>(latents.shape[0]);
  s.channels = static_cast<size_t>(channels);
  s.out_channels = static_cast<size_t>(output.shape[1]);
  s.cfg = cfg;
  s.latents = static_cast<size_t>(latents.count());
  s.outputs = static_cast<size_t>(output.count());
  s.plane = s.latents / (s.batch * s.channels);
  return s;
}

void step_update(const StepRows& rows, const StepShapes& s, const std::vector<float>& model_output,
                 const std::vector<float>& noise, StepState& state) {
  if (model_output.size() != s.outputs || noise.size() != s.latents || state.latents.size() != s.latents ||
      state.x0_prev.size() != s.latents)
    throw ContractError("step_update: expected buffers of " + std::to_string(s.outputs) + " model outputs and " +
                        std::to_string(s.latents) + " latents, found buffers of other sizes");
  if (rows.coefficients.size() != s.batch || rows.guidance.size() != s.batch)
    throw ContractError("step_update: expected " + std::to_string(s.batch) + " coefficient rows and guidance scales "
                        "(one per latents row), found " + std::to_string(rows.coefficients.size()) + " and " +
                        std::to_string(rows.guidance.size()));
  const bool has_var = s.out_channels == 2 * s.channels;
  const std::vector<float>& out = model_output;
  std::vector<float> next(state.latents.size()), x0(state.latents.size());
  for (size_t b = 0; b < s.batch; ++b) {
    const Row& c = rows.coefficients[b];
    const float g = rows.guidance[b];
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
