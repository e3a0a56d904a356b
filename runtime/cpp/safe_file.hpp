// Opening a file an untrusted manifest names: a relative name inside one directory, every component
// opened with O_NOFOLLOW (symlinks are refused altogether, not resolved), the last one with
// O_NONBLOCK so a FIFO cannot block, then fstat: only regular files are read (no FIFOs, devices,
// sockets or directories), and the size is known and bounded before any byte is read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ktrt {

// An open directory that files are opened inside; the directory itself may be reached through a
// symlink (the user named it), nothing inside it may be.
class Directory {
 public:
  Directory(const std::string& path, const std::string& where);
  ~Directory();
  Directory(const Directory&) = delete;
  Directory& operator=(const Directory&) = delete;
  const std::string& path() const { return path_; }
  int fd() const { return fd_; }

 private:
  std::string path_;
  int fd_ = -1;
};

// A regular file opened inside a Directory; `where` names the field that named it in errors.
class RegularFile {
 public:
  RegularFile(const Directory& dir, const std::string& name, const std::string& where, int64_t max_bytes);
  ~RegularFile();
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  int64_t size() const { return size_; }
  std::string sha256() const;
  // Every byte (the size was bounded at open); throws if the file changed size meanwhile.
  std::string read_all() const;
  // Exactly `count` float32 values (little-endian, as x86-64 and aarch64 store them): the size is
  // checked against count * 4 before anything is allocated.
  std::vector<float> read_f32(int64_t count) const;

 private:
  void read_exact(char* out, int64_t bytes) const;
  std::string where_;
  int fd_ = -1;
  int64_t size_ = 0;
};

// A file name the manifest gives: relative, no "..", no ".", no empty component, no backslash.
void check_relative_name(const std::string& name, const std::string& where);

}  // namespace ktrt
