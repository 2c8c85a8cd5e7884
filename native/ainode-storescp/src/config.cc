#include "config.h"

#include <arpa/inet.h>

#include <fstream>
#include <sstream>

namespace ainode {
namespace {

bool parse_network(const std::string& text, Network* net) {
  std::string host = text;
  int bits = 32;
  size_t slash = text.find('/');
  if (slash != std::string::npos) {
    host = text.substr(0, slash);
    try {
      bits = std::stoi(text.substr(slash + 1));
    } catch (...) {
      return false;
    }
    if (bits < 0 || bits > 32) return false;
  }
  in_addr addr;
  if (inet_pton(AF_INET, host.c_str(), &addr) != 1) return false;
  net->mask = bits == 0 ? 0 : ~uint32_t(0) << (32 - bits);
  net->address = ntohl(addr.s_addr) & net->mask;
  return true;
}

}  // namespace

bool load_config(const std::string& path, Config* c, std::string* error) {
  std::ifstream in(path);
  if (!in) {
    *error = "cannot read " + path;
    return false;
  }
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.empty() || line[0] == '#') continue;
    std::istringstream words(line);
    std::string key;
    words >> key;
    auto fail = [&](const std::string& why) {
      *error = path + ":" + std::to_string(number) + ": " + why;
      return false;
    };
    // AE titles may hold spaces inside: they come last on their line, as the rest of it.
    auto rest = [&]() {
      std::string r;
      std::getline(words >> std::ws, r);
      return r;
    };
    try {
      if (key == "ae_title") c->ae_title = rest();
      else if (key == "bind") words >> c->bind;
      else if (key == "port") words >> c->port;
      else if (key == "max_pdu") words >> c->max_pdu;
      else if (key == "accept_any_called_ae") words >> c->accept_any_called_ae;
      else if (key == "allow_any_peer") words >> c->allow_any_peer;
      else if (key == "max_associations") words >> c->max_associations;
      else if (key == "max_associations_per_ip") words >> c->max_associations_per_ip;
      else if (key == "max_associations_per_ae") words >> c->max_associations_per_ae;
      else if (key == "acse_timeout_s") words >> c->acse_timeout_s;
      else if (key == "dimse_timeout_s") words >> c->dimse_timeout_s;
      else if (key == "network_timeout_s") words >> c->network_timeout_s;
      else if (key == "association_setup_timeout_s") words >> c->association_setup_timeout_s;
      else if (key == "pdu_timeout_s") words >> c->pdu_timeout_s;
      else if (key == "shutdown_grace_s") words >> c->shutdown_grace_s;
      else if (key == "reserve_bytes") words >> c->reserve_bytes;
      else if (key == "landing_dir") c->landing_dir = rest();
      else if (key == "incoming_dir") c->incoming_dir = rest();
      else if (key == "sop_class") c->sop_classes.push_back(rest());
      else if (key == "transfer_syntax") c->transfer_syntaxes.push_back(rest());
      else if (key == "reuse_port") words >> c->reuse_port;
      else if (key == "peer") {
        // peer <n networks> <network>... <AE title>
        int count = 0;
        words >> count;
        AllowedPeer peer;
        for (int i = 0; i < count; ++i) {
          std::string text;
          words >> text;
          Network net;
          if (!parse_network(text, &net)) return fail("not an IPv4 network: " + text);
          peer.networks.push_back(net);
        }
        peer.ae_title = rest();
        c->peers.push_back(peer);
      } else {
        return fail("unknown key " + key);
      }
    } catch (...) {
      return fail("malformed value");
    }
    if (words.fail() && !words.eof()) return fail("malformed value for " + key);
  }
  if (c->ae_title.empty() || c->port <= 0 || c->landing_dir.empty() || c->incoming_dir.empty() ||
      c->sop_classes.empty() || c->transfer_syntaxes.empty() || c->max_associations <= 0) {
    *error = path + ": ae_title, port, landing_dir, incoming_dir, sop_class, transfer_syntax and limits are required";
    return false;
  }
  return true;
}

bool peer_allowed(const Config& c, const std::string& calling_ae, uint32_t address) {
  if (c.allow_any_peer) return true;
  for (const AllowedPeer& peer : c.peers) {
    if (peer.ae_title != calling_ae) continue;
    if (peer.networks.empty()) return true;
    for (const Network& net : peer.networks)
      if ((address & net.mask) == net.address) return true;
  }
  return false;
}

}  // namespace ainode
