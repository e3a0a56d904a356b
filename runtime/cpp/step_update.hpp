// One denoising step without the network: classifier-free guidance and the scheduler update, per row
// (the per-row contract, manifest schema 4: latents row b uses coefficient row b and guidance scale b,
// so the rows of one step may be at different steps of different tables), exactly as the ONNX step
// graphs compute it (export/step_graphs.py), in float32 and in the graph's operation order:
//   eps = uncond + g * (cond - uncond)            (latent channels; the cond half with guidance)
//   std = s + learned * exp(0.5 * (log_var_min + (var + 1) * 0.5 * (log_var_max - log_var_min)))
//   x0 = clip(p * x + q * eps);  x_next = u * x0 + v * x + w * eps + r * x0_prev + std * noise
#pragma once

#include <vector>

#include "manifest.hpp"

namespace ktrt {

// Shapes of one step graph, read from its manifest I/O and checked against each other before any
// indexing: latents (batch, channels, ...rest) and model_output ((2 *) batch, channels or
// 2 * channels (learned variance), ...rest); where the graph lists them, coefficients (batch, 12) and
// guidance_scale (batch, 1).
struct StepShapes {
  size_t batch = 0, channels = 0, out_channels = 0, plane = 1;  // plane = product of the rest
  bool cfg = true;
  size_t latents = 0, outputs = 0;  // element counts (overflow-checked)
  static StepShapes of(const Network& step_graph, bool cfg);
  size_t latent_count() const { return latents; }
  size_t output_count() const { return outputs; }
};

struct StepState {
  std::vector<float> latents, x0_prev;  // x and the previous x0 (zeros before the first step)
};

// One step's per-row inputs: a coefficient row and a guidance scale for every latents row.
struct StepRows {
  std::vector<Row> coefficients;
  std::vector<float> guidance;
};

// Advances `state` by one step; `noise` is all zeros on deterministic steps. Every buffer's size and
// the number of rows are checked against `shapes` first (ContractError otherwise).
void step_update(const StepRows& rows, const StepShapes& shapes, const std::vector<float>& model_output,
                 const std::vector<float>& noise, StepState& state);

}  // namespace ktrt
