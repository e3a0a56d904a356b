// SHA-256 of a file (FIPS 180-4), so the host verifies every artifact byte the manifest names.
#pragma once

#include <string>

namespace ktrt {

// Lower-case hex digest of the file at `path`; throws std::runtime_error if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace ktrt
