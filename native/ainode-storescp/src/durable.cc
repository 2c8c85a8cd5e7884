#include "durable.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>

namespace ainode {

std::string new_name() {
  unsigned char raw[16];
  size_t got = 0;
  while (got < sizeof raw) {
    ssize_t n = getrandom(raw + got, sizeof raw - got, 0);
    if (n > 0) got += size_t(n);
  }
  static const char* const kHex = "0123456789abcdef";
  std::string name(32, '0');
  for (int i = 0; i < 16; ++i) {
    name[2 * i] = kHex[raw[i] >> 4];
    name[2 * i + 1] = kHex[raw[i] & 15];
  }
  return name;
}

uint64_t free_bytes(const std::string& dir) {
  struct statvfs st;
  if (statvfs(dir.c_str(), &st) != 0) return 0;
  return uint64_t(st.f_bavail) * st.f_frsize;
}

bool fsync_path(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = fsync(fd) == 0;
  return close(fd) == 0 && ok;
}

bool DirectorySync::sync() {
  std::unique_lock<std::mutex> lock(mutex_);
  // The caller renamed before taking its ticket; any fsync that starts after this point covers it.
  const uint64_t ticket = ++requested_;
  while (completed_ < ticket) {
    if (running_) {
      done_.wait(lock);
      continue;
    }
    running_ = true;
    const uint64_t covers = requested_;
    lock.unlock();
    bool ok = fsync_path(dir_);
    lock.lock();
    running_ = false;
    completed_ = covers;
    if (!ok) failed_upto_ = covers;
    done_.notify_all();
  }
  // Failed when the sync that covered this ticket failed (a later successful one does not undo that:
  // the caller answers 0xA700 and the sender retries; the landed file is indexed anyway).
  return failed_upto_ < ticket;
}

bool FileSource::read(uint64_t off, void* dst, size_t n) {
  if (off + n > size_) return false;
  if (off < window_off_ || off + n > window_off_ + window_.size()) {
    // Element headers and the few values read are small: one 64 KiB window covers a header at a time.
    const size_t want = size_t(std::min<uint64_t>(std::max<size_t>(n, 65536), size_ - off));
    window_.resize(want);
    size_t got = 0;
    while (got < want) {
      ssize_t r = pread(fd_, &window_[got], want - got, off_t(start_ + off + got));
      if (r <= 0) return false;
      got += size_t(r);
    }
    window_off_ = off;
  }
  memcpy(dst, window_.data() + (off - window_off_), n);
  return true;
}

bool MemorySource::read(uint64_t off, void* dst, size_t n) {
  if (off + n > data_.size()) return false;
  memcpy(dst, data_.data() + off, n);
  return true;
}

bool inflate_dataset(int fd, uint64_t start, uint64_t end, std::string* out, std::string* why) {
  z_stream z;
  memset(&z, 0, sizeof z);
  if (inflateInit2(&z, -MAX_WBITS) != Z_OK) {
    *why = "cannot initialise zlib";
    return false;
  }
  std::string in(1 << 18, '\0');
  char chunk[1 << 16];
  uint64_t pos = start;
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    if (z.avail_in == 0) {
      if (pos >= end) break;  // pydicom inflates what is there: a truncated stream ends the data set
      ssize_t r = pread(fd, &in[0], size_t(std::min<uint64_t>(in.size(), end - pos)), off_t(pos));
      if (r <= 0) break;
      pos += uint64_t(r);
      z.next_in = reinterpret_cast<Bytef*>(&in[0]);
      z.avail_in = uInt(r);
    }
    z.next_out = reinterpret_cast<Bytef*>(chunk);
    z.avail_out = sizeof chunk;
    rc = inflate(&z, Z_NO_FLUSH);
    if (rc != Z_OK && rc != Z_STREAM_END && rc != Z_BUF_ERROR) {
      inflateEnd(&z);
      *why = "unreadable dataset: error: not a deflated data set";
      return false;
    }
    out->append(chunk, sizeof chunk - z.avail_out);
    if (out->size() > kMaxInflatedBytes) {
      inflateEnd(&z);
      *why = "deflated data set inflates to more than 64 MiB";
      return false;
    }
    if (rc == Z_BUF_ERROR && z.avail_in == 0 && pos >= end) break;
  }
  inflateEnd(&z);
  return true;
}

}  // namespace ainode
