// ainode-storescp: the node's native C-STORE edge, on DCMTK's network library (dcmnet).
//
//   ainode-storescp CONFIG_FILE [--parent-pid PID]
//
// Receives C-STORE (and answers C-ECHO) on the node's DICOM port with the node's access rules (called AE,
// calling AE allow-list with IPv4 networks, connection limits in total / per IP / per calling AE, ACSE,
// DIMSE, network and partial-PDU timeouts). Each instance is written exactly as received (DCMTK's File
// Meta Information, then the data set bytes of the wire) to a temp file in the spool's incoming dir,
// checked (scan.h: the receive checks of receive/ingest.py, same statuses), fsynced, renamed into the
// landing dir, and the landing dir fsynced (one fsync for every association waiting: durable.h); only
// then is Success answered. The node (receive/native.py) starts and supervises this process, reads its
// events on stdout (events.h) and indexes landed files into its database (receive/landing.py).
//
// One thread per association; one acceptor (ours, not DCMTK's, so that the node's bind address, limits
// and deadlines apply before DCMTK reads a byte).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "config.h"
#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dcostrmf.h"
#include "dcmtk/dcmnet/assoc.h"
#include "dcmtk/dcmnet/dimse.h"
#include "dcmtk/dcmnet/dul.h"
#include "dcmtk/oflog/oflog.h"
#include "durable.h"
#include "events.h"
#include "scan.h"
#include "transport.h"

using namespace ainode;

namespace {

Config g_config;
T_ASC_Network* g_network = nullptr;
DirectorySync* g_landing_sync = nullptr;
std::atomic<bool> g_stop{false};
// After SIGTERM: when associations still open get an A-ABORT (ms on the steady clock; 0 = not stopping).
std::atomic<long long> g_abort_at_ms{0};

long long now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
std::atomic<int> g_storing{0};  // C-STOREs between command and response (waited for at shutdown)
// dcmExternalSocketHandle is process-global: one ASC_receiveAssociation at a time. Each runs only once
// its A-ASSOCIATE-RQ is wholly buffered (wait_for_associate_rq), so none blocks the others on the network.
std::mutex g_receive_mutex;
constexpr uint32_t kMaxAssociateRqBytes = 64 * 1024;

std::string seconds(double s) {
  char buf[32];
  snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

std::string hex4(unsigned status) {
  char buf[8];
  snprintf(buf, sizeof buf, "0x%04X", status);
  return buf;
}

std::string trim(const char* text) {
  std::string s(text ? text : "");
  size_t b = s.find_first_not_of(' '), e = s.find_last_not_of(' ');
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

// ---- connection limits (receive/guard.py) ------------------------------------------------------------
class Guard {
 public:
  // At TCP accept: false (and the reason) when the address or the node is at its limit.
  bool admit(const std::string& ip, std::string* why) {
    std::lock_guard<std::mutex> lock(mutex_);
    int from_ip = per_ip_[ip];
    if (total_ < g_config.max_associations && from_ip < g_config.max_associations_per_ip) {
      ++total_;
      ++per_ip_[ip];
      return true;
    }
    if (from_ip >= g_config.max_associations_per_ip)
      *why = std::to_string(from_ip) + " open from this address (limit " +
             std::to_string(g_config.max_associations_per_ip) + ")";
    else
      *why = std::to_string(total_) + " open in total (limit " + std::to_string(g_config.max_associations) + ")";
    if (per_ip_[ip] == 0) per_ip_.erase(ip);
    return false;
  }
  void release(const std::string& ip) {
    std::lock_guard<std::mutex> lock(mutex_);
    --total_;
    if (--per_ip_[ip] <= 0) per_ip_.erase(ip);
  }
  // At A-ASSOCIATE-RQ, after the allow-list: false when `ae` already holds its limit.
  bool claim_ae(const std::string& ae, int* held) {
    std::lock_guard<std::mutex> lock(mutex_);
    *held = per_ae_[ae];
    if (*held >= g_config.max_associations_per_ae) return false;
    ++per_ae_[ae];
    return true;
  }
  void release_ae(const std::string& ae) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--per_ae_[ae] <= 0) per_ae_.erase(ae);
  }
  int open() {
    std::lock_guard<std::mutex> lock(mutex_);
    return total_;
  }

 private:
  std::mutex mutex_;
  int total_ = 0;
  std::map<std::string, int> per_ip_, per_ae_;
};
Guard g_guard;

void refused_event(const std::string& ip, const std::string& calling, const std::string& called,
                   const std::string& reason) {
  emit(Json().str("event", "refused").str("address", ip).str("calling_ae", calling).str("called_ae", called)
           .str("reason", reason).done());
}

// Wait until the whole A-ASSOCIATE-RQ is in the socket buffer, at most until `deadline`.
bool wait_for_associate_rq(int fd, std::chrono::steady_clock::time_point deadline, std::string* why) {
  using Clock = std::chrono::steady_clock;
  *why = "no association within " + seconds(g_config.association_setup_timeout_s) + " s of connecting";
  for (;;) {
    int left_ms = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (left_ms <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, left_ms) <= 0) continue;
    unsigned char header[6];
    ssize_t n = recv(fd, header, sizeof header, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
      *why = "closed by the peer before its A-ASSOCIATE-RQ";
      return false;
    }
    if (n == 6) {
      if (header[0] != 0x01) {
        *why = "first PDU is not an A-ASSOCIATE-RQ";
        return false;
      }
      uint32_t length = uint32_t(header[2]) << 24 | uint32_t(header[3]) << 16 | uint32_t(header[4]) << 8 | header[5];
      if (length > kMaxAssociateRqBytes) {
        *why = "A-ASSOCIATE-RQ of " + std::to_string(length) + " bytes (limit " +
               std::to_string(kMaxAssociateRqBytes) + ")";
        return false;
      }
      int available = 0;
      if (ioctl(fd, FIONREAD, &available) == 0 && uint32_t(available) >= length + 6) return true;
    }
    // Part of the PDU is here: poll() would return at once, so wait a little for the rest.
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// ---- one association -----------------------------------------------------------------------------------
struct Landed {
  std::string file, sop_instance_uid, series_instance_uid, study_instance_uid;
};

struct Transfer {
  std::string calling, called, address;
  long long stored = 0, failed = 0, bytes = 0;
  std::map<std::string, long long> statuses;
  std::vector<Landed> landed;
};

void emit_transfer(const Transfer& t, const std::string& ending) {
  if (t.stored + t.failed == 0) return;  // C-ECHO only: no transfer to audit
  std::string statuses = "{", landed = "[";
  for (const auto& [status, count] : t.statuses)
    statuses += (statuses.size() > 1 ? "," : "") + json_string(status) + ":" + std::to_string(count);
  for (const Landed& l : t.landed)
    landed += (landed.size() > 1 ? "," : "") + Json()
                                                   .str("file", l.file)
                                                   .str("sop_instance_uid", l.sop_instance_uid)
                                                   .str("series_instance_uid", l.series_instance_uid)
                                                   .str("study_instance_uid", l.study_instance_uid)
                                                   .done();
  emit(Json()
           .str("event", "association")
           .str("calling_ae", t.calling)
           .str("called_ae", t.called)
           .str("address", t.address)
           .str("ending", ending)
           .num("stored", t.stored)
           .num("failed", t.failed)
           .num("bytes", t.bytes)
           .raw("statuses", statuses + "}")
           .raw("landed", landed + "]")
           .done());
}

// DIMSE progress callback: every 256 KiB received, push the stream's buffer to the kernel and ask it to
// start writing those pages (sync_file_range does not wait; the fsync later does).
struct EarlyWriteback {
  DcmOutputFileStream* stream;
  int fd;
  unsigned long started;  // bytes of the data set whose writeback has been started

  static void progress(void* context, unsigned long received) {
    auto* self = static_cast<EarlyWriteback*>(context);
    if (self->fd < 0 || received - self->started < (256ul << 10)) return;
    self->stream->flush();
    sync_file_range(self->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    self->started = received;
  }
};

struct StoreOutcome {
  uint16_t status = kSuccess;
  bool abort = false;  // the association cannot go on (network failure, peer gone)
  std::string file;
  long long bytes = 0;
  std::string transfer_syntax_uid;
  CheckResult check;
};

// Receive the data set of one C-STORE into a landed file (or refuse it); the response is the caller's.
StoreOutcome store(T_ASC_Association* assoc, T_ASC_PresentationContextID pres_id, const T_DIMSE_C_StoreRQ& req,
                   const std::string& peer, const std::string& shard) {
  StoreOutcome out;
  T_ASC_PresentationContext context;
  ASC_findAcceptedPresentationContext(assoc->params, pres_id, &context);
  Announced announced{trim(req.AffectedSOPClassUID), trim(req.AffectedSOPInstanceUID), context.abstractSyntax,
                      context.acceptedTransferSyntax};
  const std::string named = announced.sop_instance_uid.empty() ? "?" : announced.sop_instance_uid;
  out.transfer_syntax_uid = announced.transfer_syntax_uid;
  const int dimse_timeout = std::max(1, int(std::ceil(g_config.dimse_timeout_s)));
  auto ignore_dataset = [&]() {
    DIC_UL bytes = 0, pdvs = 0;
    if (DIMSE_ignoreDataSet(assoc, DIMSE_NONBLOCKING, dimse_timeout, &bytes, &pdvs).bad()) out.abort = true;
  };
  if (free_bytes(g_config.landing_dir) <= g_config.reserve_bytes) {
    log(Level::kError, "refusing SOP " + named + " from " + peer + ": spool disk under its reserve");
    ignore_dataset();
    out.status = kOutOfResources;
    return out;
  }
  // Random like every spool name, but the first two hex digits (the spool's shard directory,
  // instances/<2 hex>/) are the association's: the node's indexer then syncs one directory per
  // association and batch, not one per instance.
  const std::string name = shard + new_name().substr(2);
  // The process id in the name: after a crash the node removes this receiver's leftovers only (other
  // receivers may share the spool).
  const std::string temp = g_config.incoming_dir + "/native-" + std::to_string(getpid()) + "-" + name + ".part";
  const std::string landed = g_config.landing_dir + "/" + name + ".dcm";
  DcmOutputFileStream* stream = nullptr;
  if (DIMSE_createFilestream(temp.c_str(), &req, assoc, pres_id, OFTrue, &stream).bad() || stream == nullptr) {
    log(Level::kError, "cannot spool SOP " + named + " from " + peer + ": cannot create a temp file");
    delete stream;
    unlink(temp.c_str());
    ignore_dataset();
    out.status = kOutOfResources;
    return out;
  }
  const uint64_t dataset_start = uint64_t(stream->tell());
  // Start writing the data to disk while the rest of it still arrives, so the fsync before the response
  // waits only for the tail (the sender waits for that response before it sends the next instance).
  EarlyWriteback writeback{stream, open(temp.c_str(), O_RDONLY | O_CLOEXEC), 0};
  T_ASC_PresentationContextID data_pres_id = 0;
  OFCondition cond = DIMSE_receiveDataSetInFile(assoc, DIMSE_NONBLOCKING, dimse_timeout, &data_pres_id, stream,
                                                EarlyWriteback::progress, &writeback);
  stream->flush();
  const bool written = stream->good();
  delete stream;
  if (writeback.fd >= 0) close(writeback.fd);
  if (cond.bad() || data_pres_id != pres_id) {
    unlink(temp.c_str());
    if (cond.bad() && cond.code() == DIMSEC_OUTOFRESOURCES) {  // write failed; the rest was read and dropped
      log(Level::kError, "cannot spool SOP " + named + " from " + peer + ": cannot write to the spool");
      out.status = kOutOfResources;
    } else {
      log(Level::kWarning, "C-STORE of SOP " + named + " from " + peer + " not completed: " +
                               (t_deadline_missed.empty() ? std::string(cond.text()) : t_deadline_missed));
      out.abort = true;
    }
    return out;
  }
  int fd = open(temp.c_str(), O_RDONLY | O_CLOEXEC);
  struct stat st;
  if (!written || fd < 0 || fstat(fd, &st) != 0) {
    if (fd >= 0) close(fd);
    unlink(temp.c_str());
    log(Level::kError, "cannot spool SOP " + named + " from " + peer + ": cannot write to the spool");
    out.status = kOutOfResources;
    return out;
  }
  out.bytes = st.st_size;
  if (announced.transfer_syntax_uid == "1.2.840.10008.1.2.1.99") {
    std::string inflated, why;
    if (!inflate_dataset(fd, dataset_start, uint64_t(st.st_size), &inflated, &why)) {
      out.check.status = kCannotUnderstand;
      out.check.reason = why;
    } else {
      MemorySource source(std::move(inflated));
      out.check = check_dataset(source, announced);
    }
  } else {
    FileSource source(fd, dataset_start, uint64_t(st.st_size));
    out.check = check_dataset(source, announced);
  }
  if (out.check.status != kSuccess) {
    close(fd);
    unlink(temp.c_str());
    const bool header_refusal = out.check.status >= 0xC210 && out.check.status <= 0xC213;
    const std::string who = !announced.sop_instance_uid.empty() ? announced.sop_instance_uid
                            : (!header_refusal && !out.check.sop_instance_uid.empty()) ? out.check.sop_instance_uid
                                                                                          : "?";
    log(Level::kWarning, "rejected SOP " + who + " from " + peer + " with " + hex4(out.check.status) + ": " +
                             out.check.reason);
    out.status = out.check.status;
    return out;
  }
  // The durable write: data, then the name, then the directory that holds the name.
  const bool synced = fsync(fd) == 0;
  close(fd);
  if (!synced || rename(temp.c_str(), landed.c_str()) != 0) {
    unlink(temp.c_str());
    log(Level::kError, "cannot spool SOP " + out.check.sop_instance_uid + " from " + peer +
                           ": cannot store file in spool: " + strerror(errno));
    out.status = kOutOfResources;
    return out;
  }
  if (!g_landing_sync->sync()) {
    // Not acknowledged, but landed: the node indexes it; a retried send is then kept once.
    log(Level::kError, "cannot spool SOP " + out.check.sop_instance_uid + " from " + peer +
                           ": directory sync failed");
    out.status = kOutOfResources;
    out.file = name;
    return out;
  }
  out.file = name;
  return out;
}

void serve_association(T_ASC_Association* assoc, const std::string& calling, const std::string& ip) {
  Transfer transfer;
  transfer.calling = calling;
  transfer.called = trim(assoc->params->DULparams.calledAPTitle);
  transfer.address = ip;
  const std::string peer = calling + " (" + ip + ")";
  const std::string shard = new_name().substr(0, 2);
  std::string ending = "closed";
  const auto network_timeout = std::chrono::duration<double>(g_config.network_timeout_s);
  auto idle_since = std::chrono::steady_clock::now();
  for (;;) {
    T_DIMSE_Message msg;
    T_ASC_PresentationContextID pres_id = 0;
    t_deadline_missed.clear();
    // One-second waits, so a stopping node ends idle associations promptly.
    OFCondition cond = DIMSE_receiveCommand(assoc, DIMSE_NONBLOCKING, 1, &pres_id, &msg, nullptr);
    if (cond == DIMSE_NODATAAVAILABLE) {
      const long long abort_at = g_abort_at_ms;
      if (abort_at != 0 && now_ms() >= abort_at) {
        ASC_abortAssociation(assoc);
        ending = "aborted";
        break;
      }
      if (std::chrono::steady_clock::now() - idle_since > network_timeout) {
        log_limited(ip + " idle", "DICOM connection from " + ip + " closed: no data for " +
                                      seconds(g_config.network_timeout_s) + " s");
        ASC_abortAssociation(assoc);
        ending = "aborted";
        break;
      }
      continue;
    }
    if (cond == DUL_PEERREQUESTEDRELEASE) {
      ASC_acknowledgeRelease(assoc);
      ending = "released";
      break;
    }
    if (cond == DUL_PEERABORTEDASSOCIATION) {
      ending = "aborted";
      break;
    }
    if (cond.bad()) {
      if (!t_deadline_missed.empty())
        log_limited(ip + " deadline", "DICOM connection from " + ip + " closed: " + t_deadline_missed);
      else
        log(Level::kWarning, "association from " + peer + " ended: " + std::string(cond.text()));
      ASC_abortAssociation(assoc);
      ending = "aborted";
      break;
    }
    idle_since = std::chrono::steady_clock::now();
    if (msg.CommandField == DIMSE_C_ECHO_RQ) {
      DIMSE_sendEchoResponse(assoc, pres_id, &msg.msg.CEchoRQ, STATUS_Success, nullptr);
      continue;
    }
    if (msg.CommandField != DIMSE_C_STORE_RQ) {
      log(Level::kWarning, "association from " + peer + " aborted: unsupported DIMSE command " +
                               hex4(msg.CommandField));
      ASC_abortAssociation(assoc);
      ending = "aborted";
      break;
    }
    const T_DIMSE_C_StoreRQ& req = msg.msg.CStoreRQ;
    ++g_storing;
    StoreOutcome out = store(assoc, pres_id, req, peer, shard);
    if (out.abort) {
      --g_storing;
      ASC_abortAssociation(assoc);
      ending = "aborted";
      break;
    }
    T_DIMSE_C_StoreRSP rsp;
    memset(&rsp, 0, sizeof rsp);
    rsp.MessageIDBeingRespondedTo = req.MessageID;
    rsp.DimseStatus = out.status;
    rsp.DataSetType = DIMSE_DATASET_NULL;
    OFStandard::strlcpy(rsp.AffectedSOPClassUID, req.AffectedSOPClassUID, sizeof rsp.AffectedSOPClassUID);
    OFStandard::strlcpy(rsp.AffectedSOPInstanceUID, req.AffectedSOPInstanceUID, sizeof rsp.AffectedSOPInstanceUID);
    rsp.opts = O_STORE_AFFECTEDSOPCLASSUID | O_STORE_AFFECTEDSOPINSTANCEUID;
    // The file is landed (durable) before the response; the node indexes it whatever happens next.
    // One event per C-STORE answered; a landed file's carries what the checks read, so the node need not
    // read the file again (receive/landing.py).
    Json event;
    event.str("event", "store").num("status", out.status).num("bytes", out.status == kSuccess ? out.bytes : 0);
    if (!out.file.empty())
      event.str("file", out.file)
          .str("sop_instance_uid", out.check.sop_instance_uid)
          .str("sop_class_uid", out.check.sop_class_uid)
          .str("series_instance_uid", out.check.series_instance_uid)
          .str("study_instance_uid", out.check.study_instance_uid)
          .str("transfer_syntax_uid", out.transfer_syntax_uid)
          .str("calling_ae", calling);
    emit(event.done());
    OFCondition sent = DIMSE_sendStoreResponse(assoc, pres_id, &req, &rsp, nullptr);
    --g_storing;
    transfer.statuses[hex4(out.status)] += 1;
    if (out.status == kSuccess) {
      ++transfer.stored;
      transfer.bytes += out.bytes;
      transfer.landed.push_back(Landed{out.file, out.check.sop_instance_uid, out.check.series_instance_uid,
                                       out.check.study_instance_uid});
    } else {
      ++transfer.failed;
    }
    if (sent.bad()) {
      ASC_abortAssociation(assoc);
      ending = "aborted";
      break;
    }
  }
  // TODO(series-complete-on-release): the node signals the released association's series complete once
  // their landed files are indexed (receive/native.py, NativeReceiver._on_association).
  emit_transfer(transfer, ending);
}

void accept_contexts(T_ASC_Parameters* params) {
  std::vector<const char*> classes, syntaxes;
  for (const std::string& s : g_config.sop_classes) classes.push_back(s.c_str());
  for (const std::string& s : g_config.transfer_syntaxes) syntaxes.push_back(s.c_str());
  const char* verification[] = {UID_VerificationSOPClass};
  const char* verification_syntaxes[] = {UID_LittleEndianExplicitTransferSyntax, UID_LittleEndianImplicitTransferSyntax};
  ASC_acceptContextsWithPreferredTransferSyntaxes(params, verification, 1, verification_syntaxes, 2);
  ASC_acceptContextsWithPreferredTransferSyntaxes(params, classes.data(), int(classes.size()), syntaxes.data(),
                                                  int(syntaxes.size()));
}

void reject(T_ASC_Association* assoc, T_ASC_RejectParametersResult result, T_ASC_RejectParametersSource source,
            T_ASC_RejectParametersReason reason) {
  T_ASC_RejectParameters rej = {result, source, reason};
  ASC_rejectAssociation(assoc, &rej);
}

void serve_connection(int fd, std::string ip, uint32_t address) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(long(g_config.association_setup_timeout_s * 1000));
  std::string why;
  if (!wait_for_associate_rq(fd, deadline, &why)) {
    log_limited(ip + " setup", "DICOM connection from " + ip + " closed: " + why);
    refused_event(ip, "", "", why);
    close(fd);
    g_guard.release(ip);
    return;
  }
  T_ASC_Association* assoc = nullptr;
  OFCondition cond;
  {
    std::lock_guard<std::mutex> lock(g_receive_mutex);
    dcmExternalSocketHandle.set(fd);
    cond = ASC_receiveAssociation(g_network, &assoc, long(g_config.max_pdu), nullptr, nullptr, OFFalse, DUL_NOBLOCK,
                                  std::max(1, int(std::ceil(g_config.acse_timeout_s))));
    dcmExternalSocketHandle.set(-1);
  }
  if (cond.bad() || assoc == nullptr) {
    log_limited(ip + " setup", "DICOM connection from " + ip + " closed: " + std::string(cond.text()));
    if (assoc) {
      ASC_dropAssociation(assoc);
      ASC_destroyAssociation(&assoc);
    }
    g_guard.release(ip);
    return;
  }
  const std::string calling = trim(assoc->params->DULparams.callingAPTitle);
  const std::string called = trim(assoc->params->DULparams.calledAPTitle);
  bool claimed = false;
  if (!g_config.accept_any_called_ae && called != g_config.ae_title) {
    log(Level::kWarning, "association rejected: called AE " + ae_text(called) + " is not this node's " +
                             ae_text(g_config.ae_title) + " (calling AE " + ae_text(calling) + " from " + ip + ")");
    refused_event(ip, calling, called, "called AE title is not this node's");
    reject(assoc, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER, ASC_REASON_SU_CALLEDAETITLENOTRECOGNIZED);
  } else if (!peer_allowed(g_config, calling, address)) {
    log(Level::kWarning, "association rejected: calling AE " + ae_text(calling) + " from " + ip + " is not allowed");
    refused_event(ip, calling, called, "calling AE not allowed");
    reject(assoc, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER, ASC_REASON_SU_CALLINGAETITLENOTRECOGNIZED);
  } else {
    int held = 0;
    claimed = g_guard.claim_ae(calling, &held);
    if (!claimed) {
      log_limited(ip + " ae", "association from " + ip + " rejected: calling AE " + ae_text(calling) + " holds " +
                                  std::to_string(held) + " associations (limit " +
                                  std::to_string(g_config.max_associations_per_ae) + ")");
      refused_event(ip, calling, called, "calling AE at its association limit");
      reject(assoc, ASC_RESULT_REJECTEDTRANSIENT, ASC_SOURCE_SERVICEPROVIDER_PRESENTATION_RELATED,
             ASC_REASON_SP_PRES_LOCALLIMITEXCEEDED);
    } else {
      accept_contexts(assoc->params);
      if (ASC_acknowledgeAssociation(assoc).good()) serve_association(assoc, calling, ip);
      g_guard.release_ae(calling);
    }
  }
  ASC_dropAssociation(assoc);
  ASC_destroyAssociation(&assoc);
  g_guard.release(ip);
}

int listen_socket(std::string* error) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int on = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  if (g_config.reuse_port) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on);
  sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_port = htons(uint16_t(g_config.port));
  const std::string bind_to = g_config.bind == "localhost" ? "127.0.0.1" : g_config.bind;
  if (bind_to.empty() || bind_to == "0.0.0.0") {
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
  } else if (inet_pton(AF_INET, bind_to.c_str(), &addr.sin_addr) != 1) {
    *error = "not an IPv4 address: " + g_config.bind;
    close(fd);
    return -1;
  }
  // The same backlog as the Python listener (receive/server.py): a burst must not drop SYNs.
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(fd, 128) != 0) {
    *error = strerror(errno);
    emit(Json().str("event", "error").num("errno", errno).str("message", *error).done());
    close(fd);
    return -1;
  }
  return fd;
}

std::atomic<bool> g_no_grace{false};
// SIGTERM: stop with the grace period; SIGQUIT/SIGINT: stop now (in-flight C-STOREs still finish).
void on_signal(int signo) {
  if (signo != SIGTERM) g_no_grace = true;
  g_stop = true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s CONFIG_FILE [--parent-pid PID]\n", argv[0]);
    return 2;
  }
  if (argc >= 4 && std::string(argv[2]) == "--parent-pid") {
    // Ends with the node even when the node is killed (kill -9): the port must be free for its restart.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != pid_t(atol(argv[3]))) return 0;
  }
  std::string error;
  if (!load_config(argv[1], &g_config, &error)) {
    log(Level::kError, "configuration: " + error);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  signal(SIGTERM, on_signal);
  signal(SIGINT, on_signal);
  signal(SIGQUIT, on_signal);
  OFLog::configure(OFLogger::ERROR_LOG_LEVEL);
  dcmDisableGethostbyaddr.set(OFTrue);  // addresses, never reverse DNS (slow, and names are not access control)
  dcmSocketReceiveTimeout.set(Sint32(std::ceil(g_config.network_timeout_s)));
  // DCMTK receives PDUs of at most 128 KiB (ASC_MAXIMUMPDUSIZE); 0 (unlimited) means that too.
  if (g_config.max_pdu == 0 || g_config.max_pdu > ASC_MAXIMUMPDUSIZE) g_config.max_pdu = ASC_MAXIMUMPDUSIZE;
  if (g_config.max_pdu < ASC_MINIMUMPDUSIZE) g_config.max_pdu = ASC_MINIMUMPDUSIZE;

  int listen_fd = listen_socket(&error);
  if (listen_fd < 0) {
    log(Level::kError, "cannot listen on " + g_config.bind + ":" + std::to_string(g_config.port) + ": " + error);
    flush_events();
    return 3;
  }
  // DCMTK must not open a listener of its own (it would bind every address): a socket handle set while
  // the network is initialised tells it one exists; each association then hands DCMTK its own socket.
  dcmExternalSocketHandle.set(listen_fd);
  OFCondition cond = ASC_initializeNetwork(NET_ACCEPTOR, 0, std::max(1, int(std::ceil(g_config.acse_timeout_s))),
                                           &g_network);
  dcmExternalSocketHandle.set(-1);
  if (cond.bad()) {
    log(Level::kError, std::string("cannot initialise the DICOM network: ") + cond.text());
    return 3;
  }
  ASC_setTransportLayer(g_network, new DeadlineLayer(g_config.network_timeout_s, g_config.pdu_timeout_s), 1);
  g_landing_sync = new DirectorySync(g_config.landing_dir);
  sockaddr_in bound;
  socklen_t bound_len = sizeof bound;
  getsockname(listen_fd, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  emit(Json().str("event", "listening").num("port", ntohs(bound.sin_port)).done());
  log(Level::kInfo, "native DICOM SCP " + g_config.ae_title + " listening on " + g_config.bind + ":" +
                        std::to_string(ntohs(bound.sin_port)));

  while (!g_stop) {
    pollfd p{listen_fd, POLLIN, 0};
    if (poll(&p, 1, 250) <= 0) continue;
    sockaddr_in from;
    socklen_t from_len = sizeof from;
    int fd = accept4(listen_fd, reinterpret_cast<sockaddr*>(&from), &from_len, SOCK_CLOEXEC);
    if (fd < 0) {
      // Out of descriptors (or a connection reset before accept): do not spin on a readable listener.
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    char text[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &from.sin_addr, text, sizeof text);
    const std::string ip = text;
    std::string why;
    if (!g_guard.admit(ip, &why)) {
      log_limited(ip + " limit", "DICOM connection from " + ip + " refused: " + why);
      refused_event(ip, "", "", "connection limit: " + why);
      close(fd);
      continue;
    }
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);  // no 40 ms stall per C-STORE response
    std::thread(serve_connection, fd, ip, ntohl(from.sin_addr.s_addr)).detach();
  }
  // Stopping: the port closes at once; open associations may go on for the grace period (as the Python
  // SCP's dicom.shutdown_grace_s), then get an A-ABORT when idle; a C-STORE in flight still finishes its
  // durable write and response (5 s more at most).
  close(listen_fd);
  g_abort_at_ms = now_ms() + (g_no_grace ? 1 : (long long)(g_config.shutdown_grace_s * 1000));
  const long long give_up = g_abort_at_ms + 5000;
  while ((g_storing > 0 || g_guard.open() > 0) && now_ms() < give_up)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  flush_events();
  log(Level::kInfo, "native DICOM SCP stopped");
  // Threads may still run (the event writer always does): exit without running static destructors
  // under them (a condition variable destroyed while a thread waits on it blocks in glibc).
  fflush(stdout);
  fflush(stderr);
  _exit(0);
}
