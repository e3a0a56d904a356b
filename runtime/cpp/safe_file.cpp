#include "safe_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "checked_json.hpp"
#include "sha256.hpp"

namespace ktrt {
namespace {

std::string kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode) || S_ISBLK(mode)) return "a device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symlink";
  return "not a regular file";
}

std::vector<std::string> components(const std::string& name) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t slash = name.find('/', start);
    parts.push_back(name.substr(start, slash == std::string::npos ? std::string::npos : slash - start));
    if (slash == std::string::npos) return parts;
    start = slash + 1;
  }
}

int open_component(int dir_fd, const std::string& part, bool last) {
  int flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY;
  flags |= last ? O_NONBLOCK : O_DIRECTORY;
  int fd;
  do fd = openat(dir_fd, part.c_str(), flags);
  while (fd < 0 && errno == EINTR);
  return fd;
}

}  // namespace

void check_relative_name(const std::string& name, const std::string& where) {
  bool bad = name.empty() || name.size() > 4096 || name.front() == '/' || name.find('\\') != std::string::npos ||
             name.find('\0') != std::string::npos;
  if (!bad)
    for (const auto& part : components(name)) bad = bad || part.empty() || part == "." || part == "..";
  if (bad) throw ContractError(where + ": expected a file name inside the artifacts directory, found '" + name + "'");
}

Directory::Directory(const std::string& path, const std::string& where) : path_(path) {
  fd_ = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_CLOEXEC);
  if (fd_ < 0) throw ContractError(where + ": expected a readable directory " + path + ", found " + std::strerror(errno));
}

Directory::~Directory() {
  if (fd_ >= 0) close(fd_);
}

RegularFile::RegularFile(const Directory& dir, const std::string& name, const std::string& where, int64_t max_bytes)
    : where_(where) {
  check_relative_name(name, where);
  const std::string shown = dir.path() + "/" + name;
  const auto parts = components(name);
  int at = dir.fd();
  for (size_t i = 0; i < parts.size(); ++i) {
    const bool last = i + 1 == parts.size();
    const int fd = open_component(at, parts[i], last);
    const int saved = errno;
    if (at != dir.fd()) close(at);
    if (fd < 0) {
      const std::string why = saved == ELOOP || (saved == ENOTDIR && !last)
                                  ? "a symlink or non-directory (symlinks are refused)" : std::strerror(saved);
      throw ContractError(where + ": expected a regular file " + shown + ", found " + why);
    }
    at = fd;
  }
  struct stat st {};
  std::string refused;
  if (fstat(at, &st) != 0 || !S_ISREG(st.st_mode))
    refused = "a regular file " + shown + ", found " + kind_of(st.st_mode);
  else if (st.st_size < 0 || st.st_size > max_bytes)
    refused = "at most " + std::to_string(max_bytes) + " bytes in " + shown + ", found " + std::to_string(st.st_size);
  if (!refused.empty()) {
    close(at);  // the destructor does not run for a constructor that throws
    throw ContractError(where + ": expected " + refused);
  }
  fd_ = at;
  size_ = static_cast<int64_t>(st.st_size);
}

RegularFile::~RegularFile() {
  if (fd_ >= 0) close(fd_);
}

std::string RegularFile::sha256() const { return sha256_fd(fd_, size_); }

void RegularFile::read_exact(char* out, int64_t bytes) const {
  int64_t done = 0;
  while (done < bytes) {
    const ssize_t n = pread(fd_, out + done, static_cast<size_t>(bytes - done), done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw ContractError(where_ + ": expected " + std::to_string(bytes) + " bytes, found the file shorter");
    done += n;
  }
  char extra;
  if (pread(fd_, &extra, 1, bytes) > 0)
    throw ContractError(where_ + ": expected " + std::to_string(bytes) + " bytes, found the file longer");
}

std::string RegularFile::read_all() const {
  std::string text(static_cast<size_t>(size_), '\0');
  read_exact(text.data(), size_);
  return text;
}

std::vector<float> RegularFile::read_f32(int64_t count) const {
  const int64_t bytes = checked_mul(count, int64_t{sizeof(float)}, kMaxElements * 4, where_);
  if (bytes != size_)
    throw ContractError(where_ + ": expected " + std::to_string(bytes) + " bytes of float32, found " +
                        std::to_string(size_));
  std::vector<float> values(static_cast<size_t>(count));
  read_exact(reinterpret_cast<char*>(values.data()), bytes);
  return values;
}

}  // namespace ktrt
