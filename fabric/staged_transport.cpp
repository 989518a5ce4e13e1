#include "kvf/fabric/staged_transport.h"

#include <deque>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>
#include <variant>

#include <spdlog/spdlog.h>

#include "helper_threads.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/protocol/staging_messages.h"
#include "slot_mover.h"

namespace kvf::fabric {
namespace {

namespace staging = protocol::staging;

// Address: magic "KVST", version u16, boot id length u32 + bytes, then the inner UCX address.
constexpr uint32_t kMagic = 0x5453564b;
constexpr uint16_t kVersion = 1;

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put_u64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
uint32_t get_u32(const uint8_t* p) {
  return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24;
}
uint64_t get_u64(const uint8_t* p) {
  return get_u32(p) | static_cast<uint64_t>(get_u32(p + 4)) << 32;
}

std::string boot_id() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(f, id);
  return id;
}

struct Parsed {
  std::string boot;
  std::vector<uint8_t> ucx;
};

Result<Parsed> parse(std::span<const uint8_t> a) {
  if (!is_staged_transport_address(a)) {
    return Status(ErrorCode::kUnavailable,
                  "the peer offers no ucx_staged transport: start both sides with --transport ucx_staged");
  }
  if (static_cast<uint16_t>(a[4] | a[5] << 8) != kVersion) {
    return Status(ErrorCode::kUnsupportedVersion, "ucx_staged address of another version");
  }
  const uint32_t boot_length = get_u32(a.data() + 6);
  if (boot_length > 64 || 10 + boot_length >= a.size())
    return Status(ErrorCode::kMalformed, "truncated ucx_staged address");
  Parsed p;
  p.boot.assign(reinterpret_cast<const char*>(a.data() + 10), boot_length);
  p.ucx.assign(a.begin() + 10 + boot_length, a.end());
  return p;
}

Status from_code(uint32_t code, const std::string& message) {
  return Status(static_cast<ErrorCode>(code), message);
}

using protocol::KvCodec;

bool streamable(KvCodec codec) {
  return codec == KvCodec::kIdentity || codec == KvCodec::kInt8 || codec == KvCodec::kFp8;
}

// Slot bytes of one encoded row (its scale and one code a value); 0 for identity.
uint64_t encoded_row_bytes(KvCodec codec, uint32_t row_bytes) {
  return codec == KvCodec::kIdentity ? 0 : 4 + uint64_t{row_bytes} / 2;
}

std::string describe_codec(KvCodec codec, uint32_t row_bytes) {
  std::string s(protocol::codec_name(codec));
  if (codec != KvCodec::kIdentity) s += " (rows of " + std::to_string(row_bytes) + " bytes)";
  return s;
}

}  // namespace

bool is_staged_transport_address(std::span<const uint8_t> address) {
  return address.size() >= 10 && get_u32(address.data()) == kMagic;
}

class StagedTransport::Impl {
 public:
  Impl(std::shared_ptr<gpudirect::UcxContext> context, StagedTransportOptions options,
       std::unique_ptr<UcxTransport> inner, std::unique_ptr<SlotMover> mover)
      : context_(std::move(context)), options_(options), inner_(std::move(inner)), mover_(std::move(mover)) {
    put_u32(address_, kMagic);
    address_.push_back(static_cast<uint8_t>(kVersion));
    address_.push_back(static_cast<uint8_t>(kVersion >> 8));
    const std::string boot = boot_id();
    put_u32(address_, static_cast<uint32_t>(boot.size()));
    address_.insert(address_.end(), boot.begin(), boot.end());
    const std::vector<uint8_t> ucx = inner_->address();
    address_.insert(address_.end(), ucx.begin(), ucx.end());
    token_base_ = static_cast<uint64_t>(std::random_device{}()) << 32;
    inner_->set_notification_handler([this](std::span<const uint8_t> bytes) { on_notification(bytes); });
    inner_->set_peer_failure_handler([this](PeerId peer, const Status& why) { on_peer_failure(peer, why); });
  }

  ~Impl() {
    helpers_.join_all();
    call<int>([this] {
      closing_ = true;  // no new copy, encode or decode from here on
      const Status down(ErrorCode::kAborted, "transport shut down");
      for (auto& [peer, lane] : lanes_) {
        if (lane->state == Lane::State::kReady) {
          inner_->notify(peer, staging::encode(staging::StagingClosed{lane->token}), nullptr);
        }
        fail_lane(*lane, down);
      }
      user_notification_ = nullptr;
      user_failure_ = nullptr;
      return 0;
    });
    helpers_.join_all();
    // Workers finish what they hold (their completions are posted to the inner transport, which
    // is still there) before the inner transport and the slots go.
    mover_->drain();
    // The inner transport stops (and with it every callback) before the slots it reads go away.
    inner_.reset();
    lanes_.clear();
    senders_.clear();
  }

  const std::vector<uint8_t>& address() const { return address_; }

  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options) {
    auto parsed = parse(address);
    if (!parsed.ok()) return parsed.status();
    ConnectOptions inner_options = options;
    inner_options.same_host = options.same_host || parsed->boot == boot_id();
    return inner_->connect(parsed->ucx, inner_options);
  }

  Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) {
    if (region.length == 0 || region.base_address == 0 || region.base_address > UINT64_MAX - region.length) {
      return Status(ErrorCode::kInvalidArgument, "ucx_staged: a region without an address or length");
    }
    return call<Result<RemoteRegionId>>([&]() -> Result<RemoteRegionId> {
      const RemoteRegionId id = next_region_++;
      regions_[id] = Region{peer, region.base_address, region.length};
      return id;
    });
  }

  void disconnect(PeerId peer) {
    call<int>([&] {
      if (auto it = lanes_.find(peer); it != lanes_.end()) {
        if (it->second->state == Lane::State::kReady) {
          inner_->notify(peer, staging::encode(staging::StagingClosed{it->second->token}), nullptr);
        }
        fail_lane(*it->second, Status(ErrorCode::kAborted, "disconnected"));
        retired_lanes_[peer] = std::move(it->second);  // its slots may still be read by UCX
        lanes_.erase(it);
      }
      for (auto it = regions_.begin(); it != regions_.end();) {
        it = it->second.peer == peer ? regions_.erase(it) : std::next(it);
      }
      return 0;
    });
    inner_->disconnect(peer);
    // UCX has finished or aborted every put from the lane's slots now; a gather still running on
    // the GPU or a worker must end before they are freed.
    call<int>([&] {
      while (mover_->poll()) std::this_thread::yield();
      mover_->drain();
      retired_lanes_.erase(peer);
      return 0;
    });
  }

  void put(PeerId peer, std::vector<PutOp> ops, Completion done) {
    inner_->post([this, peer, ops = std::move(ops), done = std::move(done)]() mutable {
      submit(peer, ops, std::move(done));
    });
  }

  void flush(PeerId peer, Completion done) {
    inner_->post([this, peer, done = std::move(done)]() mutable {
      auto it = lanes_.find(peer);
      if (it == lanes_.end()) return inner_->flush(peer, std::move(done));
      Lane& lane = *it->second;
      if (!lane.failure.ok()) return done(lane.failure);
      if (lane.open.empty()) return done(Status::Ok());
      lane.flushes.push_back(Flush{lane.next_seq - 1, std::move(done)});
    });
  }

  void notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) {
    inner_->notify(peer, bytes, std::move(done));
  }
  void set_notification_handler(NotificationHandler handler) {
    inner_->post([this, handler = std::move(handler)]() mutable { user_notification_ = std::move(handler); });
  }
  void set_peer_failure_handler(PeerFailureHandler handler) {
    inner_->post([this, handler = std::move(handler)]() mutable { user_failure_ = std::move(handler); });
  }
  Transport& inner() { return *inner_; }

 private:
  struct Region {
    PeerId peer = 0;
    uint64_t base = 0;
    uint64_t length = 0;
  };
  struct Batch {  // one put() call
    size_t chunks_left = 0;
    uint64_t seq = 0;
    Status status;
    Completion done;
  };
  struct Chunk {
    std::shared_ptr<Batch> batch;
    // src: KV; dst: offset into the slot; bytes: raw (a codec writes fewer into the slot).
    std::vector<gpudirect::CopySegment> gathers;
    std::vector<staging::ScatterPiece> pieces;  // the receiver's addresses, raw bytes
    uint64_t bytes = 0;                         // of the slot: what crosses the link
  };
  struct InFlight {
    Chunk chunk;
    uint32_t local = 0;
    uint32_t remote = 0;
  };
  struct Flush {
    uint64_t seq = 0;  // done once every batch up to this one has finished
    Completion done;
  };
  struct Lane {  // sender side, per peer
    enum class State { kRequested, kReady, kFailed } state = State::kRequested;
    uint64_t token = 0;
    uint32_t slots = 0;
    uint64_t slot_bytes = 0;
    std::optional<gpudirect::MemoryRegion> local;
    std::optional<gpudirect::PinnedRegistration> local_pinned;  // GPU: `local`, registered; goes first
    std::deque<uint32_t> free_local;
    RemoteRegionId remote_slots = 0;
    std::deque<uint32_t> free_remote;
    std::deque<Chunk> waiting;
    std::map<uint64_t, InFlight> in_flight;
    uint64_t next_batch = 1;
    uint64_t next_seq = 1;
    std::set<uint64_t> open;  // batches not finished yet
    std::vector<Flush> flushes;
    Status failure;
  };
  struct Sender {  // receiver side, per sender
    gpudirect::MemoryRegion slots;
    uint32_t count = 0;
    uint64_t slot_bytes = 0;
    PeerId back = 0;
    KvCodec codec = KvCodec::kIdentity;  // what its slots hold
    uint32_t row_bytes = 0;
    std::optional<gpudirect::PinnedRegistration> pinned;  // GPU: `slots`, registered; goes first
  };

  template <typename T>
  T call(const std::function<T()>& fn) {
    return call_on<T>(*inner_, fn);
  }

  // --- sender ------------------------------------------------------------------------------------
  void submit(PeerId peer, const std::vector<PutOp>& ops, Completion done) {
    Lane* lane = lane_for(peer);
    if (lane == nullptr) return done(lane_error_);
    if (!lane->failure.ok()) return done(lane->failure);
    auto batch = std::make_shared<Batch>();
    batch->done = std::move(done);
    std::vector<Chunk> chunks(1);
    const uint64_t slot_bytes = options_.slot_bytes;
    const uint64_t row = options_.row_bytes;
    const uint64_t encoded_row = encoded_row_bytes(options_.codec, options_.row_bytes);
    for (const PutOp& op : ops) {
      auto region = regions_.find(op.remote);
      if (region == regions_.end() || region->second.peer != peer ||
          op.remote_offset > region->second.length || op.length > region->second.length - op.remote_offset) {
        return batch->done(Status(ErrorCode::kInvalidArgument,
                                  "ucx_staged: put of " + std::to_string(op.length) + " bytes at offset " +
                                      std::to_string(op.remote_offset) + " outside region " +
                                      std::to_string(op.remote) + " of this peer"));
      }
      if (encoded_row != 0 && op.length % row != 0) {
        return batch->done(
            Status(ErrorCode::kInvalidArgument, "ucx_staged: a put of " + std::to_string(op.length) +
                                                    " bytes is not whole rows of " + std::to_string(row) +
                                                    " bytes, which the " +
                                                    std::string(protocol::codec_name(options_.codec)) +
                                                    " codec encodes (row_bytes = channels x 2)"));
      }
      const uint64_t src = reinterpret_cast<uint64_t>(op.local);
      const uint64_t dst = region->second.base + op.remote_offset;
      for (uint64_t at = 0; at < op.length;) {
        // Raw bytes that fit in what is left of the slot: whole rows with a codec.
        uint64_t take = 0, used = 0;
        for (int attempt = 0; attempt < 2 && take == 0; ++attempt) {
          if (chunks.back().bytes == slot_bytes || attempt == 1) chunks.emplace_back();
          const uint64_t room = slot_bytes - chunks.back().bytes;
          if (encoded_row == 0) {
            take = used = std::min(op.length - at, room);
          } else {
            const uint64_t rows = std::min((op.length - at) / row, room / encoded_row);
            take = rows * row;
            used = rows * encoded_row;
          }
        }
        Chunk& c = chunks.back();
        // A run continues the last one where both ends do (a codec encodes a piece as one run).
        const bool extends = !c.pieces.empty() &&
                             c.pieces.back().destination + c.pieces.back().bytes == dst + at &&
                             (encoded_row == 0 || c.gathers.back().src + c.gathers.back().bytes == src + at);
        if (extends && encoded_row != 0) {
          c.gathers.back().bytes += take;
        } else {
          c.gathers.push_back(gpudirect::CopySegment{src + at, c.bytes, take});
        }
        if (extends) {
          c.pieces.back().bytes += take;
        } else {
          c.pieces.push_back(staging::ScatterPiece{dst + at, take});
        }
        c.bytes += used;
        at += take;
      }
    }
    if (chunks.back().bytes == 0) chunks.pop_back();
    if (chunks.empty()) return batch->done(Status::Ok());
    batch->chunks_left = chunks.size();
    batch->seq = lane->next_seq++;
    lane->open.insert(batch->seq);
    for (Chunk& c : chunks) {
      c.batch = batch;
      lane->waiting.push_back(std::move(c));
    }
    pump(peer, *lane);
  }

  // The lane to `peer`, asking the receiver for slots the first time; null (lane_error_ says why)
  // when this side cannot stage at all.
  Lane* lane_for(PeerId peer) {
    if (auto it = lanes_.find(peer); it != lanes_.end()) return it->second.get();
    auto lane = std::make_unique<Lane>();
    lane->token = token_base_ | peer;
    lane->slots = options_.slots;
    lane->slot_bytes = options_.slot_bytes;
    auto local =
        gpudirect::MemoryRegion::allocate_host(context_, uint64_t{options_.slots} * options_.slot_bytes);
    if (!local.ok()) {
      lane_error_ = Status(local.status().code(), "ucx_staged: sender slots: " + local.status().message());
      return nullptr;
    }
    auto pinned = mover_->pin(local->data(), local->size());
    if (!pinned.ok()) {
      lane_error_ =
          Status(pinned.status().code(), "ucx_staged: pinning sender slots: " + pinned.status().message());
      return nullptr;
    }
    lane->local.emplace(std::move(local.value()));
    lane->local_pinned = std::move(pinned.value());
    for (uint32_t i = 0; i < options_.slots; ++i) lane->free_local.push_back(i);
    const uint64_t token = lane->token;
    Lane* raw = lanes_.emplace(peer, std::move(lane)).first->second.get();
    staging::StagingRequest request{token,
                                    options_.slots,
                                    options_.slot_bytes,
                                    address_,
                                    {},
                                    {},
                                    static_cast<uint8_t>(options_.codec),
                                    options_.codec == KvCodec::kIdentity ? 0 : options_.row_bytes};
    inner_->notify(peer, staging::encode(request), [this, peer, token](const Status& s) {
      if (!s.ok()) refused(peer, token, s);
    });
    inner_->post_after(options_.offer_timeout, [this, peer, token] {
      refused(peer, token,
              Status(ErrorCode::kTimeout,
                     "no staging offer within " + std::to_string(options_.offer_timeout.count()) + " ms"));
    });
    return raw;
  }

  Lane* lane_by_token(uint64_t token, PeerId* peer) {
    const auto p = static_cast<PeerId>(token & 0xffffffffu);
    auto it = lanes_.find(p);
    if ((token & ~uint64_t{0xffffffffu}) != token_base_ || it == lanes_.end() || it->second->token != token)
      return nullptr;
    *peer = p;
    return it->second.get();
  }

  void refused(PeerId peer, uint64_t token, const Status& why) {
    PeerId p = 0;
    Lane* lane = lane_by_token(token, &p);
    if (lane == nullptr || p != peer || lane->state != Lane::State::kRequested) return;
    spdlog::error("ucx_staged: no staging with peer {}: {}", peer, why.to_string());
    fail_lane(*lane, Status(why.code(), "ucx_staged: the receiver gives no staging slots: " + why.message()));
  }

  void offered(const staging::StagingOffer& offer) {
    PeerId peer = 0;
    Lane* lane = lane_by_token(offer.sender, &peer);
    if (lane == nullptr || lane->state != Lane::State::kRequested) return;
    if (offer.error != 0) return refused(peer, offer.sender, from_code(offer.error, offer.message));
    if (offer.slots != lane->slots || offer.slot_bytes != lane->slot_bytes || offer.cuda_ipc.size() <= 8) {
      return refused(peer, offer.sender, Status(ErrorCode::kMalformed, "an offer of other slots than asked"));
    }
    protocol::RegionDescriptor slots;
    slots.base_address = get_u64(offer.cuda_ipc.data());
    slots.length = uint64_t{offer.slots} * offer.slot_bytes;
    slots.ucx_rkey.assign(offer.cuda_ipc.begin() + 8, offer.cuda_ipc.end());
    // Importing blocks on this thread's queue: do it from a helper, then carry on here.
    const uint64_t token = offer.sender;
    helpers_.spawn([this, peer, token, slots] {
      auto imported = inner_->import_region(peer, slots);
      inner_->post([this, peer, token, imported] {
        PeerId p = 0;
        Lane* l = lane_by_token(token, &p);
        if (l == nullptr || l->state != Lane::State::kRequested) return;
        if (!imported.ok()) return refused(peer, token, imported.status());
        l->remote_slots = imported.value();
        for (uint32_t i = 0; i < l->slots; ++i) l->free_remote.push_back(i);
        l->state = Lane::State::kReady;
        pump(peer, *l);
      });
    });
  }

  void pump(PeerId peer, Lane& lane) {
    while (lane.state == Lane::State::kReady && !lane.waiting.empty() && !lane.free_local.empty() &&
           !lane.free_remote.empty()) {
      InFlight f{std::move(lane.waiting.front()), lane.free_local.front(), lane.free_remote.front()};
      lane.waiting.pop_front();
      lane.free_local.pop_front();
      lane.free_remote.pop_front();
      const uint64_t batch = lane.next_batch++;
      std::vector<gpudirect::CopySegment> gathers = f.chunk.gathers;
      const uint64_t base = reinterpret_cast<uint64_t>(lane.local->data()) + f.local * lane.slot_bytes;
      for (gpudirect::CopySegment& g : gathers) g.dst += base;
      lane.in_flight.emplace(batch, std::move(f));
      const uint64_t token = lane.token;
      mover_->transcode(coding(options_.codec, options_.row_bytes, true), std::move(gathers),
                        [this, peer, token, batch](const Status& s) { gathered(peer, token, batch, s); });
      keep_polling();
    }
  }

  void gathered(PeerId peer, uint64_t token, uint64_t batch, const Status& s) {
    PeerId p = 0;
    Lane* lane = lane_by_token(token, &p);
    if (lane == nullptr || lane->state != Lane::State::kReady) return;
    auto it = lane->in_flight.find(batch);
    if (it == lane->in_flight.end()) return;
    if (!s.ok()) return fail_lane(*lane, Status(s.code(), "ucx_staged: gather failed: " + s.message()));
    InFlight& f = it->second;
    const uint8_t* here = lane->local->data() + f.local * lane->slot_bytes;
    inner_->put(peer,
                {PutOp{here, &*lane->local, lane->remote_slots, f.remote * lane->slot_bytes, f.chunk.bytes}},
                nullptr);
    // The Scatter may go only once the bytes are there: behind a flush.
    inner_->flush(peer, [this, peer, token, batch](const Status& flushed) {
      PeerId q = 0;
      Lane* l = lane_by_token(token, &q);
      if (l == nullptr || l->state != Lane::State::kReady) return;
      auto f2 = l->in_flight.find(batch);
      if (f2 == l->in_flight.end()) return;
      if (!flushed.ok()) return fail_lane(*l, Status(flushed.code(), "ucx_staged: " + flushed.message()));
      l->free_local.push_back(f2->second.local);
      staging::Scatter scatter{token,
                               batch,
                               f2->second.remote,
                               f2->second.chunk.pieces,
                               static_cast<uint8_t>(options_.codec),
                               options_.codec == KvCodec::kIdentity ? 0 : options_.row_bytes};
      inner_->notify(peer, staging::encode(scatter), [this, token](const Status& sent) {
        if (sent.ok()) return;
        PeerId r = 0;
        if (Lane* l3 = lane_by_token(token, &r); l3 != nullptr) fail_lane(*l3, sent);
      });
      pump(peer, *l);
    });
  }

  void scattered(const staging::Scattered& answer) {
    PeerId peer = 0;
    Lane* lane = lane_by_token(answer.sender, &peer);
    if (lane == nullptr) return;
    auto it = lane->in_flight.find(answer.batch);
    if (it == lane->in_flight.end() || it->second.remote != answer.slot) {
      spdlog::warn("ucx_staged: peer {} answered batch {} slot {}, which is not in flight", peer,
                   answer.batch, answer.slot);
      return;
    }
    InFlight f = std::move(it->second);
    lane->in_flight.erase(it);
    lane->free_remote.push_back(f.remote);
    chunk_done(*lane, f.chunk,
               answer.error == 0 ? Status::Ok()
                                 : Status(static_cast<ErrorCode>(answer.error),
                                          "the receiver could not place staged bytes: " + answer.message));
    pump(peer, *lane);
  }

  void chunk_done(Lane& lane, Chunk& chunk, const Status& s) {
    Batch& b = *chunk.batch;
    if (!s.ok() && b.status.ok()) b.status = s;
    if (--b.chunks_left > 0) return;
    lane.open.erase(b.seq);
    if (b.done) b.done(b.status);
    const uint64_t oldest_open = lane.open.empty() ? UINT64_MAX : *lane.open.begin();
    for (auto it = lane.flushes.begin(); it != lane.flushes.end();) {
      if (it->seq < oldest_open) {
        Completion done = std::move(it->done);
        it = lane.flushes.erase(it);
        done(lane.failure);
      } else {
        ++it;
      }
    }
  }

  // Everything queued or in flight on the lane fails with `why`, and so does everything later.
  void fail_lane(Lane& lane, const Status& why) {
    if (lane.failure.ok()) lane.failure = why;
    lane.state = Lane::State::kFailed;
    std::vector<Chunk> chunks;
    for (Chunk& c : lane.waiting) chunks.push_back(std::move(c));
    lane.waiting.clear();
    for (auto& [batch, f] : lane.in_flight) chunks.push_back(std::move(f.chunk));
    lane.in_flight.clear();
    for (Chunk& c : chunks) chunk_done(lane, c, lane.failure);
    for (Flush& f : lane.flushes) f.done(lane.failure);
    lane.flushes.clear();
  }

  static SlotMover::Coding coding(KvCodec codec, uint32_t row_bytes, bool encode) {
    return SlotMover::Coding{codec, row_bytes / 2, encode};
  }

  void keep_polling() {
    if (!mover_->on_gpu() || polling_) return;
    polling_ = true;
    inner_->post_after(std::chrono::microseconds(5), [this] { poll_mover(); });
  }
  void poll_mover() {
    polling_ = false;
    if (mover_->poll()) keep_polling();
  }

  // --- receiver ----------------------------------------------------------------------------------
  void requested(staging::StagingRequest request) {
    if (!request.slot_events.empty() || !request.nccl_id.empty()) {
      spdlog::warn("ucx_staged: a sender asked for GPU staging slots (cuda_ipc or nccl); ignored");
      return;
    }
    auto parsed = parse(request.reply_address);
    if (!parsed.ok()) {
      spdlog::warn("ucx_staged: a staging request without a usable reply address: {}",
                   parsed.status().to_string());
      return;
    }
    if (auto known = senders_.find(request.sender); known != senders_.end()) {
      return send_offer(known->second.back, request);  // asked again: the same slots
    }
    // The connection back blocks on this thread's queue: make it from a helper.
    helpers_.spawn([this, request = std::move(request), parsed = std::move(parsed.value())]() mutable {
      auto back = inner_->connect(parsed.ucx, ConnectOptions{parsed.boot == boot_id()});
      inner_->post([this, back, request = std::move(request)] {
        if (!back.ok()) {
          spdlog::warn("ucx_staged: cannot answer sender {:016x}: {}", request.sender,
                       back.status().to_string());
          return;
        }
        back_senders_[back.value()] = request.sender;
        send_offer(back.value(), request);
      });
    });
  }

  void send_offer(PeerId back, const staging::StagingRequest& request) {
    staging::StagingOffer offer{request.sender, 0, 0, {}, 0, {}};
    auto refuse = [&](const Status& s) {
      spdlog::warn("ucx_staged: refused sender {:016x}: {}", request.sender, s.to_string());
      offer.error = static_cast<uint32_t>(s.code());
      offer.message = s.message();
      inner_->notify(back, staging::encode(offer), nullptr);
    };
    auto it = senders_.find(request.sender);
    if (it == senders_.end()) {
      const auto codec = static_cast<KvCodec>(request.codec);
      if (codec != options_.codec || (codec != KvCodec::kIdentity && options_.row_bytes != 0 &&
                                      request.row_bytes != options_.row_bytes)) {
        return refuse(Status(ErrorCode::kInvalidArgument,
                             "the sender encodes its slots as " + describe_codec(codec, request.row_bytes) +
                                 ", this receiver takes " +
                                 describe_codec(options_.codec, options_.row_bytes) +
                                 ": give both sides the same codec and row size"));
      }
      if (codec != KvCodec::kIdentity &&
          (mover_->on_gpu() || encoded_row_bytes(codec, request.row_bytes) > request.slot_bytes)) {
        return refuse(Status(ErrorCode::kInvalidArgument,
                             mover_->on_gpu() ? "this receiver's KV is on a GPU, where slots are not decoded"
                                              : "a slot of " + std::to_string(request.slot_bytes) +
                                                    " bytes holds no encoded row of " +
                                                    std::to_string(request.row_bytes) + " bytes"));
      }
      const uint64_t bytes = uint64_t{request.slots} * request.slot_bytes;
      if (allocated_ + bytes > options_.receive_limit) {
        return refuse(Status(ErrorCode::kOutOfMemory, "staging " + std::to_string(bytes >> 20) +
                                                          " MiB would pass this receiver's limit of " +
                                                          std::to_string(options_.receive_limit >> 20) +
                                                          " MiB"));
      }
      // UCX-allocated: on one host UCX exports it as shared memory, so a sender's put is a memcpy
      // into it (ordinary pages would go through cma or tcp).
      auto slots = gpudirect::MemoryRegion::allocate_ucx(context_, bytes);
      if (!slots.ok()) return refuse(slots.status());
      auto pinned = mover_->pin(slots->data(), slots->size());
      if (!pinned.ok()) return refuse(pinned.status());
      allocated_ += bytes;
      spdlog::info("ucx_staged: {} slots of {} MiB at {} for sender {:016x}{}", request.slots,
                   request.slot_bytes >> 20, static_cast<const void*>(slots->data()), request.sender,
                   pinned.value() && !pinned.value()->owned() ? " (page-locked by UCX already)" : "");
      it = senders_
               .emplace(request.sender, Sender{std::move(slots.value()), request.slots, request.slot_bytes,
                                               back, codec, request.row_bytes, std::move(pinned.value())})
               .first;
    }
    const protocol::RegionDescriptor d = it->second.slots.descriptor(0);
    offer.slots = it->second.count;
    offer.slot_bytes = it->second.slot_bytes;
    put_u64(offer.cuda_ipc, d.base_address);
    offer.cuda_ipc.insert(offer.cuda_ipc.end(), d.ucx_rkey.begin(), d.ucx_rkey.end());
    inner_->notify(back, staging::encode(offer), nullptr);
  }

  void scatter_requested(const staging::Scatter& scatter) {
    staging::Scattered answer{scatter.sender, scatter.batch, scatter.slot, 0, {}};
    auto it = senders_.find(scatter.sender);
    if (it == senders_.end()) return;  // no slots were offered to it: nothing to answer through
    Sender& s = it->second;
    const PeerId back = s.back;
    auto fail = [&](const Status& why) {
      answer.error = static_cast<uint32_t>(why.code());
      answer.message = why.message();
      inner_->notify(back, staging::encode(answer), nullptr);
    };
    if (closing_) return fail(Status(ErrorCode::kAborted, "the receiver is shutting down"));
    if (scatter.slot >= s.count) return fail(Status(ErrorCode::kInvalidArgument, "no such slot"));
    if (!scatter.sends.empty())
      return fail(Status(ErrorCode::kInvalidArgument, "a scatter in NCCL sends on host staging"));
    const auto codec = static_cast<KvCodec>(scatter.codec);
    if (codec != s.codec || (codec != KvCodec::kIdentity && scatter.row_bytes != s.row_bytes)) {
      return fail(Status(ErrorCode::kInvalidArgument, "a scatter of " +
                                                          describe_codec(codec, scatter.row_bytes) +
                                                          " from a sender that asked for " +
                                                          describe_codec(s.codec, s.row_bytes) + " slots"));
    }
    const uint64_t encoded_row = encoded_row_bytes(s.codec, s.row_bytes);
    const uint64_t slot_base = reinterpret_cast<uint64_t>(s.slots.data()) + scatter.slot * s.slot_bytes;
    std::vector<gpudirect::CopySegment> segments;
    uint64_t offset = 0;
    for (const staging::ScatterPiece& piece : scatter.pieces) {
      if (encoded_row != 0 && piece.bytes % s.row_bytes != 0) {
        return fail(Status(ErrorCode::kInvalidArgument, "a scatter piece of " + std::to_string(piece.bytes) +
                                                            " bytes is not whole rows of " +
                                                            std::to_string(s.row_bytes) + " bytes"));
      }
      // What the piece takes of the slot: its raw bytes, or its encoded rows.
      const uint64_t in_slot = encoded_row == 0 ? piece.bytes : piece.bytes / s.row_bytes * encoded_row;
      if (in_slot > s.slot_bytes - offset) {
        return fail(Status(ErrorCode::kInvalidArgument,
                           "the scatter names more bytes than a slot holds (" +
                               std::to_string(offset + in_slot) + " of " + std::to_string(s.slot_bytes) +
                               " in slot bytes by piece " + std::to_string(segments.size()) + ")"));
      }
      const auto* dst = reinterpret_cast<const void*>(piece.destination);
      if (Status c = mover_->check_kv_memory(dst, piece.bytes); !c.ok()) return fail(c);
      for (const auto& [token, other] : senders_) {
        if (other.slots.contains(dst, 1) ||
            (piece.destination < reinterpret_cast<uint64_t>(other.slots.data()) &&
             piece.destination + piece.bytes > reinterpret_cast<uint64_t>(other.slots.data()))) {
          return fail(Status(ErrorCode::kInvalidArgument, "a scatter destination lies in staging memory"));
        }
      }
      segments.push_back(gpudirect::CopySegment{slot_base + offset, piece.destination, piece.bytes});
      offset += in_slot;
    }
    mover_->transcode(coding(s.codec, s.row_bytes, false), std::move(segments),
                      [this, back, answer](const Status& done) mutable {
                        if (!done.ok()) {
                          answer.error = static_cast<uint32_t>(done.code());
                          answer.message = done.message();
                        }
                        inner_->notify(back, staging::encode(answer), nullptr);
                      });
    keep_polling();
  }

  // A sender closed or died: its slots go once nothing reads them (the mover is idle for it only
  // when nothing of it is queued: on the GPU or the workers, wait for the queue to drain first).
  void forget_sender(uint64_t token) {
    auto it = senders_.find(token);
    if (it == senders_.end()) return;
    back_senders_.erase(it->second.back);
    if (mover_->on_gpu()) {
      while (mover_->poll()) std::this_thread::yield();  // short: one slot's scatter at most per slot
    }
    mover_->drain();
    allocated_ -= it->second.slots.size();
    spdlog::info("ucx_staged: sender {:016x} gone; its {} MiB of slots at {} freed", token,
                 it->second.slots.size() >> 20, static_cast<const void*>(it->second.slots.data()));
    senders_.erase(it);
  }

  // --- both --------------------------------------------------------------------------------------
  void on_notification(std::span<const uint8_t> bytes) {
    if (!staging::is_staging_message(bytes)) {
      if (user_notification_) user_notification_(bytes);
      return;
    }
    auto message = staging::decode(bytes);
    if (!message.ok()) {
      spdlog::warn("ucx_staged: dropped a staging message: {}", message.status().to_string());
      // A Scatter this build cannot read is still answered: the sender's put fails now, with the
      // reason, instead of by its timeout.
      if (auto ids = staging::scatter_ids(bytes)) {
        if (auto it = senders_.find(ids->sender); it != senders_.end())
          inner_->notify(it->second.back, staging::encode(staging::refusal(*ids, message.status())), nullptr);
      }
      return;
    }
    std::visit(
        [this](auto& m) {
          using T = std::decay_t<decltype(m)>;
          if constexpr (std::is_same_v<T, staging::StagingRequest>) {
            requested(std::move(m));
          } else if constexpr (std::is_same_v<T, staging::StagingOffer>) {
            offered(m);
          } else if constexpr (std::is_same_v<T, staging::Scatter>) {
            scatter_requested(m);
          } else if constexpr (std::is_same_v<T, staging::StagingClosed>) {
            forget_sender(m.sender);
          } else {
            scattered(m);
          }
        },
        message.value());
  }

  void on_peer_failure(PeerId peer, const Status& why) {
    if (auto back = back_senders_.find(peer); back != back_senders_.end()) return forget_sender(back->second);
    if (auto lane = lanes_.find(peer); lane != lanes_.end()) {
      fail_lane(*lane->second, Status(ErrorCode::kPeerLost, "peer lost: " + why.message()));
    }
    if (user_failure_) user_failure_(peer, why);
  }

  std::shared_ptr<gpudirect::UcxContext> context_;
  StagedTransportOptions options_;
  std::unique_ptr<UcxTransport> inner_;
  std::unique_ptr<SlotMover> mover_;
  std::vector<uint8_t> address_;
  uint64_t token_base_ = 0;
  // Progress-thread state.
  std::unordered_map<RemoteRegionId, Region> regions_;
  RemoteRegionId next_region_ = 1;
  std::map<PeerId, std::unique_ptr<Lane>> lanes_;
  std::map<PeerId, std::unique_ptr<Lane>> retired_lanes_;  // disconnecting: slots freed after it
  Status lane_error_;
  std::unordered_map<uint64_t, Sender> senders_;       // by sender token
  std::unordered_map<PeerId, uint64_t> back_senders_;  // connection back -> sender token
  uint64_t allocated_ = 0;
  bool polling_ = false;
  bool closing_ = false;
  NotificationHandler user_notification_;
  PeerFailureHandler user_failure_;
  HelperThreads helpers_;
};

Result<std::unique_ptr<StagedTransport>> StagedTransport::create(
    std::shared_ptr<gpudirect::UcxContext> context, StagedTransportOptions options) {
  if (options.slots == 0 || options.slots > staging::kMaxSlots || options.slot_bytes == 0 ||
      options.slot_bytes > staging::kMaxSlotBytes) {
    return Status(ErrorCode::kInvalidArgument,
                  "ucx_staged: 1 to " + std::to_string(staging::kMaxSlots) + " slots of at most 1 GiB each");
  }
  if (!streamable(options.codec)) {
    return Status(ErrorCode::kInvalidArgument, "ucx_staged: codec " +
                                                   std::string(protocol::codec_name(options.codec)) +
                                                   " cannot stream: identity, int8 or fp8");
  }
  if (options.codec != KvCodec::kIdentity) {
    if (options.device >= 0) {
      return Status(ErrorCode::kUnavailable,
                    "ucx_staged: KV codecs run on host memory; GPU KV is staged raw (codec identity)");
    }
    if (options.row_bytes == 0 || options.row_bytes % 2 != 0 || options.row_bytes > staging::kMaxRowBytes) {
      return Status(ErrorCode::kInvalidArgument, "ucx_staged: codec " +
                                                     std::string(protocol::codec_name(options.codec)) +
                                                     " needs row_bytes (channels x 2: even, 2 to " +
                                                     std::to_string(staging::kMaxRowBytes) + "), got " +
                                                     std::to_string(options.row_bytes));
    }
    if (encoded_row_bytes(options.codec, options.row_bytes) > options.slot_bytes) {
      return Status(ErrorCode::kInvalidArgument,
                    "ucx_staged: a slot of " + std::to_string(options.slot_bytes) +
                        " bytes holds no encoded row of " + std::to_string(options.row_bytes) + " bytes");
    }
  }
  if (options.workers > 16) return Status(ErrorCode::kInvalidArgument, "ucx_staged: at most 16 workers");
  auto inner = UcxTransport::create(context, options.ucx);
  if (!inner.ok()) return inner.status();
  // Workers hand their completions to the progress thread; the transport drains them before the
  // inner transport goes.
  UcxTransport* progress = inner.value().get();
  auto mover = SlotMover::create(options.device, options.device >= 0 ? 0 : options.workers,
                                 [progress](std::function<void()> fn) { progress->post(std::move(fn)); });
  if (!mover.ok()) return mover.status();
  return std::unique_ptr<StagedTransport>(new StagedTransport(std::make_unique<Impl>(
      std::move(context), options, std::move(inner.value()), std::move(mover.value()))));
}

StagedTransport::StagedTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StagedTransport::~StagedTransport() = default;

std::vector<uint8_t> StagedTransport::address() const {
  return impl_->address();
}
Result<PeerId> StagedTransport::connect(std::span<const uint8_t> address, const ConnectOptions& options) {
  return impl_->connect(address, options);
}
Result<RemoteRegionId> StagedTransport::import_region(PeerId peer, const protocol::RegionDescriptor& region) {
  return impl_->import_region(peer, region);
}
void StagedTransport::disconnect(PeerId peer) {
  impl_->disconnect(peer);
}
void StagedTransport::put(PeerId peer, std::vector<PutOp> ops, Completion done) {
  impl_->put(peer, std::move(ops), std::move(done));
}
void StagedTransport::flush(PeerId peer, Completion done) {
  impl_->flush(peer, std::move(done));
}
void StagedTransport::notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) {
  impl_->notify(peer, bytes, std::move(done));
}
void StagedTransport::set_notification_handler(NotificationHandler handler) {
  impl_->set_notification_handler(std::move(handler));
}
void StagedTransport::set_peer_failure_handler(PeerFailureHandler handler) {
  impl_->set_peer_failure_handler(std::move(handler));
}
void StagedTransport::post(std::function<void()> fn) {
  impl_->inner().post(std::move(fn));
}
void StagedTransport::post_after(std::chrono::nanoseconds delay, std::function<void()> fn) {
  impl_->inner().post_after(delay, std::move(fn));
}

}  // namespace kvf::fabric
