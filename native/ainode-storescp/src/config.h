// The receiver's settings: a file the node writes from its own config (dicom_ai_node/receive/native.py),
// one "key value..." per line. Nothing here has a default of its own: the node decides every value.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ainode {

// An IPv4 network of an allowed peer (an AE title with no network: any address).
struct Network {
  uint32_t address;  // host byte order
  uint32_t mask;
};

struct AllowedPeer {
  std::string ae_title;
  std::vector<Network> networks;
};

struct Config {
  std::string ae_title;
  std::string bind;
  int port = 0;
  uint32_t max_pdu = 0;
  bool accept_any_called_ae = false;
  bool allow_any_peer = false;
  std::vector<AllowedPeer> peers;
  int max_associations = 0, max_associations_per_ip = 0, max_associations_per_ae = 0;
  double acse_timeout_s = 0, dimse_timeout_s = 0, network_timeout_s = 0;
  double association_setup_timeout_s = 0, pdu_timeout_s = 0;
  double shutdown_grace_s = 0;  // after SIGTERM, associations may go on this long (then A-ABORT)
  uint64_t reserve_bytes = 0;
  std::string landing_dir, incoming_dir;
  std::vector<std::string> sop_classes;        // image storage SOP classes accepted
  std::vector<std::string> transfer_syntaxes;  // in order of preference
  bool reuse_port = false;  // SO_REUSEPORT: several receivers on one port (scale-out)
};

// Parse `path`; false with `error` naming the line on anything unknown or malformed.
bool load_config(const std::string& path, Config* config, std::string* error);

// Whether `calling_ae` from IPv4 `address` (host order) may associate (receive/allowlist.py's rules).
bool peer_allowed(const Config& config, const std::string& calling_ae, uint32_t address);

}  // namespace ainode
