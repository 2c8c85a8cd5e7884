// DCMTK's TCP transport with the node's deadlines (receive/guard.py): a PDU whose header arrived must be
// complete within the PDU timeout, and no read waits longer than the network timeout. DCMTK's own reads
// block until a PDU's declared length has arrived, so without this a peer that sends a few bytes of a
// PDU and stops would hold its association (and its slot) for as long as it likes.
#pragma once

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <chrono>
#include <string>

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmnet/dcmlayer.h"
#include "dcmtk/dcmnet/dcmtrans.h"

namespace ainode {

// Why the last read on this thread gave up (the association thread logs it once the read fails).
inline thread_local std::string t_deadline_missed;

class DeadlineConnection : public DcmTCPConnection {
 public:
  DeadlineConnection(DcmNativeSocketType socket, double network_timeout_s, double pdu_timeout_s)
      : DcmTCPConnection(socket), network_timeout_s_(network_timeout_s), pdu_timeout_s_(pdu_timeout_s) {}

  ssize_t read(void* buf, size_t nbyte) override {
    using Clock = std::chrono::steady_clock;
    const bool in_pdu = phase_ != Phase::kIdle;
    double wait_s = network_timeout_s_;
    if (in_pdu) wait_s = std::min(wait_s, std::chrono::duration<double>(pdu_deadline_ - Clock::now()).count());
    pollfd p{getSocket(), POLLIN, 0};
    int ready;
    do {
      ready = poll(&p, 1, wait_s > 0 ? int(wait_s * 1000) : 0);
    } while (ready < 0 && errno == EINTR);
    if (ready == 0) {
      t_deadline_missed = in_pdu && wait_s < network_timeout_s_
                              ? "PDU incomplete " + seconds(pdu_timeout_s_) + " s after its header"
                              : "no data for " + seconds(network_timeout_s_) + " s";
      errno = ETIMEDOUT;
      return -1;
    }
    ssize_t n = DcmTCPConnection::read(buf, nbyte);
    if (n > 0) track(static_cast<const unsigned char*>(buf), size_t(n));
    return n;
  }

 private:
  enum class Phase { kIdle, kHeader, kBody };

  static std::string seconds(double s) {
    char buf[32];
    snprintf(buf, sizeof buf, "%g", s);
    return buf;
  }

  // Follow PDU boundaries in the byte stream: a 6-byte header (type, reserved, 4-byte length) and its body.
  void track(const unsigned char* p, size_t n) {
    while (n > 0) {
      if (phase_ == Phase::kIdle) {
        phase_ = Phase::kHeader;
        header_have_ = 0;
        pdu_deadline_ = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(pdu_timeout_s_));
      }
      if (phase_ == Phase::kHeader) {
        while (n > 0 && header_have_ < 6) {
          header_[header_have_++] = *p++;
          --n;
        }
        if (header_have_ == 6) {
          body_left_ = uint32_t(header_[2]) << 24 | uint32_t(header_[3]) << 16 | uint32_t(header_[4]) << 8 |
                       uint32_t(header_[5]);
          phase_ = body_left_ ? Phase::kBody : Phase::kIdle;
        }
      } else {
        size_t take = std::min<uint64_t>(body_left_, n);
        body_left_ -= take;
        p += take;
        n -= take;
        if (body_left_ == 0) phase_ = Phase::kIdle;
      }
    }
  }

  double network_timeout_s_, pdu_timeout_s_;
  Phase phase_ = Phase::kIdle;
  unsigned char header_[6] = {0};
  int header_have_ = 0;
  uint64_t body_left_ = 0;
  std::chrono::steady_clock::time_point pdu_deadline_;
};

class DeadlineLayer : public DcmTransportLayer {
 public:
  DeadlineLayer(double network_timeout_s, double pdu_timeout_s)
      : network_timeout_s_(network_timeout_s), pdu_timeout_s_(pdu_timeout_s) {}

  DcmTransportConnection* createConnection(DcmNativeSocketType socket, OFBool use_secure_layer) override {
    if (use_secure_layer) return nullptr;  // no DICOM TLS here: the node refuses that configuration
    return new DeadlineConnection(socket, network_timeout_s_, pdu_timeout_s_);
  }

 private:
  double network_timeout_s_, pdu_timeout_s_;
};

}  // namespace ainode
