#include "kvf/fabric/multi_transport.h"

#include <algorithm>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>

#include <spdlog/spdlog.h>

#include "kvf/fabric/cuda_ipc_transport.h"
#include "kvf/fabric/staged_transport.h"

namespace kvf::fabric {
namespace {

// Address: magic "KVMT", version u16, count u16, then per transport: name length u8, name,
// address length u32, address (all little-endian).
constexpr uint32_t kMagic = 0x544d564b;
constexpr uint16_t kVersion = 1;

void put_u16(std::vector<uint8_t>& out, uint16_t v) {
  out.push_back(static_cast<uint8_t>(v));
  out.push_back(static_cast<uint8_t>(v >> 8));
}
void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
uint32_t get_u32(const uint8_t* p) {
  return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24;
}

struct Offered {
  std::string name;
  std::span<const uint8_t> address;
};

// The transports an address offers; an address that is not a MultiTransport's is one transport.
std::vector<Offered> parse(std::span<const uint8_t> a) {
  if (is_staged_transport_address(a)) return {Offered{"ucx_staged", a}};
  if (a.size() < 8 || get_u32(a.data()) != kMagic) {
    return {Offered{std::string(transport_kind_of_address(a)), a}};
  }
  const uint16_t version = static_cast<uint16_t>(a[4] | a[5] << 8);
  const uint16_t count = static_cast<uint16_t>(a[6] | a[7] << 8);
  std::vector<Offered> out;
  if (version != kVersion) return out;  // nothing this build can read: no transport in common
  size_t at = 8;
  for (uint16_t i = 0; i < count; ++i) {
    if (at + 1 > a.size()) return {};
    const size_t name_length = a[at++];
    if (at + name_length + 4 > a.size()) return {};
    std::string name(reinterpret_cast<const char*>(a.data() + at), name_length);
    at += name_length;
    const uint32_t length = get_u32(a.data() + at);
    at += 4;
    if (length > a.size() - at) return {};
    out.push_back(Offered{std::move(name), a.subspan(at, length)});
    at += length;
  }
  if (at != a.size()) return {};
  return out;
}

std::string family(const std::string& name) {
  return name == "local" ? "ucx" : name;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ",") + n;
  return out.empty() ? "nothing readable" : out;
}

}  // namespace

std::vector<std::string> transports_offered(std::span<const uint8_t> address) {
  std::vector<std::string> out;
  for (const Offered& o : parse(address)) out.push_back(o.name);
  return out;
}

bool transports_can_meet(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  std::set<std::string> mine;
  for (const std::string& n : transports_offered(a)) mine.insert(family(n));
  for (const std::string& n : transports_offered(b)) {
    if (mine.count(family(n)) != 0) return true;
  }
  return false;
}

std::vector<uint8_t> address_for(const Transport& transport, std::span<const uint8_t> address) {
  if (dynamic_cast<const MultiTransport*>(&transport) != nullptr || address.size() < 8 ||
      get_u32(address.data()) != kMagic) {
    return {address.begin(), address.end()};
  }
  for (const Offered& o : parse(address)) {
    if (o.name == transport.name()) return {o.address.begin(), o.address.end()};
  }
  return {};
}

class MultiTransport::Impl {
 public:
  explicit Impl(std::vector<std::unique_ptr<Transport>> inner)
      : inner_(std::move(inner)), back_(inner_.size()) {
    for (const auto& t : inner_) name_ += (name_.empty() ? "" : ",") + std::string(t->name());
    address_.reserve(64);
    put_u32(address_, kMagic);
    put_u16(address_, kVersion);
    put_u16(address_, static_cast<uint16_t>(inner_.size()));
    for (const auto& t : inner_) {
      const std::string_view n = t->name();
      address_.push_back(static_cast<uint8_t>(n.size()));
      address_.insert(address_.end(), n.begin(), n.end());
      const std::vector<uint8_t> a = t->address();
      put_u32(address_, static_cast<uint32_t>(a.size()));
      address_.insert(address_.end(), a.begin(), a.end());
    }
  }

  ~Impl() {
    // The others first: what they complete while closing is handed to the first one's thread.
    while (inner_.size() > 1) inner_.pop_back();
    inner_.clear();
  }

  const std::string& name() const { return name_; }
  const std::vector<uint8_t>& address() const { return address_; }
  // The largest any inner transport asks for: the scheduler's window is shared by all peers.
  uint64_t suggested_inflight_bytes() const {
    uint64_t most = 0;
    for (const auto& t : inner_) most = std::max(most, t->suggested_inflight_bytes());
    return most;
  }

  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options) {
    const std::vector<Offered> offered = parse(address);
    std::string why;
    for (size_t i = 0; i < inner_.size(); ++i) {
      auto match = std::find_if(offered.begin(), offered.end(),
                                [&](const Offered& o) { return o.name == inner_[i]->name(); });
      if (match == offered.end()) continue;
      auto peer = inner_[i]->connect(match->address, options);
      if (!peer.ok()) {
        // The next choice may still connect (cuda_ipc to a peer on another host, say).
        spdlog::info("{}: {} cannot reach the peer ({}); trying the next transport", name_, inner_[i]->name(),
                     peer.status().to_string());
        why += (why.empty() ? "" : "; ") + std::string(inner_[i]->name()) + ": " + peer.status().message();
        continue;
      }
      std::lock_guard lock(mutex_);
      const PeerId outer = next_peer_++;
      peers_[outer] = Peer{i, peer.value()};
      back_[i][peer.value()] = outer;
      return outer;
    }
    std::vector<std::string> theirs;
    for (const Offered& o : offered) theirs.push_back(o.name);
    return Status(ErrorCode::kUnavailable, "no transport in common with the peer: this side offers " + name_ +
                                               ", the peer " + joined(theirs) +
                                               (why.empty() ? "" : " (" + why + ")"));
  }

  std::string_view chosen(PeerId peer) const {
    std::lock_guard lock(mutex_);
    auto it = peers_.find(peer);
    return it == peers_.end() ? std::string_view() : inner_[it->second.index]->name();
  }

  Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) {
    auto p = lookup(peer);
    if (!p.ok()) return p.status();
    auto id = inner_[p->index]->import_region(p->inner, region);
    if (!id.ok()) return id.status();
    std::lock_guard lock(mutex_);
    const RemoteRegionId outer = next_region_++;
    regions_[outer] = Region{peer, id.value()};
    return outer;
  }

  void disconnect(PeerId peer) {
    auto p = lookup(peer);
    if (!p.ok()) return;
    inner_[p->index]->disconnect(p->inner);
    std::lock_guard lock(mutex_);
    for (auto it = regions_.begin(); it != regions_.end();) {
      it = it->second.peer == peer ? regions_.erase(it) : std::next(it);
    }
    back_[p->index].erase(p->inner);
    peers_.erase(peer);
  }

  // Per put: no std::function is built on this path, the caller's lambda is called directly.
  template <typename Op, typename Call>
  void forward(PeerId peer, std::vector<Op> ops, Completion done, const Call& call) {
    auto p = lookup(peer);
    if (!p.ok()) return inner_[0]->post([done, s = p.status()] { done(s); });
    if (Status s = translate(peer, ops); !s.ok()) return inner_[0]->post([done, s] { done(s); });
    call(*inner_[p->index], p->inner, std::move(ops), on_primary(p->index, std::move(done)));
  }

  void flush(PeerId peer, Completion done) {
    auto p = lookup(peer);
    if (!p.ok()) return inner_[0]->post([done, s = p.status()] { done(s); });
    inner_[p->index]->flush(p->inner, on_primary(p->index, std::move(done)));
  }

  void notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) {
    auto p = lookup(peer);
    if (!p.ok()) {
      if (done) inner_[0]->post([done, s = p.status()] { done(s); });
      return;
    }
    inner_[p->index]->notify(p->inner, bytes, on_primary(p->index, std::move(done)));
  }

  void set_notification_handler(NotificationHandler handler) {
    for (size_t i = 0; i < inner_.size(); ++i) {
      if (i == 0 || !handler) {
        inner_[i]->set_notification_handler(handler);
        continue;
      }
      Transport* primary = inner_[0].get();
      inner_[i]->set_notification_handler([primary, handler](std::span<const uint8_t> bytes) {
        primary->post([handler, copy = std::vector<uint8_t>(bytes.begin(), bytes.end())] { handler(copy); });
      });
    }
  }

  void set_peer_failure_handler(PeerFailureHandler handler) {
    for (size_t i = 0; i < inner_.size(); ++i) {
      if (!handler) {
        inner_[i]->set_peer_failure_handler(nullptr);
        continue;
      }
      Transport* primary = inner_[0].get();
      inner_[i]->set_peer_failure_handler([this, i, primary, handler](PeerId inner_peer, const Status& why) {
        PeerId outer = 0;
        {
          std::lock_guard lock(mutex_);
          auto it = back_[i].find(inner_peer);
          if (it == back_[i].end()) return;  // a connection this side did not make (a sender's)
          outer = it->second;
        }
        if (i == 0) return handler(outer, why);
        primary->post([handler, outer, why] { handler(outer, why); });
      });
    }
  }

  Transport& primary() { return *inner_[0]; }

 private:
  struct Peer {
    size_t index = 0;
    PeerId inner = 0;
  };
  struct Region {
    PeerId peer = 0;
    RemoteRegionId inner = 0;
  };

  Result<Peer> lookup(PeerId peer) const {
    std::lock_guard lock(mutex_);
    auto it = peers_.find(peer);
    if (it == peers_.end()) {
      return Status(ErrorCode::kInvalidArgument, "peer " + std::to_string(peer) + " is not connected");
    }
    return it->second;
  }

  template <typename Op>
  Status translate(PeerId peer, std::vector<Op>& ops) const {
    std::lock_guard lock(mutex_);
    RemoteRegionId last_outer = 0, last_inner = 0;
    for (Op& op : ops) {
      if (op.remote != last_outer || last_outer == 0) {
        auto it = regions_.find(op.remote);
        if (it == regions_.end() || it->second.peer != peer) {
          return Status(ErrorCode::kInvalidArgument,
                        "region " + std::to_string(op.remote) + " was not imported from this peer");
        }
        last_outer = op.remote;
        last_inner = it->second.inner;
      }
      op.remote = last_inner;
    }
    return Status::Ok();
  }

  // Completions of the other inner transports run on the first one's thread, as callers expect.
  Completion on_primary(size_t index, Completion done) {
    if (index == 0 || !done) return done;
    Transport* primary = inner_[0].get();
    return [primary, done = std::move(done)](const Status& s) { primary->post([done, s] { done(s); }); };
  }

  std::vector<std::unique_ptr<Transport>> inner_;
  std::string name_;
  std::vector<uint8_t> address_;
  mutable std::mutex mutex_;  // the maps below: setup calls and failure handlers come from many threads
  std::unordered_map<PeerId, Peer> peers_;
  std::vector<std::unordered_map<PeerId, PeerId>> back_;  // per inner transport: its peer -> ours
  std::unordered_map<RemoteRegionId, Region> regions_;
  PeerId next_peer_ = 1;
  RemoteRegionId next_region_ = 1;
};

Result<std::unique_ptr<MultiTransport>> MultiTransport::create(
    std::vector<std::unique_ptr<Transport>> inner) {
  if (inner.empty())
    return Status(ErrorCode::kInvalidArgument, "a multi transport needs at least one transport");
  std::set<std::string_view> names;
  for (const auto& t : inner) {
    if (t == nullptr) return Status(ErrorCode::kInvalidArgument, "a multi transport got a null transport");
    if (t->name().size() > 255 || !names.insert(t->name()).second) {
      return Status(ErrorCode::kInvalidArgument, "transport " + std::string(t->name()) + " given twice");
    }
  }
  return std::unique_ptr<MultiTransport>(new MultiTransport(std::make_unique<Impl>(std::move(inner))));
}

MultiTransport::MultiTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MultiTransport::~MultiTransport() = default;

std::string_view MultiTransport::name() const {
  return impl_->name();
}
uint64_t MultiTransport::suggested_inflight_bytes() const {
  return impl_->suggested_inflight_bytes();
}
std::vector<uint8_t> MultiTransport::address() const {
  return impl_->address();
}
Result<PeerId> MultiTransport::connect(std::span<const uint8_t> address, const ConnectOptions& options) {
  return impl_->connect(address, options);
}
std::string_view MultiTransport::chosen(PeerId peer) const {
  return impl_->chosen(peer);
}
Result<RemoteRegionId> MultiTransport::import_region(PeerId peer, const protocol::RegionDescriptor& region) {
  return impl_->import_region(peer, region);
}
void MultiTransport::disconnect(PeerId peer) {
  impl_->disconnect(peer);
}
void MultiTransport::put(PeerId peer, std::vector<PutOp> ops, Completion done) {
  impl_->forward(peer, std::move(ops), std::move(done),
                 [](Transport& t, PeerId p, std::vector<PutOp> o, Completion d) {
                   t.put(p, std::move(o), std::move(d));
                 });
}
void MultiTransport::put_after_event(PeerId peer, std::vector<PutOp> ops, void* cuda_event, Completion done) {
  impl_->forward(peer, std::move(ops), std::move(done),
                 [cuda_event](Transport& t, PeerId p, std::vector<PutOp> o, Completion d) {
                   t.put_after_event(p, std::move(o), cuda_event, std::move(d));
                 });
}
void MultiTransport::get(PeerId peer, std::vector<GetOp> ops, Completion done) {
  impl_->forward(peer, std::move(ops), std::move(done),
                 [](Transport& t, PeerId p, std::vector<GetOp> o, Completion d) {
                   t.get(p, std::move(o), std::move(d));
                 });
}
void MultiTransport::flush(PeerId peer, Completion done) {
  impl_->flush(peer, std::move(done));
}
void MultiTransport::notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) {
  impl_->notify(peer, bytes, std::move(done));
}
void MultiTransport::set_notification_handler(NotificationHandler handler) {
  impl_->set_notification_handler(std::move(handler));
}
void MultiTransport::set_peer_failure_handler(PeerFailureHandler handler) {
  impl_->set_peer_failure_handler(std::move(handler));
}
void MultiTransport::post(std::function<void()> fn) {
  impl_->primary().post(std::move(fn));
}
void MultiTransport::post_after(std::chrono::nanoseconds delay, std::function<void()> fn) {
  impl_->primary().post_after(delay, std::move(fn));
}

}  // namespace kvf::fabric
