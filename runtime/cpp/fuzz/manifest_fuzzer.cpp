// libFuzzer target: the manifest and recording readers on arbitrary bytes, then everything a host
// derives from a manifest that parsed (every scheduler table, the step shapes of every network that
// has latents and model_output, and one step update on zeros when the shapes are small). Any input
// may be refused with a ContractError; nothing else may happen (no crash, no sanitizer report, no
// other exception, no leak).
#include <cstddef>
#include <cstdint>
#include <string>

#include "manifest.hpp"
#include "recording.hpp"
#include "step_update.hpp"

namespace {

void derive(const ktrt::Manifest& m) {
  for (const auto& [name, network] : m.networks) {
    (void)name;
    try {
      const auto shapes = ktrt::StepShapes::of(network, m.profile.cfg);
      if (shapes.latent_count() > 4096 || shapes.output_count() > 8192) continue;
      ktrt::StepState state{std::vector<float>(shapes.latent_count(), 0.5f), std::vector<float>(shapes.latent_count())};
      ktrt::Row row{};
      row.fill(1.0f);
      ktrt::step_update(row, shapes, 4.0f, std::vector<float>(shapes.output_count(), 0.25f),
                        std::vector<float>(shapes.latent_count()), state);
    } catch (const ktrt::ContractError&) {
    }
  }
  for (const char* scheduler : {"prior", "decoder", "decoder_ddpm"})
    for (int64_t steps : {1, 2, 25, 50, 100}) try {
        (void)m.table(scheduler, steps);
      } catch (const ktrt::ContractError&) {
      }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    derive(ktrt::Manifest::parse(text));
  } catch (const ktrt::ContractError&) {
  }
  try {
    const auto rec = ktrt::Recording::parse(text);
    for (const char* key : {"latents", "model_outputs", "noise", "expected", "expected_x0"}) try {
        (void)rec.file(key);
      } catch (const ktrt::ContractError&) {
      }
  } catch (const ktrt::ContractError&) {
  }
  return 0;
}
