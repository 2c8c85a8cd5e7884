// The durable write of one received instance (dicom_ai_node/store/spool.py's protocol, docs/architecture.md):
// temp file in the spool's incoming dir -> fsync -> rename into the landing dir -> fsync the landing dir
// -> only then Success. The landed file is the durable record; the node indexes it into the database
// (dicom_ai_node/receive/landing.py) and recovers any landed file without a row at start-up.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>

#include "scan.h"

namespace ainode {

// A landing name: 32 random hex digits (never a DICOM value), as the spool's uuid4().hex names.
std::string new_name();

// Free bytes for an unprivileged writer on the file system holding `dir` (shutil.disk_usage().free).
uint64_t free_bytes(const std::string& dir);

// fsync(2) of a file by path (a second descriptor flushes the same inode); false on error.
bool fsync_path(const std::string& path);

// One fsync of the landing directory for every rename that happened before it started, shared by all
// the associations waiting for it (group commit): with N associations storing at once, N renames cost
// one directory sync, not N.
class DirectorySync {
 public:
  explicit DirectorySync(std::string dir) : dir_(std::move(dir)) {}
  // Returns once a directory fsync that began after the caller's rename has completed; false when it
  // failed (the instance must then not be acknowledged).
  bool sync();

 private:
  std::string dir_;
  std::mutex mutex_;
  std::condition_variable done_;
  uint64_t requested_ = 0, completed_ = 0, failed_upto_ = 0;
  bool running_ = false;
};

// The data set of a received file (after its File Meta Information), read through a window.
class FileSource : public Source {
 public:
  FileSource(int fd, uint64_t start, uint64_t end) : fd_(fd), start_(start), size_(end - start) {}
  uint64_t size() const override { return size_; }
  bool read(uint64_t off, void* dst, size_t n) override;

 private:
  int fd_;
  uint64_t start_, size_;
  std::string window_;
  uint64_t window_off_ = 0;
};

class MemorySource : public Source {
 public:
  explicit MemorySource(std::string data) : data_(std::move(data)) {}
  uint64_t size() const override { return data_.size(); }
  bool read(uint64_t off, void* dst, size_t n) override;

 private:
  std::string data_;
};

// Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5: raw deflate) from fd[start, end),
// at most kMaxInflatedBytes; false (with `why`) when it is not valid deflate or larger than that.
bool inflate_dataset(int fd, uint64_t start, uint64_t end, std::string* out, std::string* why);

}  // namespace ainode
