// SHA-256 of a file (FIPS 180-4), so the host verifies every artifact byte the manifest names.
#pragma once

#include <cstdint>
#include <string>

namespace ktrt {

// Lower-case hex digest of the first `size` bytes of the open file `fd` (read with pread); throws
// std::runtime_error if fewer can be read.
std::string sha256_fd(int fd, int64_t size);

}  // namespace ktrt
