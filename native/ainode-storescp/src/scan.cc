// The receive checks on a received data set: see scan.h. Mirrors, rule by rule and in the same order,
// dicom_ai_node/receive/header.py (read_header: the refusals 0xC210/0xC212/0xC213) and
// dicom_ai_node/receive/ingest.py (check_instance: 0x0117, 0xA900, 0xA901, 0xA902, 0xC214).
#include "scan.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <regex>

namespace ainode {
namespace {

constexpr uint32_t kUndefined = 0xFFFFFFFFu;
constexpr uint32_t kPixelData = 0x7FE00010u;
constexpr uint32_t kFloatPixelData = 0x7FE00008u;
constexpr uint32_t kDoubleFloatPixelData = 0x7FE00009u;
constexpr uint32_t kItem = 0xFFFEE000u;
constexpr uint32_t kItemDelimitation = 0xFFFEE00Du;
constexpr uint32_t kSequenceDelimitation = 0xFFFEE0DDu;

// A refusal while reading: unwinds the scan (no exceptions cross the scanner's boundary).
struct Refusal {
  uint16_t status;
  std::string reason;
};

struct Syntax {
  bool explicit_vr;
  bool little_endian;
};

// The attributes the checks read (top level only, as pydicom's `ds.get` in read_header).
enum Wanted { kSopClass, kSopInstance, kStudy, kSeries, kRows, kColumns, kSamples, kBits, kFrames,
              kPhotometric, kWantedCount };

struct Value {
  bool present = false;
  std::string text;     // string VRs (UIDs, CS, IS), trimmed
  bool binary = false;  // an unsigned short read as a number
  long number = 0;
  bool multi = false;   // more than one value: pydicom's MultiValue, which int() refuses
};

int wanted_index(uint32_t tag) {
  switch (tag) {
    case 0x00080016: return kSopClass;
    case 0x00080018: return kSopInstance;
    case 0x0020000D: return kStudy;
    case 0x0020000E: return kSeries;
    case 0x00280002: return kSamples;
    case 0x00280004: return kPhotometric;
    case 0x00280008: return kFrames;
    case 0x00280010: return kRows;
    case 0x00280011: return kColumns;
    case 0x00280100: return kBits;
    default: return -1;
  }
}

bool is_us_attribute(int index) {
  return index == kRows || index == kColumns || index == kSamples || index == kBits;
}

bool long_length_vr(const char vr[2]) {
  static const char* const kLong[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                                      "UT", "UV"};
  for (const char* v : kLong)
    if (vr[0] == v[0] && vr[1] == v[1]) return true;
  return false;
}

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\0' || s[b] == '\t' || s[b] == '\r' || s[b] == '\n')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\0' || s[e - 1] == '\t' || s[e - 1] == '\r' ||
                   s[e - 1] == '\n'))
    --e;
  return s.substr(b, e - b);
}

// A peer-controlled value in a reason line: printable ASCII only, bounded, quoted like Python's repr.
std::string printable(const std::string& s) {
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < 80; ++i) out += (s[i] >= 0x20 && s[i] < 0x7F) ? s[i] : '?';
  if (s.size() > 80) out += "...";
  return out + "'";
}

class Scanner {
 public:
  Scanner(Source& src, Syntax syntax, bool check_past_end)
      : src_(src), syntax_(syntax), check_past_end_(check_past_end) {}

  Value values[kWantedCount];
  bool pixel_found = false;
  uint32_t pixel_length = 0;

  // The top-level data set, up to its pixel data (pydicom's read_partial with stop_when).
  void top_level() {
    uint64_t off = 0;
    const uint64_t end = src_.size();
    while (end - off >= 8) {  // pydicom ends a data set quietly on fewer than 8 bytes
      uint32_t tag, length;
      char vr[2] = {0, 0};
      uint64_t value_off = element_header(off, end, syntax_, &tag, vr, &length);
      if ((tag >> 16) == 0xFFFE) throw Refusal{kCannotUnderstand, "unreadable dataset: item tag outside a sequence"};
      if (check_past_end_ && length != kUndefined && value_off + length > end) {
        throw Refusal{kElementPastEnd, "element " + tag_text(tag) + " declares " + std::to_string(length) +
                                           " bytes, only " + std::to_string(end - value_off) + " follow"};
      }
      if (tag == kPixelData) {
        pixel_found = true;
        pixel_length = length;
        return;
      }
      if (tag == kFloatPixelData || tag == kDoubleFloatPixelData) return;
      if (length == kUndefined) {
        off = undefined_length_value(value_off, end, syntax_, vr, 1);
        continue;
      }
      if (value_off + length > end) throw Refusal{kCannotUnderstand, "unreadable dataset: EOFError"};
      int index = wanted_index(tag);
      if (index >= 0) read_value(index, value_off, length, vr);
      off = value_off + length;
    }
  }

 private:
  Source& src_;
  Syntax syntax_;
  bool check_past_end_;

  static std::string tag_text(uint32_t tag) {
    char buf[16];
    snprintf(buf, sizeof buf, "(%04X,%04X)", tag >> 16, tag & 0xFFFF);
    return buf;
  }

  void need(uint64_t off, void* dst, size_t n, uint64_t end) {
    if (off + n > end || !src_.read(off, dst, n)) throw Refusal{kCannotUnderstand, "unreadable dataset: EOFError"};
  }

  uint16_t u16(const uint8_t* p, bool le) const { return le ? uint16_t(p[0] | p[1] << 8) : uint16_t(p[0] << 8 | p[1]); }
  uint32_t u32(const uint8_t* p, bool le) const {
    return le ? uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24
              : uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
  }

  // Reads one element header at off; returns where its value starts.
  uint64_t element_header(uint64_t off, uint64_t end, Syntax sx, uint32_t* tag, char vr[2], uint32_t* length) {
    uint8_t h[12];
    need(off, h, 8, end);
    *tag = uint32_t(u16(h, sx.little_endian)) << 16 | u16(h + 2, sx.little_endian);
    // Items and delimiters carry no VR in any transfer syntax (PS3.5 7.5).
    if (!sx.explicit_vr || (*tag >> 16) == 0xFFFE) {
      *length = u32(h + 4, sx.little_endian);
      return off + 8;
    }
    vr[0] = char(h[4]);
    vr[1] = char(h[5]);
    if (vr[0] < 'A' || vr[0] > 'Z' || vr[1] < 'A' || vr[1] > 'Z')
      throw Refusal{kCannotUnderstand, "unreadable dataset: invalid VR in element " + tag_text(*tag)};
    if (long_length_vr(vr)) {
      need(off + 8, h + 8, 4, end);
      *length = u32(h + 8, sx.little_endian);
      return off + 12;
    }
    *length = u16(h + 6, sx.little_endian);
    return off + 8;
  }

  // An undefined-length value at off (after its header); returns the offset after it.
  uint64_t undefined_length_value(uint64_t off, uint64_t end, Syntax sx, const char vr[2], int depth) {
    bool sequence = !sx.explicit_vr || (vr[0] == 'S' && vr[1] == 'Q');
    if (sx.explicit_vr && vr[0] == 'U' && vr[1] == 'N') {
      // PS3.5 6.2.2: UN of undefined length holds a sequence in Implicit VR Little Endian.
      sequence = true;
      sx = Syntax{false, true};
    }
    if (sequence) return sequence_items(off, end, sx, depth);
    return fragments(off, end, sx);  // encapsulated OB/OW: items of defined length
  }

  uint64_t sequence_items(uint64_t off, uint64_t end, Syntax sx, int depth) {
    if (depth > kMaxNesting) throw Refusal{kNestingTooDeep, "sequences nested too deep"};
    for (;;) {
      uint8_t h[8];
      need(off, h, 8, end);
      uint32_t tag = uint32_t(u16(h, sx.little_endian)) << 16 | u16(h + 2, sx.little_endian);
      uint32_t length = u32(h + 4, sx.little_endian);
      off += 8;
      if (tag == kSequenceDelimitation) return off;
      if (tag != kItem) throw Refusal{kCannotUnderstand, "unreadable dataset: expected an item in a sequence"};
      if (length == kUndefined) {
        off = item_elements(off, end, sx, depth);
      } else {
        if (off + length > end) throw Refusal{kCannotUnderstand, "unreadable dataset: EOFError"};
        off += length;
      }
    }
  }

  // The elements of an undefined-length item, up to its Item Delimitation Item.
  uint64_t item_elements(uint64_t off, uint64_t end, Syntax sx, int depth) {
    for (;;) {
      uint32_t tag, length;
      char vr[2] = {0, 0};
      uint64_t value_off = element_header(off, end, sx, &tag, vr, &length);
      if (tag == kItemDelimitation) return value_off;
      if (length == kUndefined) {
        off = undefined_length_value(value_off, end, sx, vr, depth + 1);
      } else {
        if (value_off + length > end) throw Refusal{kCannotUnderstand, "unreadable dataset: EOFError"};
        off = value_off + length;
      }
    }
  }

  uint64_t fragments(uint64_t off, uint64_t end, Syntax sx) {
    for (;;) {
      uint8_t h[8];
      need(off, h, 8, end);
      uint32_t tag = uint32_t(u16(h, sx.little_endian)) << 16 | u16(h + 2, sx.little_endian);
      uint32_t length = u32(h + 4, sx.little_endian);
      off += 8;
      if (tag == kSequenceDelimitation) return off;
      if (tag != kItem || length == kUndefined || off + length > end)
        throw Refusal{kCannotUnderstand, "unreadable dataset: bad fragment in an undefined-length value"};
      off += length;
    }
  }

  void read_value(int index, uint64_t off, uint32_t length, const char vr[2]) {
    Value& v = values[index];
    v.present = true;
    // The VR decides how pydicom reads it: the explicit one, else the dictionary's (US for the Image
    // Pixel numbers, strings for the rest); UN is replaced by the dictionary VR (pydicom's default).
    bool binary = is_us_attribute(index) &&
                  (!syntax_.explicit_vr || (vr[0] == 'U' && (vr[1] == 'S' || vr[1] == 'N')) ||
                   (vr[0] == 'S' && vr[1] == 'S'));
    if (binary) {
      v.binary = true;
      if (length == 0) {
        v.present = false;  // an empty value: absent for the checks
      } else if (length == 2) {
        uint8_t b[2];
        need(off, b, 2, off + 2);
        v.number = u16(b, syntax_.little_endian);
      } else {
        v.multi = true;
      }
      return;
    }
    if (length > 1024) {  // no UID, CS or IS is this long: refuse as a value that is no UID / number
      v.text = std::string(65, '?');
      v.multi = index == kFrames;
      return;
    }
    std::string raw(length, '\0');
    if (length) need(off, &raw[0], length, off + length);
    v.text = trim(raw);
    if (v.text.empty()) v.present = false;
    if (v.text.find('\\') != std::string::npos) v.multi = true;
  }
};

// pydicom's `_positive_int(value, default)`: absent -> default; not one integer -> none; <= 0 -> none.
struct Int {
  bool ok;
  long value;
};

Int positive_int(const Value& v, bool has_default, long fallback) {
  if (!v.present) return has_default ? Int{true, fallback} : Int{false, 0};
  if (v.multi) return {false, 0};
  long n = v.number;
  if (!v.binary) {
    const std::string& t = v.text;
    char* endp = nullptr;
    errno = 0;
    n = strtol(t.c_str(), &endp, 10);
    if (t.empty() || errno || (endp && *endp != '\0')) return {false, 0};
  }
  return n > 0 ? Int{true, n} : Int{false, 0};
}

bool is_encapsulated(const std::string& ts) {
  return !(ts == "1.2.840.10008.1.2" || ts == "1.2.840.10008.1.2.1" || ts == "1.2.840.10008.1.2.1.99" ||
           ts == "1.2.840.10008.1.2.2");
}

}  // namespace

bool is_valid_uid(const std::string& value) {
  static const std::regex kUid("(0|[1-9][0-9]*)(\\.(0|[1-9][0-9]*))*");
  return value.size() <= 64 && std::regex_match(value, kUid);
}

CheckResult check_dataset(Source& src, const Announced& announced) {
  CheckResult result;
  const std::string& ts = announced.transfer_syntax_uid;
  Syntax syntax{ts != "1.2.840.10008.1.2", ts != "1.2.840.10008.1.2.2"};
  // A deflated data set is read from memory, where pydicom's past-the-end check does not apply.
  bool deflated = ts == "1.2.840.10008.1.2.1.99";
  Scanner scanner(src, syntax, !deflated);
  try {
    scanner.top_level();
  } catch (const Refusal& refusal) {
    result.status = refusal.status;
    result.reason = refusal.reason;
    return result;
  }
  const std::string keywords[4] = {"SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID"};
  const int indexes[4] = {kSopInstance, kSopClass, kSeries, kStudy};
  std::string uids[4];
  for (int i = 0; i < 4; ++i) uids[i] = scanner.values[indexes[i]].present ? scanner.values[indexes[i]].text : "";
  result.sop_instance_uid = uids[0];
  result.sop_class_uid = uids[1];
  result.series_instance_uid = uids[2];
  result.study_instance_uid = uids[3];

  auto refuse = [&](uint16_t status, std::string reason) {
    result.status = status;
    result.reason = std::move(reason);
    return result;
  };
  if (!announced.sop_instance_uid.empty() && !is_valid_uid(announced.sop_instance_uid))
    return refuse(kInvalidSopInstance, "Affected SOP Instance UID is not a valid UID (PS3.5 9.1)");
  for (int i = 0; i < 4; ++i) {
    if (uids[i].empty()) return refuse(kDatasetDoesNotMatch, "missing " + keywords[i]);
    if (!is_valid_uid(uids[i]))
      return refuse(kDatasetDoesNotMatch, keywords[i] + " is not a valid UID (PS3.5 9.1): " + printable(uids[i]));
  }
  if (!announced.sop_instance_uid.empty() && uids[0] != announced.sop_instance_uid)
    return refuse(kSopInstanceMismatch, "data set SOP Instance UID " + uids[0] + " differs from the announced " +
                                            announced.sop_instance_uid);
  if (!announced.sop_class_uid.empty() && uids[1] != announced.sop_class_uid)
    return refuse(kSopClassMismatch,
                  "data set SOP Class UID " + uids[1] + " differs from the announced " + announced.sop_class_uid);
  if (!announced.context_sop_class_uid.empty() && uids[1] != announced.context_sop_class_uid)
    return refuse(kSopClassMismatch, "data set SOP Class UID " + uids[1] +
                                         " differs from the presentation context's " + announced.context_sop_class_uid);

  // Pixel Data shorter than the Image Pixel module says (native transfer syntaxes only).
  if (!scanner.pixel_found || is_encapsulated(ts)) return result;
  if (scanner.pixel_length == kUndefined)
    return refuse(kCannotUnderstand, "Pixel Data of undefined length in a native transfer syntax");
  Int rows = positive_int(scanner.values[kRows], false, 0);
  Int columns = positive_int(scanner.values[kColumns], false, 0);
  Int samples = positive_int(scanner.values[kSamples], true, 1);
  Int bits = positive_int(scanner.values[kBits], false, 0);
  Int frames = positive_int(scanner.values[kFrames], true, 1);
  if (!rows.ok || !columns.ok || !samples.ok || !bits.ok || !frames.ok) return result;
  unsigned __int128 expected = (unsigned __int128)rows.value * columns.value * frames.value * samples.value *
                               bits.value;
  expected = (expected + 7) / 8;
  const Value& photometric = scanner.values[kPhotometric];
  // Native YBR_FULL_422 stores two samples per pixel on average (PS3.3 C.7.6.3.1.2).
  if (photometric.present && photometric.text == "YBR_FULL_422") expected = expected / 3 * 2;
  if (scanner.pixel_length < expected) {
    auto n = [](long v) { return std::to_string(v); };
    unsigned long long shown = expected > (unsigned __int128)UINT64_MAX ? UINT64_MAX : (unsigned long long)expected;
    return refuse(kPixelDataTooShort,
                  "Pixel Data holds " + std::to_string(scanner.pixel_length) +
                      " bytes, Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated/8 = " + n(rows.value) +
                      " x " + n(columns.value) + " x " + n(frames.value) + " x " + n(samples.value) + " x " +
                      n(bits.value) + "/8 needs " + std::to_string(shown));
  }
  return result;
}

}  // namespace ainode
