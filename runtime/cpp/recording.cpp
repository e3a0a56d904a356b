#include "recording.hpp"

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
  r.scheduler = text(j, "scheduler");
  r.steps = int_of(member(j, "num_inference_steps", "recording"), "recording.num_inference_steps", 1, kMaxSteps);
  r.guidance_scale = f32_of(member(j, "guidance_scale", "recording"), "recording.guidance_scale");
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
