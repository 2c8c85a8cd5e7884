// The receive checks of dicom_ai_node/receive/{header,ingest}.py, on a received data set, in C++.
//
// Reads only what the checks need: element headers, the four key UIDs, the Image Pixel attributes and
// the declared length of Pixel Data. Never reads a value past the end of the data, never allocates
// from a declared length, follows undefined-length sequences only to a fixed depth. Each refusal carries
// the C-STORE status the Python path answers for the same input (domain/conformance.py).
#pragma once

#include <cstdint>
#include <string>

namespace ainode {

// C-STORE statuses (PS3.4 B.2-1, PS3.7 C; the node's low bytes: dicom_ai_node/domain/conformance.py).
constexpr uint16_t kSuccess = 0x0000;
constexpr uint16_t kInvalidSopInstance = 0x0117;
constexpr uint16_t kOutOfResources = 0xA700;
constexpr uint16_t kDatasetDoesNotMatch = 0xA900;
constexpr uint16_t kSopInstanceMismatch = 0xA901;
constexpr uint16_t kSopClassMismatch = 0xA902;
constexpr uint16_t kCannotUnderstand = 0xC210;
constexpr uint16_t kElementPastEnd = 0xC212;
constexpr uint16_t kNestingTooDeep = 0xC213;
constexpr uint16_t kPixelDataTooShort = 0xC214;

// Undefined-length sequences nested deeper than this are refused (0xC213). pydicom's recursive reader
// gives up between ~150 and ~200 levels, so every data set accepted here is readable there.
constexpr int kMaxNesting = 128;
// A deflated data set is inflated in memory to be read; more than this is refused (0xC210).
constexpr uint64_t kMaxInflatedBytes = 64ull << 20;

// Random access to the received data set (a file, or memory after inflating).
class Source {
 public:
  virtual ~Source() = default;
  virtual uint64_t size() const = 0;
  // Copy n bytes at off into dst; false when they are not all there.
  virtual bool read(uint64_t off, void* dst, size_t n) = 0;
};

// What the C-STORE request announced about its data set.
struct Announced {
  std::string sop_class_uid;     // Affected SOP Class UID
  std::string sop_instance_uid;  // Affected SOP Instance UID
  std::string context_sop_class_uid;  // the presentation context's abstract syntax
  std::string transfer_syntax_uid;    // the presentation context's transfer syntax
};

struct CheckResult {
  uint16_t status = kSuccess;
  std::string reason;  // one line, UIDs only (no PHI)
  std::string sop_instance_uid, sop_class_uid, series_instance_uid, study_instance_uid;
};

// Run every check of ingest.check_instance (and the header reader's refusals) on the data set in `src`
// (without File Meta Information), encoded in the announced transfer syntax.
CheckResult check_dataset(Source& src, const Announced& announced);

// PS3.5 9.1: digits and dots, no empty component, no leading zero in a multi-digit component, <= 64.
bool is_valid_uid(const std::string& value);

}  // namespace ainode
