#include "events.h"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

namespace ainode {
namespace {
std::mutex g_out_mutex;
std::mutex g_limit_mutex;

struct Limited {
  std::chrono::steady_clock::time_point last;
  int suppressed = 0;
};
std::map<std::string, Limited> g_limited;
}  // namespace

std::string json_string(const std::string& value) {
  std::string out = "\"";
  for (unsigned char c : value) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c >= 0x7F) {
          // Peer bytes are not necessarily UTF-8: escape every non-ASCII byte as its own code point.
          char buf[8];
          snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  return out + "\"";
}

Json& Json::str(const char* key, const std::string& value) { return raw(key, json_string(value)); }

Json& Json::num(const char* key, long long value) { return raw(key, std::to_string(value)); }

Json& Json::raw(const char* key, const std::string& json) {
  if (!body_.empty()) body_ += ",";
  body_ += json_string(key) + ":" + json;
  return *this;
}

// Events go out on a thread of their own: an association never waits for the node to read its pipe
// (the instance is durable before its event exists; the event only tells the node sooner than its rescan).
namespace {
// Never destroyed: the writer thread waits on them until the process ends.
std::mutex& g_event_mutex = *new std::mutex;
std::condition_variable& g_event_ready = *new std::condition_variable;
std::deque<std::string>& g_events = *new std::deque<std::string>;
bool g_event_writer_started = false;

void write_events() {
  std::unique_lock<std::mutex> lock(g_event_mutex);
  for (;;) {
    g_event_ready.wait(lock, [] { return !g_events.empty(); });
    std::deque<std::string> batch;
    batch.swap(g_events);
    lock.unlock();
    {
      std::lock_guard<std::mutex> out(g_out_mutex);
      for (const std::string& line : batch) {
        fwrite(line.data(), 1, line.size(), stdout);
        fputc('\n', stdout);
      }
      fflush(stdout);  // one write for every line that queued up meanwhile
    }
    lock.lock();
  }
}
}  // namespace

void emit(const std::string& json_line) {
  std::lock_guard<std::mutex> lock(g_event_mutex);
  if (!g_event_writer_started) {
    std::thread(write_events).detach();
    g_event_writer_started = true;
  }
  g_events.push_back(json_line);
  g_event_ready.notify_one();
}

void flush_events() {
  for (int i = 0; i < 200; ++i) {
    {
      std::lock_guard<std::mutex> lock(g_event_mutex);
      if (g_events.empty()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::lock_guard<std::mutex> out(g_out_mutex);
  fflush(stdout);
}

void log(Level level, const std::string& message) {
  static const char* const kNames[] = {"DEBUG", "INFO", "WARNING", "ERROR"};
  std::string line = std::string(kNames[int(level)]) + " " + message;
  for (char& c : line)
    if (c == '\n' || c == '\r') c = ' ';
  std::lock_guard<std::mutex> lock(g_out_mutex);
  fprintf(stderr, "%s\n", line.c_str());
  fflush(stderr);
}

void log_limited(const std::string& key, const std::string& message, double interval_s) {
  auto now = std::chrono::steady_clock::now();
  int suppressed = 0;
  {
    std::lock_guard<std::mutex> lock(g_limit_mutex);
    auto it = g_limited.find(key);
    if (it != g_limited.end() && std::chrono::duration<double>(now - it->second.last).count() < interval_s) {
      ++it->second.suppressed;
      return;
    }
    if (g_limited.size() > 10000) g_limited.clear();  // many distinct peers: keep memory bounded
    Limited& entry = g_limited[key];
    suppressed = entry.suppressed;
    entry = Limited{now, 0};
  }
  if (suppressed)
    log(Level::kWarning, message + " (" + std::to_string(suppressed) + " more like this in the last " +
                             std::to_string(int(interval_s)) + " s not logged)");
  else
    log(Level::kWarning, message);
}

std::string ae_text(const std::string& text) {
  std::string out = "'";
  for (unsigned char c : text) out += (c >= 0x20 && c < 0x7F && c != '\'') ? char(c) : '?';
  return out + "'";
}

}  // namespace ainode
