// What the receiver tells the node: JSON lines on stdout (events the node acts on) and "LEVEL message"
// lines on stderr (its log, which the node forwards into its own). Both are line-atomic across threads.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ainode {

// A JSON object built field by field; values are escaped (AE titles and reasons come from peers).
class Json {
 public:
  Json& str(const char* key, const std::string& value);
  Json& num(const char* key, long long value);
  Json& raw(const char* key, const std::string& json);  // an already-encoded JSON value
  std::string done() const { return "{" + body_ + "}"; }

 private:
  std::string body_;
};

std::string json_string(const std::string& value);

// One event line on stdout, written by the event thread (in order, flushed as soon as it is idle).
void emit(const std::string& json_line);
// Wait (briefly) until every event emitted so far is written: before the process exits.
void flush_events();

enum class Level { kDebug, kInfo, kWarning, kError };
void log(Level level, const std::string& message);

// At most one line per key per interval; the next one says how many were left out (receive/guard.py's
// RateLimitedLog): a flood of refusals cannot flood the log.
void log_limited(const std::string& key, const std::string& message, double interval_s = 60.0);

// A peer-controlled text (AE title) for a log line: printable ASCII, quoted.
std::string ae_text(const std::string& text);

}  // namespace ainode
