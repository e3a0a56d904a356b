// recording.json, the Python loop's recording (tests/test_cpp_host.py writes it): which network,
// step graph and scheduler table it ran, the guidance scale, and the raw float32 files of its model
// outputs, noise and expected latents. Read as untrusted input, like the manifest.
#pragma once

#include <cstdint>
#include <string>

#include "checked_json.hpp"

namespace ktrt {

constexpr int64_t kMaxRecordingJsonBytes = int64_t{1} << 20;

struct Recording {
  std::string network, step_graph, scheduler;
  int64_t steps = 0;
  float guidance_scale = 0.0f;
  Json files;  // object: key -> file name inside the recording directory, checked by file()

  // Parses recording.json's text; file names are checked when asked for (file()).
  static Recording parse(const std::string& text);
  // The file recorded under `key` ("latents", "model_outputs", "noise", "expected", "expected_x0").
  std::string file(const std::string& key) const;
};

}  // namespace ktrt
