#include "remote_store.h"

#include <cstdlib>
#include <deque>
#include <future>
#include <thread>

#include <spdlog/spdlog.h>

namespace kvf::daemon {
namespace {

// Peer requests' client ids for the store: far above the engines' (which count up from 1), so a
// peer's leases are never dropped with an engine's connection.
constexpr uint64_t kPeerClientBase = uint64_t{1} << 63;
constexpr uint64_t kArenaRegionId = 1;
// A fetch by put goes in pushes of about this many bytes (see fetch).
constexpr uint64_t kPushBatchBytes = 32ull << 20;
constexpr size_t kPushesInFlight = 2;

std::string to_hex(std::span<const uint8_t> bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (uint8_t b : bytes) {
    out.push_back(digits[b >> 4]);
    out.push_back(digits[b & 15]);
  }
  return out;
}

Result<std::vector<uint8_t>> from_hex(const std::string& hex) {
  if (hex.size() % 2 != 0) return Status(ErrorCode::kMalformed, "odd-length hex string");
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    const int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return Status(ErrorCode::kMalformed, "not a hex string");
    out[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return out;
}

nlohmann::json keys_json(const std::vector<protocol::ChunkKey>& keys) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& k : keys) out.push_back(k.to_hex());
  return out;
}

// The "keys" array of a request. Throws nothing: bad input is a kMalformed value.
Result<std::vector<protocol::ChunkKey>> keys_of(const nlohmann::json& request, const char* field = "keys") {
  auto it = request.find(field);
  if (it == request.end() || !it->is_array()) {
    return Status(ErrorCode::kMalformed, std::string("\"") + field + "\" must be an array of chunk keys");
  }
  std::vector<protocol::ChunkKey> keys;
  for (const auto& k : *it) {
    if (!k.is_string())
      return Status(ErrorCode::kMalformed, std::string("\"") + field + "\" holds a non-string");
    auto key = protocol::ChunkKey::from_hex(k.get<std::string>());
    if (!key.ok()) return key.status();
    keys.push_back(key.value());
  }
  return keys;
}

uint64_t u64_of(const nlohmann::json& j, const char* field, bool& ok) {
  auto it = j.find(field);
  if (it == j.end() || !it->is_number_unsigned()) {
    ok = false;
    return 0;
  }
  return it->get<uint64_t>();
}

// While alive, keeps a transport's progress thread polling: a target of one-sided tcp puts gets
// no wake-up for them and would otherwise look only every max_sleep (measured: fetches at a third
// of the link rate). A task every 200 us counts as activity, so the thread spins meanwhile.
class KeepPolling {
 public:
  explicit KeepPolling(fabric::Transport& transport) : alive_(std::make_shared<std::atomic<bool>>(true)) {
    tick(transport, alive_);
  }
  ~KeepPolling() { alive_->store(false); }
  KeepPolling(const KeepPolling&) = delete;
  KeepPolling& operator=(const KeepPolling&) = delete;

 private:
  static void tick(fabric::Transport& transport, std::shared_ptr<std::atomic<bool>> alive) {
    transport.post_after(std::chrono::microseconds(200), [&transport, alive] {
      if (alive->load()) tick(transport, alive);
    });
  }
  std::shared_ptr<std::atomic<bool>> alive_;
};

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

Result<std::unique_ptr<RemoteStore>> RemoteStore::create(std::shared_ptr<gpudirect::UcxContext> ucx,
                                                         const fabric::Topology& topology,
                                                         store::ChunkStore& store,
                                                         RemoteStoreOptions options) {
  const fabric::NodeSpec* self = topology.find_node(options.node);
  if (self == nullptr)
    return Status(ErrorCode::kInvalidArgument, "no node '" + options.node + "' in the topology");
  if (!store.arena().registered()) {
    return Status(ErrorCode::kInvalidArgument,
                  "the store's arena is not registered with UCX: peers could not read it");
  }
  auto transport = fabric::UcxTransport::create(ucx, options.ucx);
  if (!transport.ok()) return transport.status();
  std::unique_ptr<RemoteStore> remote(
      new RemoteStore(std::move(ucx), topology, store, std::move(options), std::move(transport.value())));
  const std::string host =
      remote->options_.listen_host.empty() ? self->address : remote->options_.listen_host;
  const uint16_t port = remote->options_.listen_port.value_or(self->control_port);
  auto server =
      PeerServer::start(host, port, [r = remote.get()](const nlohmann::json& q) { return r->handle(q); });
  if (!server.ok()) return server.status();
  remote->server_ = std::move(server.value());
  return remote;
}

RemoteStore::RemoteStore(std::shared_ptr<gpudirect::UcxContext> ucx, const fabric::Topology& topology,
                         store::ChunkStore& store, RemoteStoreOptions options,
                         std::unique_ptr<fabric::UcxTransport> transport)
    : ucx_(std::move(ucx)),
      topology_(topology),
      store_(store),
      options_(std::move(options)),
      transport_(std::move(transport)) {}

RemoteStore::~RemoteStore() {
  server_.reset();  // no peer request runs after this
  {
    std::lock_guard lock(links_mutex_);
    for (auto& [name, link] : links_) {
      if (link->connected) transport_->disconnect(link->peer);
    }
  }
  transport_.reset();
}

uint16_t RemoteStore::port() const {
  return server_->port();
}

const fabric::NodeSpec* RemoteStore::node_named(const std::string& name, Status& error) const {
  const fabric::NodeSpec* n = topology_.find_node(name);
  if (n == nullptr) error = Status(ErrorCode::kInvalidArgument, "no node '" + name + "' in the topology");
  return n;
}

RemoteStore::Link& RemoteStore::link_for(const std::string& node) {
  std::lock_guard lock(links_mutex_);
  auto& slot = links_[node];
  if (!slot) slot = std::make_unique<Link>();
  return *slot;
}

Result<nlohmann::json> RemoteStore::ask(const fabric::NodeSpec& node, nlohmann::json request,
                                        std::chrono::milliseconds deadline) const {
  request["to"] = node.name;  // the peer refuses a request meant for another node
  return peer_request(node.address, node.control_port, request, deadline);
}

// --- serving peers ------------------------------------------------------------------------------

nlohmann::json RemoteStore::handle(const nlohmann::json& request) {
  const std::string op = request["op"].get<std::string>();
  if (auto to = request.find("to"); to != request.end() && (!to->is_string() || *to != options_.node)) {
    // Two nodes of the topology share an address and control_port, or a stale topology.
    return peer_error(Status(ErrorCode::kInvalidArgument,
                             "this is node '" + options_.node + "', not " + to->dump() +
                                 " (does the topology give two nodes the same address and control_port?)"));
  }
  if (op == "lookup") {
    auto keys = keys_of(request);
    if (!keys.ok()) return peer_error(keys.status());
    return {{"node", options_.node}, {"matched", keys->empty() ? 0 : store_.lookup(keys.value())}};
  }
  if (op == "grant") return grant(request);
  if (op == "release") return release(request);
  if (op == "push") return push(request);
  if (op == "drop") {
    auto keys = keys_of(request);
    if (!keys.ok()) return peer_error(keys.status());
    const store::ClearResult r = store_.clear(keys.value());
    return {{"removed", r.removed}, {"bytes", r.bytes}};
  }
  if (op == "pull") {  // a move whose destination is this node
    auto keys = keys_of(request);
    if (!keys.ok()) return peer_error(keys.status());
    if (!request.contains("from") || !request["from"].is_string()) {
      return peer_error(Status(ErrorCode::kMalformed, "\"from\" must be a node name"));
    }
    const bool copy = request.value("copy", false);
    auto r = move(request["from"].get<std::string>(), options_.node, keys.value(), copy);
    if (!r.ok()) return peer_error(r.status());
    return {{"fetched", r->fetched},
            {"already_here", r->already_here},
            {"bytes", r->bytes},
            {"not_found", keys_json(r->not_found)},
            {"seconds", r->seconds}};
  }
  return peer_error(Status(ErrorCode::kInvalidArgument,
                           "unknown peer op '" + op + "' (lookup, grant, release, push, drop, pull)"));
}

nlohmann::json RemoteStore::grant(const nlohmann::json& request) {
  auto keys = keys_of(request);
  if (!keys.ok()) return peer_error(keys.status());
  const uint64_t client = kPeerClientBase | next_client_.fetch_add(1);
  const auto now = std::chrono::steady_clock::now();
  {
    std::lock_guard lock(grants_mutex_);
    for (auto it = grants_.begin(); it != grants_.end();) {
      if (now - it->second.granted > 2 * options_.deadline) {
        (void)store_.release(it->first);  // the peer never pushed nor released: it is gone
        it = grants_.erase(it);
      } else {
        ++it;
      }
    }
  }
  nlohmann::json entries = nlohmann::json::array();
  nlohmann::json missing = nlohmann::json::array();
  for (const auto& key : keys.value()) {
    auto lease = store_.acquire(key, client);
    if (!lease.ok()) {
      if (lease.status().code() != ErrorCode::kNotFound) {
        store_.drop_client(client);
        return peer_error(lease.status());
      }
      missing.push_back(key.to_hex());
      continue;
    }
    {
      std::lock_guard lock(grants_mutex_);
      grants_[lease->id] = Grant{lease.value(), now};
    }
    entries.push_back({{"key", key.to_hex()},
                       {"model", lease->model.to_hex()},
                       {"codec", static_cast<int>(lease->codec)},
                       {"offset", lease->offset},
                       {"length", lease->length},
                       {"checksum", lease->checksum},
                       {"lease", lease->id}});
  }
  const protocol::RegionDescriptor region = store_.arena().descriptor(kArenaRegionId);
  return {{"node", options_.node},
          {"ucx_address", to_hex(transport_->address())},
          {"region",
           {{"base", region.base_address}, {"length", region.length}, {"rkey", to_hex(region.ucx_rkey)}}},
          {"entries", std::move(entries)},
          {"missing", std::move(missing)}};
}

nlohmann::json RemoteStore::release(const nlohmann::json& request) {
  auto it = request.find("leases");
  if (it == request.end() || !it->is_array()) {
    return peer_error(Status(ErrorCode::kMalformed, "\"leases\" must be an array of lease ids"));
  }
  uint64_t released = 0;
  for (const auto& id : *it) {
    if (!id.is_number_unsigned()) continue;
    {
      std::lock_guard lock(grants_mutex_);
      grants_.erase(id.get<uint64_t>());
    }
    if (store_.release(id.get<uint64_t>()).ok()) ++released;
  }
  return {{"released", released}};
}

Result<RemoteStore::Link*> RemoteStore::link_to_address(Link& link, const std::string& ucx_address_hex,
                                                        const nlohmann::json& region_json) {
  if (link.connected && link.ucx_address == ucx_address_hex) return &link;
  if (link.connected) transport_->disconnect(link.peer);
  link.connected = false;
  auto address = from_hex(ucx_address_hex);
  bool ok = region_json.is_object();
  auto rkey = ok && region_json.contains("rkey") && region_json["rkey"].is_string()
                  ? from_hex(region_json["rkey"].get<std::string>())
                  : Result<std::vector<uint8_t>>(Status(ErrorCode::kMalformed, "no rkey"));
  protocol::RegionDescriptor region;
  region.region_id = kArenaRegionId;
  if (ok) {
    region.base_address = u64_of(region_json, "base", ok);
    region.length = u64_of(region_json, "length", ok);
  }
  region.kind = protocol::MemoryKind::kSharedMemory;
  if (!address.ok() || !rkey.ok() || !ok) return Status(ErrorCode::kMalformed, "bad ucx_address or region");
  region.ucx_rkey = std::move(rkey.value());
  auto peer = transport_->connect(address.value());
  if (!peer.ok()) return Status(peer.status().code(), "connecting over UCX: " + peer.status().message());
  auto imported = transport_->import_region(peer.value(), region);
  if (!imported.ok()) {
    transport_->disconnect(peer.value());
    return Status(imported.status().code(), "the peer's arena: " + imported.status().message());
  }
  link.peer = peer.value();
  link.region = imported.value();
  link.ucx_address = ucx_address_hex;
  link.connected = true;
  return &link;
}

// A peer that fetches from here asks this node to write the granted entries into its arena.
nlohmann::json RemoteStore::push(const nlohmann::json& request) {
  const auto start = std::chrono::steady_clock::now();
  if (!request.contains("ucx_address") || !request["ucx_address"].is_string() || !request.contains("items") ||
      !request["items"].is_array()) {
    return peer_error(Status(ErrorCode::kMalformed, "push needs \"ucx_address\", \"region\" and \"items\""));
  }
  const std::string address = request["ucx_address"].get<std::string>();
  Link& link = link_for("push:" + address);
  std::lock_guard link_lock(link.mutex);
  auto linked = link_to_address(link, address, request.value("region", nlohmann::json()));
  if (!linked.ok()) return peer_error(linked.status());
  std::vector<fabric::PutOp> puts;
  std::vector<uint64_t> leases;
  uint64_t bytes = 0;
  for (const auto& item : request["items"]) {
    bool ok = item.is_object();
    const uint64_t lease_id = ok ? u64_of(item, "lease", ok) : 0;
    const uint64_t dst = ok ? u64_of(item, "offset", ok) : 0;
    if (!ok) return peer_error(Status(ErrorCode::kMalformed, "a push item without lease or offset"));
    store::Lease lease;
    {
      std::lock_guard lock(grants_mutex_);
      auto it = grants_.find(lease_id);
      if (it == grants_.end()) {
        return peer_error(Status(ErrorCode::kNotFound,
                                 "lease " + std::to_string(lease_id) + " was not granted here or has ended"));
      }
      lease = it->second.lease;
    }
    puts.push_back(
        fabric::PutOp{store_.bytes(lease).data(), &store_.arena(), link.region, dst, lease.length});
    leases.push_back(lease_id);
    bytes += lease.length;
  }
  auto done = std::make_shared<std::promise<Status>>();
  auto future = done->get_future();
  const fabric::PeerId peer = link.peer;
  transport_->put(peer, std::move(puts), [this, peer, done](const Status& s) {
    if (!s.ok()) return done->set_value(s);
    transport_->flush(peer, [done](const Status& f) { done->set_value(f); });
  });
  Status pushed = future.wait_for(options_.deadline) == std::future_status::ready
                      ? future.get()
                      : Status(ErrorCode::kTimeout, "writing into the requester took longer than " +
                                                        std::to_string(options_.deadline.count()) + " ms");
  if (pushed.code() == ErrorCode::kTimeout) future.wait();  // the leased bytes may still be read
  if (!pushed.ok()) {
    transport_->disconnect(link.peer);
    link.connected = false;
  }
  for (uint64_t id : leases) {  // pushed or failed: the requester needs them no more
    {
      std::lock_guard lock(grants_mutex_);
      grants_.erase(id);
    }
    (void)store_.release(id);
  }
  if (!pushed.ok()) return peer_error(pushed);
  return {{"pushed", leases.size()}, {"bytes", bytes}, {"seconds", seconds_since(start)}};
}

// --- asking peers -------------------------------------------------------------------------------

std::vector<PeerLookup> RemoteStore::lookup_peers(const std::vector<protocol::ChunkKey>& keys) {
  std::vector<std::future<PeerLookup>> asks;
  const nlohmann::json request{{"op", "lookup"}, {"keys", keys_json(keys)}};
  for (const fabric::NodeSpec& n : topology_.nodes) {
    if (n.name == options_.node || n.control_port == 0) continue;
    asks.push_back(std::async(std::launch::async, [&, node = &n] {
      const std::string& name = node->name;
      PeerLookup out{name, 0, Status::Ok()};
      auto reply = ask(*node, request, options_.lookup_deadline);
      if (!reply.ok()) {
        out.status = reply.status();
      } else if (auto m = reply->find("matched"); m != reply->end() && m->is_number_unsigned()) {
        out.matched = m->get<size_t>();
      } else {
        out.status = Status(ErrorCode::kMalformed, "peer " + name + " answered a lookup without \"matched\"");
      }
      return out;
    }));
  }
  std::vector<PeerLookup> out;
  for (auto& a : asks) out.push_back(a.get());
  return out;
}

Result<FetchResult> RemoteStore::move(const std::string& from, const std::string& to,
                                      const std::vector<protocol::ChunkKey>& keys, bool copy) {
  Status error;
  if (node_named(from, error) == nullptr) return error;
  const fabric::NodeSpec* dest = node_named(to, error);
  if (dest == nullptr) return error;
  if (from == to) return Status(ErrorCode::kInvalidArgument, "move from '" + from + "' to itself");
  if (to != options_.node) {  // the destination fetches; ask it to
    nlohmann::json request{{"op", "pull"}, {"from", from}, {"keys", keys_json(keys)}, {"copy", copy}};
    auto reply = ask(*dest, request, options_.deadline);
    if (!reply.ok()) return reply.status();
    FetchResult r;
    bool ok = true;
    r.fetched = u64_of(*reply, "fetched", ok);
    r.already_here = u64_of(*reply, "already_here", ok);
    r.bytes = u64_of(*reply, "bytes", ok);
    r.seconds = reply->value("seconds", 0.0);
    auto missing = keys_of(*reply, "not_found");
    if (!ok || !missing.ok())
      return Status(ErrorCode::kMalformed, "node " + to + " answered a pull with bad fields");
    r.not_found = std::move(missing.value());
    return r;
  }
  auto fetched = fetch(from, keys);
  if (!fetched.ok() || copy) return fetched;
  // Committed here: now the source may let go of them.
  const fabric::NodeSpec* source = topology_.find_node(from);
  auto dropped = ask(*source, {{"op", "drop"}, {"keys", keys_json(keys)}}, options_.deadline);
  if (!dropped.ok()) {
    return Status(dropped.status().code(), "entries copied to " + to + " but not removed from " + from +
                                               ": " + dropped.status().message());
  }
  return fetched;
}

Result<FetchResult> RemoteStore::fetch(const std::string& from, const std::vector<protocol::ChunkKey>& keys) {
  Status error;
  const fabric::NodeSpec* holder = node_named(from, error);
  if (holder == nullptr) return error;
  if (from == options_.node) return Status(ErrorCode::kInvalidArgument, "fetch from this node itself");
  const auto start = std::chrono::steady_clock::now();
  FetchResult result;
  if (keys.empty()) return result;

  Link& link = link_for(from);
  std::lock_guard link_lock(link.mutex);
  auto grant = ask(*holder, {{"op", "grant"}, {"keys", keys_json(keys)}}, options_.deadline);
  if (!grant.ok()) return grant.status();

  // Whatever happens below, the holder's leases go back (or expire there on their own).
  std::vector<uint64_t> leases;
  auto release_all = [&] {
    if (leases.empty()) return;
    auto r = ask(*holder, {{"op", "release"}, {"leases", leases}}, options_.deadline);
    if (!r.ok())
      spdlog::warn("fetch from {}: releasing {} leases: {}", from, leases.size(), r.status().to_string());
  };
  auto malformed = [&](const std::string& what) {
    release_all();
    return Status(ErrorCode::kMalformed, "node " + from + "'s grant: " + what);
  };
  const nlohmann::json& g = grant.value();
  if (!g.contains("entries") || !g["entries"].is_array() || !g.contains("region") ||
      !g["region"].is_object() || !g.contains("ucx_address") || !g["ucx_address"].is_string()) {
    return malformed("missing entries, region or ucx_address");
  }
  struct Entry {
    protocol::ChunkKey key;
    protocol::ChunkKey model;  // kept here as the holder kept it, so clear by model finds the copy
    protocol::KvCodec codec;   // likewise: the copy's bytes are encoded as the holder's were
    uint64_t offset, length, checksum, lease;
    bool landing = false;  // room reserved here: it comes over the link
  };
  std::vector<Entry> entries;
  for (const auto& e : g["entries"]) {
    bool ok = e.is_object();
    Entry entry{};
    if (ok) {
      entry.offset = u64_of(e, "offset", ok);
      entry.length = u64_of(e, "length", ok);
      entry.checksum = u64_of(e, "checksum", ok);
      entry.lease = u64_of(e, "lease", ok);
      leases.push_back(entry.lease);
    }
    auto key = ok && e["key"].is_string()
                   ? protocol::ChunkKey::from_hex(e["key"].get<std::string>())
                   : Result<protocol::ChunkKey>(Status(ErrorCode::kMalformed, "no key"));
    if (!ok || !key.ok()) return malformed("an entry without key, offset, length, checksum or lease");
    entry.key = key.value();
    // A holder of an older build sends no model: the copy then records none.
    if (e.contains("model")) {
      auto model = e["model"].is_string()
                       ? protocol::ChunkKey::from_hex(e["model"].get<std::string>())
                       : Result<protocol::ChunkKey>(Status(ErrorCode::kMalformed, "bad model"));
      if (!model.ok()) return malformed("an entry whose model is not a chunk key");
      entry.model = model.value();
    }
    // Likewise the codec: a holder that sends none stores raw (identity) chunks only.
    if (e.contains("codec")) {
      if (!e["codec"].is_number_unsigned() || e["codec"].get<uint64_t>() >= protocol::kKvCodecCount) {
        return malformed("an entry whose codec is not a known codec number");
      }
      entry.codec = static_cast<protocol::KvCodec>(e["codec"].get<uint64_t>());
    }
    entries.push_back(entry);
  }
  auto missing = keys_of(g, "missing");
  if (!missing.ok()) return malformed("bad \"missing\"");
  result.not_found = std::move(missing.value());

  const std::string ucx_address = g["ucx_address"].get<std::string>();
  if (options_.fetch_by == FetchBy::kGet) {  // read from the holder's arena: link to it
    auto linked = link_to_address(link, ucx_address, g["region"]);
    if (!linked.ok()) {
      release_all();
      return Status(linked.status().code(), "node " + from + ": " + linked.status().message());
    }
  }

  // Room here for each entry this node does not hold yet.
  const uint64_t client = kPeerClientBase | next_client_.fetch_add(1);
  struct Landing {
    const Entry* entry;
    store::Reservation reservation;
  };
  std::vector<Landing> landings;
  std::vector<fabric::GetOp> gets;
  for (Entry& e : entries) {
    auto r = store_.reserve(e.key, e.length, client, e.model, e.codec);
    if (!r.ok()) {
      if (r.status().code() == ErrorCode::kAborted) {  // stored here already (or being stored)
        ++result.already_here;
        continue;
      }
      store_.drop_client(client);
      release_all();
      return Status(r.status().code(), "room for " + std::to_string(e.length) + " bytes from " + from + ": " +
                                           r.status().message());
    }
    std::span<uint8_t> dst = store_.bytes(r.value());
    gets.push_back(fabric::GetOp{dst.data(), &store_.arena(), link.region, e.offset, e.length});
    landings.push_back(Landing{&e, r.value()});
    e.landing = true;
  }

  // Checks each landed entry against the holder's checksum and commits it; a mismatch is never
  // stored. Counts into `result`; the first problem into `bad`.
  Status bad = Status::Ok();
  double verify_seconds = 0;
  auto verify_and_commit = [&](size_t begin, size_t end) {
    const auto t = std::chrono::steady_clock::now();
    for (size_t i = begin; i < end; ++i) {
      const Landing& l = landings[i];
      std::span<uint8_t> bytes = store_.bytes(l.reservation);
      // One hash: commit checks it against the holder's checksum (the bytes are read once).
      if (Status s = store_.commit(l.entry->key, l.reservation.id, l.entry->checksum); !s.ok()) {
        if (s.code() == ErrorCode::kVerifyFailed) {
          (void)store_.abort(l.entry->key, l.reservation.id);
          s = Status(ErrorCode::kVerifyFailed, "chunk " + l.entry->key.to_hex() + " from " + from +
                                                   " does not match the holder's checksum; not stored");
        }
        if (bad.ok()) bad = s;
        continue;
      }
      ++result.fetched;
      result.bytes += bytes.size();
    }
    verify_seconds += seconds_since(t);
  };

  if (!gets.empty() && options_.fetch_by == FetchBy::kPut) {
    // The holder writes the entries into the reservations (and then releases their leases), in
    // batches of about kPushBatchBytes, so that checking one batch here overlaps the next one's
    // crossing of the link.
    const auto arena_base = reinterpret_cast<uint64_t>(store_.arena().data());
    const protocol::RegionDescriptor mine = store_.arena().descriptor(kArenaRegionId);
    const nlohmann::json region = {
        {"base", mine.base_address}, {"length", mine.length}, {"rkey", to_hex(mine.ucx_rkey)}};
    const std::string my_address = to_hex(transport_->address());
    std::vector<size_t> cuts;
    uint64_t batch = 0;
    for (size_t i = 0; i < landings.size(); ++i) {
      batch += landings[i].entry->length;
      if (batch >= kPushBatchBytes || i + 1 == landings.size()) {
        cuts.push_back(i + 1);
        batch = 0;
      }
    }
    auto push_batch = [&, arena_base](size_t begin, size_t end) {
      nlohmann::json items = nlohmann::json::array();
      for (size_t i = begin; i < end; ++i) {
        items.push_back({{"lease", landings[i].entry->lease},
                         {"offset", reinterpret_cast<uint64_t>(gets[i].local) - arena_base}});
      }
      const auto remaining = options_.deadline - std::chrono::duration_cast<std::chrono::milliseconds>(
                                                     std::chrono::steady_clock::now() - start);
      return ask(*holder, {{"op", "push"}, {"ucx_address", my_address}, {"region", region}, {"items", items}},
                 std::max(remaining, std::chrono::milliseconds(1)));
    };
    KeepPolling polling(*transport_);  // the holder's puts land only while this side polls
    // Two pushes in flight: the holder queues the second's puts behind the first's, so the link
    // does not idle while a finished push's reply and the next request cross.
    std::deque<std::future<Result<nlohmann::json>>> in_flight;
    size_t launched = 0;
    auto launch = [&] {
      const size_t from_index = launched == 0 ? 0 : cuts[launched - 1];
      in_flight.push_back(std::async(std::launch::async, push_batch, from_index, cuts[launched]));
      ++launched;
    };
    const auto pushes_start = std::chrono::steady_clock::now();
    while (launched < cuts.size() && in_flight.size() < kPushesInFlight) launch();
    size_t begin = 0;
    for (size_t k = 0; k < cuts.size(); ++k) {
      auto pushed = in_flight.front().get();
      in_flight.pop_front();
      if (!pushed.ok()) {
        for (auto& other : in_flight) other.wait();  // nothing may still be on its way here
        // A push that timed out here may still be writing: these reservations are not reused
        // until the holder's deadline has passed too (it waits for its puts before answering).
        if (pushed.status().code() == ErrorCode::kTimeout) std::this_thread::sleep_for(options_.deadline);
        store_.drop_client(client);  // frees what is not committed yet
        release_all();
        return Status(pushed.status().code(),
                      "node " + from + " writing the entries here: " + pushed.status().message());
      }
      if (k + 1 == cuts.size()) result.transfer_seconds = seconds_since(pushes_start);
      if (launched < cuts.size()) launch();
      verify_and_commit(begin, cuts[k]);
      begin = cuts[k];
    }
    // The holder released what it pushed; what is left are the entries this node had already.
    std::vector<uint64_t> left;
    for (const Entry& e : entries) {
      if (!e.landing) left.push_back(e.lease);
    }
    leases = std::move(left);
  } else if (!gets.empty()) {
    const auto get_start = std::chrono::steady_clock::now();
    auto done = std::make_shared<std::promise<Status>>();
    auto future = done->get_future();
    transport_->get(link.peer, std::move(gets), [done](const Status& s) { done->set_value(s); });
    const auto remaining = options_.deadline - std::chrono::duration_cast<std::chrono::milliseconds>(
                                                   std::chrono::steady_clock::now() - start);
    Status got =
        future.wait_for(std::max(remaining, std::chrono::milliseconds(1))) == std::future_status::ready
            ? future.get()
            : Status(ErrorCode::kTimeout, "reading from node " + from + " took longer than " +
                                              std::to_string(options_.deadline.count()) + " ms");
    result.transfer_seconds = seconds_since(get_start);
    if (!got.ok()) {
      // The link may be broken (the holder died): make a new one next time. The reservations are
      // dropped only once no get can still write into them.
      if (got.code() == ErrorCode::kTimeout) {
        future.wait();  // UCX completes or fails every get; a reused reservation must not be written
      }
      transport_->disconnect(link.peer);
      link.connected = false;
      store_.drop_client(client);
      release_all();
      return Status(got.code(), "reading from node " + from + ": " + got.message());
    }
    verify_and_commit(0, landings.size());
  }

  release_all();
  result.seconds = seconds_since(start);
  if (!bad.ok()) return bad;
  spdlog::info(
      "fetched {} chunks ({} bytes) from {} in {:.1f} ms ({:.2f} GB/s; the bytes' transfer {:.1f} ms, "
      "checksums "
      "{:.1f} ms); {} here already, {} not there",
      result.fetched, result.bytes, from, result.seconds * 1e3,
      result.seconds > 0 ? static_cast<double>(result.bytes) / result.seconds / 1e9 : 0.0,
      result.transfer_seconds * 1e3, verify_seconds * 1e3, result.already_here, result.not_found.size());
  return result;
}

}  // namespace kvf::daemon
