// libFuzzer target: the manifest and recording readers on arbitrary bytes, then everything a host
// derives from a manifest that parsed (every scheduler table, the step shapes of every network that
// has latents and model_output, and one step update when the shapes are small). Inputs starting with
// 'S' are also read as raw step-graph shapes (cfg flag, then rank and dims of latents and
// model_output, one byte each), which reaches the shape checks far faster than JSON mutations do.
// Any input may be refused with a ContractError; nothing else may happen (no crash, no sanitizer
// report, no other exception, no leak).
#include <cstddef>
#include <cstdint>
#include <string>

#include "manifest.hpp"
#include "recording.hpp"
#include "step_update.hpp"

namespace {

// StepShapes::of, then one step update with buffers of the sizes the shapes give.
void step(const ktrt::Network& network, bool cfg) {
  try {
    const auto shapes = ktrt::StepShapes::of(network, cfg);
    if (shapes.latent_count() > 4096 || shapes.output_count() > 8192) return;
    ktrt::StepState state{std::vector<float>(shapes.latent_count(), 0.5f), std::vector<float>(shapes.latent_count())};
    ktrt::Row row{};
    row.fill(1.0f);
    const ktrt::StepRows rows{std::vector<ktrt::Row>(shapes.batch, row), std::vector<float>(shapes.batch, 4.0f)};
    ktrt::step_update(rows, shapes, std::vector<float>(shapes.output_count(), 0.25f),
                      std::vector<float>(shapes.latent_count()), state);
  } catch (const ktrt::ContractError&) {
  }
}

// 'S', cfg, rank, dims..., rank, dims...: a step graph's two shapes straight from bytes.
void raw_shapes(const uint8_t* data, size_t size) {
  size_t at = 2;
  auto shape = [&]() {
    std::vector<int64_t> dims(at < size ? data[at++] % 6 : 0);
    for (auto& d : dims) d = at < size ? 1 + data[at++] % 9 : 1;
    return dims;
  };
  ktrt::Network network{"raw", "raw.onnx", {}, {}};
  network.inputs.push_back({"latents", "float32", shape()});
  network.inputs.push_back({"model_output", "float32", shape()});
  step(network, size > 1 && (data[1] & 1));
}

void derive(const ktrt::Manifest& m) {
  for (const auto& item : m.networks) step(item.second, m.profile.cfg);
  for (const char* scheduler : {"prior", "decoder", "decoder_ddpm"})
    for (int64_t steps : {1, 2, 25, 50, 100}) try {
        (void)m.table(scheduler, steps);
      } catch (const ktrt::ContractError&) {
      }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 0 && data[0] == 'S') raw_shapes(data, size);
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    derive(ktrt::Manifest::parse(text));
  } catch (const ktrt::ContractError&) {
  }
  try {
    const auto rec = ktrt::Recording::parse(text);
    for (const char* key : {"latents", "x0_prev", "model_outputs", "noise", "expected", "expected_x0"}) try {
        (void)rec.file(key);
      } catch (const ktrt::ContractError&) {
      }
  } catch (const ktrt::ContractError&) {
  }
  return 0;
}
