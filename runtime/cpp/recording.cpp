#include "recording.hpp"

#include <utility>

#include "manifest.hpp"
#include "safe_file.hpp"

namespace ktrt {
namespace {

std::string text(const Json& j, const std::string& key) {
  return string_of(member(j, key, "recording"), "recording." + key);
}

}  // namespace

Recording Recording::parse(const std::string& json_text) {
  const Json j = parse_json(json_text, "recording");
  object_of(j, "recording");
  Recording r;
  r.network = text(j, "network");
  r.step_graph = text(j, "step_graph");
  r.steps = int_of(member(j, "steps", "recording"), "recording.steps", 1, kMaxSteps);
  const Json& rows = array_of(member(j, "rows", "recording"), "recording.rows");
  if (rows.empty() || rows.size() > static_cast<size_t>(kMaxBatch))
    throw ContractError("recording.rows: expected 1 to " + std::to_string(kMaxBatch) + " rows, found " +
                        std::to_string(rows.size()));
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::string where = "recording.rows[" + std::to_string(i) + "]";
    const Json& row = object_of(rows[i], where);
    RecordingRow parsed;
    parsed.scheduler = string_of(member(row, "scheduler", where), where + ".scheduler");
    parsed.steps = int_of(member(row, "num_inference_steps", where), where + ".num_inference_steps", 1, kMaxSteps);
    parsed.start = int_of(member(row, "start", where), where + ".start", 0, kMaxSteps);
    parsed.guidance_scale = f32_of(member(row, "guidance_scale", where), where + ".guidance_scale");
    r.rows.push_back(std::move(parsed));
  }
  r.files = object_of(member(j, "files", "recording"), "recording.files");
  return r;
}

std::string Recording::file(const std::string& key) const {
  const std::string where = "recording.files." + key;
  const std::string name = string_of(member(files, key, "recording.files"), where);
  check_relative_name(name, where);
  return name;
}

}  // namespace ktrt
