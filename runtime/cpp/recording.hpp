// recording.json, the Python loop's recording (tests/test_cpp_host.py writes it): which network and
// step graph it ran, how many steps, and per latents row (the per-row contract) the scheduler table,
// the position in it of the first recorded step and the guidance scale, so the rows of one replay may
// be at different steps of different tables; then the raw float32 files of its model outputs, noise
// and expected latents. Read as untrusted input, like the manifest.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checked_json.hpp"

namespace ktrt {

constexpr int64_t kMaxRecordingJsonBytes = int64_t{1} << 20;

// One latents row of a recording: at replay step i it uses row `start + i` of the table
// `scheduler` for `steps` inference steps, with guidance scale `guidance_scale`.
struct RecordingRow {
  std::string scheduler;
  int64_t steps = 0, start = 0;
  float guidance_scale = 0.0f;
};

struct Recording {
  std::string network, step_graph;
  int64_t steps = 0;               // replayed steps
  std::vector<RecordingRow> rows;  // one per latents row of the step graph (checked by the replay)
  Json files;  // object: key -> file name inside the recording directory, checked by file()

  // Parses recording.json's text; file names are checked when asked for (file()).
  static Recording parse(const std::string& text);
  // The file recorded under `key`: "latents" and "x0_prev" (the state the first recorded step reads; x0_prev
  // is zeros for rows at their table's start), "model_outputs", "noise", "expected", "expected_x0".
  std::string file(const std::string& key) const;
};

}  // namespace ktrt
