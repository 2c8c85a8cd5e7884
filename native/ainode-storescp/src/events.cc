#include "events.h"

#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>

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

void emit(const std::string& json_line) {
  std::lock_guard<std::mutex> lock(g_out_mutex);
  fwrite(json_line.data(), 1, json_line.size(), stdout);
  fputc('\n', stdout);
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
