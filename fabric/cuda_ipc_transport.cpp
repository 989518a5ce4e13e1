#include "kvf/fabric/cuda_ipc_transport.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>

#include <spdlog/spdlog.h>

#include "cuda_staging_receiver.h"
#include "helper_threads.h"
#include "kvf/fabric/copy_choice.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/nccl_comm.h"
#include "kvf/gpudirect/paged_copy.h"
#include "kvf/gpudirect/resident_plan_cache.h"
#include "kvf/gpudirect/segment_copier.h"
#include "kvf/protocol/staging_messages.h"

namespace kvf::fabric {
namespace {

// address(): magic, version, device, boot id (which host), the inner UCX worker address.
constexpr uint32_t kAddressMagic = 0x4b564349;      // "KVCI"
constexpr uint32_t kNcclAddressMagic = 0x4b56434e;  // "KVCN": the same address, nccl transport
constexpr uint16_t kAddressVersion = 1;

std::string this_boot_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id;
}

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

struct ParsedAddress {
  int device = 0;
  std::string boot_id;
  std::vector<uint8_t> ucx;
};

Result<ParsedAddress> parse_address(std::span<const uint8_t> a) {
  // magic u32, version u16, device u32, boot id length u32 + bytes, then the UCX address.
  if (a.size() < 14 || (get_u32(a.data()) != kAddressMagic && get_u32(a.data()) != kNcclAddressMagic)) {
    return Status(ErrorCode::kUnavailable,
                  "the peer offers no cuda_ipc transport (its address is not a cuda_ipc address; "
                  "run both sides with --transport cuda_ipc)");
  }
  uint16_t version = static_cast<uint16_t>(a[4] | (a[5] << 8));
  if (version != kAddressVersion) {
    return Status(ErrorCode::kUnsupportedVersion, "cuda_ipc address version " + std::to_string(version) +
                                                      ", this build speaks " +
                                                      std::to_string(kAddressVersion));
  }
  ParsedAddress p;
  p.device = static_cast<int>(get_u32(a.data() + 6));
  uint32_t id_len = get_u32(a.data() + 10);
  if (id_len > 64 || a.size() < 14 + id_len)
    return Status(ErrorCode::kMalformed, "truncated cuda_ipc address");
  p.boot_id.assign(reinterpret_cast<const char*>(a.data() + 14), id_len);
  p.ucx.assign(a.begin() + 14 + id_len, a.end());
  if (p.ucx.empty()) return Status(ErrorCode::kMalformed, "cuda_ipc address without a UCX address");
  return p;
}

}  // namespace

std::string_view transport_kind_of_address(std::span<const uint8_t> address) {
  if (address.size() < 4) return "ucx";
  if (get_u32(address.data()) == kAddressMagic) return "cuda_ipc";
  if (get_u32(address.data()) == kNcclAddressMagic) return "nccl";
  return "ucx";
}

class CudaIpcTransport::Impl {
 public:
  Impl(CudaIpcTransportOptions options, std::unique_ptr<UcxTransport> inner,
       std::vector<gpudirect::CudaStream> streams, std::unique_ptr<gpudirect::SegmentCopier> copier)
      : options_(options),
        inner_(std::move(inner)),
        streams_(std::move(streams)),
        copier_(std::move(copier)) {
    address_.reserve(64);
    put_u32(address_, nccl() ? kNcclAddressMagic : kAddressMagic);
    address_.push_back(static_cast<uint8_t>(kAddressVersion));
    address_.push_back(static_cast<uint8_t>(kAddressVersion >> 8));
    put_u32(address_, static_cast<uint32_t>(options_.device));
    std::string boot = this_boot_id();
    put_u32(address_, static_cast<uint32_t>(boot.size()));
    address_.insert(address_.end(), boot.begin(), boot.end());
    auto ucx = inner_->address();
    address_.insert(address_.end(), ucx.begin(), ucx.end());
    receiver_ = std::make_unique<StagingReceiver>(
        options_.device, *copier_,
        [this](const gpudirect::CudaStream& stream, std::function<void(const Status&)> done) {
          enqueue_events({&stream}, std::move(done));
        },
        options_.staging_receive_limit);
    inner_->set_notification_handler([this](std::span<const uint8_t> bytes) { on_notification(bytes); });
    inner_->set_peer_failure_handler([this](PeerId peer, const Status& s) { on_peer_failure(peer, s); });
  }

  ~Impl() {
    stopping_ = true;  // an NCCL join still waiting for its peer gives up now
    helpers_.join_all();
    // The nccl lanes' communicators close in step with their receivers (told below), here on the
    // caller's thread while the inner transport still carries the message.
    std::vector<gpudirect::NcclComm> closing = call<std::vector<gpudirect::NcclComm>>([this] {
      for (auto& [peer, lane] : lanes_) quiesce_lane(*lane, "transport shut down");
      synchronize_all();
      std::vector<gpudirect::NcclComm> comms;
      for (auto& [peer, lane] : lanes_) {
        if (auto c = close_lane(peer, *lane); c.valid()) comms.push_back(std::move(c));
      }
      return comms;
    });
    for (gpudirect::NcclComm& c : closing) {
      if (Status s = c.close(kNcclCloseTimeout); !s.ok()) spdlog::warn("nccl: {}", s.to_string());
    }
    // Nothing may still write through a mapping that is about to be closed.
    call<int>([this] {
      synchronize_all();
      if (adaptive_direct_ + adaptive_staged_ > 0) {
        spdlog::info("cuda_ipc (GPU {}): adaptive copies chose direct for {} puts, staged for {}",
                     options_.device, adaptive_direct_, adaptive_staged_);
      }
      report_trace();
      const Status down(ErrorCode::kAborted, "transport shut down");
      for (auto& [peer, lane] : lanes_) fail_lane(*lane, down);
      complete_all(down);
      regions_.clear();
      peers_.clear();
      events_.clear();
      lanes_.clear();
      receiver_.reset();
      free_events_.clear();
      user_notification_handler_ = nullptr;
      user_failure_handler_ = nullptr;
      return 0;
    });
    helpers_.join_all();  // communicators of senders closed while serving
    inner_.reset();
  }

  void set_notification_handler(NotificationHandler handler) {
    inner_->post(
        [this, handler = std::move(handler)]() mutable { user_notification_handler_ = std::move(handler); });
  }
  void set_peer_failure_handler(PeerFailureHandler handler) {
    inner_->post(
        [this, handler = std::move(handler)]() mutable { user_failure_handler_ = std::move(handler); });
  }

  const std::vector<uint8_t>& address() const { return address_; }
  bool nccl() const { return options_.copy == CudaCopyMethod::kNccl; }
  // Whether any put may go through the receiver's staging (and so needs the peer's own addresses).
  bool may_stage() const {
    return options_.copy == CudaCopyMethod::kStaged || options_.copy == CudaCopyMethod::kAdaptive || nccl();
  }
  std::string_view name() const { return nccl() ? "nccl" : "cuda_ipc"; }
  uint64_t suggested_inflight_bytes() const {
    if (!may_stage()) return 0;
    return 2 * uint64_t{options_.staging_remote_slots} * staging_slot_bytes();
  }
  int device() const { return options_.device; }
  Transport& inner() { return *inner_; }

  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options) {
    auto parsed = parse_address(address);
    if (!parsed.ok()) return parsed.status();
    if (transport_kind_of_address(address) != name()) {
      return Status(ErrorCode::kUnavailable, "the peer runs the " +
                                                 std::string(transport_kind_of_address(address)) +
                                                 " transport and this side " + std::string(name()) +
                                                 ": start both with the same --transport");
    }
    if (!nccl() && parsed->boot_id != this_boot_id()) {
      return Status(ErrorCode::kUnavailable,
                    "cuda_ipc needs the peer on this host; it runs on another (boot id " + parsed->boot_id +
                        "): use the ucx or nccl transport between hosts");
    }
    ConnectOptions inner_options = options;
    inner_options.same_host = options.same_host || parsed->boot_id == this_boot_id();
    auto peer = inner_->connect(parsed->ucx, inner_options);
    if (!peer.ok()) return peer.status();
    call<int>([&] {
      peers_[peer.value()] = Peer{parsed->device, {}, 0};
      return 0;
    });
    return peer;
  }

  Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) {
    if (region.kind != protocol::MemoryKind::kCudaDevice) {
      auto id = inner_->import_region(peer, region);
      if (!id.ok()) return id.status();
      return call<Result<RemoteRegionId>>([&]() -> Result<RemoteRegionId> {
        RemoteRegionId mine = next_region_++;
        regions_[mine] = Region{peer, false, nullptr, region.length, id.value(), nullptr};
        return mine;
      });
    }
    if (region.cuda_ipc.size() < 8) {
      return Status(
          ErrorCode::kInvalidArgument,
          "region " + std::to_string(region.region_id) +
              " is GPU memory without a CUDA IPC handle (the peer's build or memory cannot export one)");
    }
    if (nccl()) {
      // NCCL moves the bytes and the receiver places them: nothing of the peer is mapped here
      // (it may run on another host); the receiver checks every destination it is given.
      return call<Result<RemoteRegionId>>([&]() -> Result<RemoteRegionId> {
        if (peers_.find(peer) == peers_.end())
          return Status(ErrorCode::kNotFound, "unknown peer " + std::to_string(peer));
        RemoteRegionId mine = next_region_++;
        regions_[mine] = Region{peer, true, nullptr, region.length, 0, nullptr, region.base_address};
        return mine;
      });
    }
    return call<Result<RemoteRegionId>>([&]() -> Result<RemoteRegionId> {
      auto p = peers_.find(peer);
      if (p == peers_.end()) return Status(ErrorCode::kNotFound, "unknown peer " + std::to_string(peer));
      // The blob is the exporter's base address of the allocation's exported range, then the
      // CUDA IPC blob; one mapping per allocation serves every region cut from it.
      uint64_t exported_base = get_u64(region.cuda_ipc.data());
      std::vector<uint8_t> blob(region.cuda_ipc.begin() + 8, region.cuda_ipc.end());
      // Direct puts write from this GPU, so the allocation is mapped here, once. (Staged puts
      // name the receiver's own addresses; the mapping checks the region lies inside it.)
      std::shared_ptr<gpudirect::CudaIpcMapping>& mapping = p->second.mappings[blob];
      if (!mapping) {
        auto opened = gpudirect::CudaIpcMapping::open(blob, options_.device);
        if (!opened.ok()) {
          p->second.mappings.erase(blob);
          return Status(opened.status().code(), "mapping the peer's GPU region " +
                                                    std::to_string(region.region_id) + ": " +
                                                    opened.status().message());
        }
        mapping = std::make_shared<gpudirect::CudaIpcMapping>(std::move(opened.value()));
      }
      if (region.base_address < exported_base || region.base_address - exported_base > mapping->size() ||
          region.length > mapping->size() - (region.base_address - exported_base)) {
        return Status(ErrorCode::kInvalidArgument,
                      "region " + std::to_string(region.region_id) + " lies outside the allocation it names");
      }
      RemoteRegionId mine = next_region_++;
      uint8_t* base = static_cast<uint8_t*>(mapping->data()) + (region.base_address - exported_base);
      regions_[mine] = Region{peer, true, base, region.length, 0, mapping, region.base_address};
      if (options_.copy == CudaCopyMethod::kAdaptive) {
        // Staging helps only across the link; between processes on one GPU it adds copies.
        auto where = gpudirect::device_allocation_of(base);
        regions_[mine].other_gpu = !where.ok() || where->device != options_.device;
      }
      return mine;
    });
  }

  void disconnect(PeerId peer) {
    gpudirect::NcclComm closing = call<gpudirect::NcclComm>([&] {
      // No copy may still use the peer's mappings. (Other peers' lanes are not waited for: a
      // hand-over lane may wait on its receiver, which would hold this thread.)
      if (auto lane = lanes_.find(peer); lane != lanes_.end()) {
        quiesce_lane(*lane->second, "disconnected");
        synchronize_lane(*lane->second);
      }
      for (const auto& stream : streams_) (void)stream.synchronize();
      poll();
      for (auto it = regions_.begin(); it != regions_.end();) {
        it = it->second.peer == peer ? regions_.erase(it) : std::next(it);
      }
      peers_.erase(peer);
      gpudirect::NcclComm comm;
      if (auto lane = lanes_.find(peer); lane != lanes_.end()) {
        comm = close_lane(peer, *lane->second);
        fail_lane(*lane->second, Status(ErrorCode::kAborted, "disconnected"));
        lanes_.erase(lane);
      }
      return comm;
    });
    if (Status s = closing.close(kNcclCloseTimeout); !s.ok()) spdlog::warn("nccl: {}", s.to_string());
    inner_->disconnect(peer);
  }

  void put(PeerId peer, std::vector<PutOp> ops, void* wait_event, Completion done) {
    // On the progress thread (the scheduler dispatches there) the put starts at once. Posted, it
    // would queue behind every task already waiting, which at a request's start are the
    // scheduler's other layers: the first copy then launched only after all of them had been
    // taken (~90 us for 32 contiguous layers, ~150 us for shuffled ones, on one H200). A caller's
    // puts still start in the order it made them, and its later flush (also at once) covers them.
    if (inner_->on_progress_thread()) {
      HostTimer timed = time_host(HostWork::kPut);
      return start_put(peer, std::move(ops), wait_event, std::move(done));
    }
    inner_->post([this, peer, ops = std::move(ops), wait_event, done = std::move(done)]() mutable {
      HostTimer timed = time_host(HostWork::kPut);
      start_put(peer, std::move(ops), wait_event, std::move(done));
    });
  }

  void flush(PeerId peer, Completion done) {
    // As put: at once on the progress thread, or the layer's completion would be seen only once
    // the tasks queued before this flush have run (~60 us late at a request's start, one H200).
    if (inner_->on_progress_thread()) return start_flush(peer, std::move(done));
    inner_->post([this, peer, done = std::move(done)]() mutable { start_flush(peer, std::move(done)); });
  }

  void start_flush(PeerId peer, Completion done) {
    auto p = peers_.find(peer);
    if (p == peers_.end()) {
      if (done) done(Status(ErrorCode::kNotFound, "flush: unknown peer " + std::to_string(peer)));
      return;
    }
    bool host_puts = p->second.host_puts_since_flush > 0;
    p->second.host_puts_since_flush = 0;
    // Staged puts are complete when the receiver has answered for them (they finish in order).
    if (auto lane = lanes_.find(peer);
        lane != lanes_.end() && lane->second->completed < lane->second->submitted) {
      done = [this, peer, target = lane->second->submitted, done = std::move(done)](const Status& s) mutable {
        auto l = lanes_.find(peer);
        if (s.ok() && l == lanes_.end()) {
          if (done) done(Status(ErrorCode::kAborted, "disconnected before its staged puts finished"));
          return;
        }
        if (!s.ok() || l->second->completed >= target) {
          if (done) done(s);
          return;
        }
        l->second->flushes.emplace_back(target, std::move(done));
      };
    }
    // Everything before this point on every stream is finished when these events are.
    enqueue_events(all_streams(), [this, peer, host_puts, done = std::move(done)](const Status& s) mutable {
      if (!s.ok() || !host_puts) {
        if (done) done(s);
        return;
      }
      inner_->flush(peer, std::move(done));
    });
  }

  template <typename T>
  T call(const std::function<T()>& fn) {
    return call_on<T>(*inner_, fn);
  }

 private:
  struct Peer {
    int device = 0;
    std::map<std::vector<uint8_t>, std::shared_ptr<gpudirect::CudaIpcMapping>> mappings;
    uint64_t host_puts_since_flush = 0;
    uint32_t direct_in_flight = 0;  // direct GPU puts not yet complete (kAdaptive's "link busy")
  };
  struct Region {
    PeerId peer = 0;
    bool cuda = false;
    uint8_t* mapped = nullptr;  // this process's address of the region's first byte
    uint64_t length = 0;
    RemoteRegionId inner = 0;  // host regions: the id on the inner transport
    std::shared_ptr<gpudirect::CudaIpcMapping> mapping;
    uint64_t peer_address = 0;  // the peer's own address of the region's first byte
    bool other_gpu = true;      // the region lies on another GPU than this transport's
  };
  struct PendingEvent {
    std::vector<gpudirect::CudaEvent> events;  // all must have fired
    std::function<void(const Status&)> done;
  };
  // Sender side of staged puts to one peer (see the header). A put is cut into chunks of at most
  // one slot; a chunk takes a free slot on the receiver, is gathered into one of this GPU's two
  // local slots on gather_stream, copied by the copy engines into the receiver's slot on
  // copy_stream (events chain the two, so the host never waits), and once the copy has finished
  // the receiver is told to scatter it. Its answer frees the slot and completes the chunk. Puts
  // complete in order, because the receiver scatters one sender's chunks in order on one stream.
  struct StagedPut {
    std::vector<PutOp> ops;  // kept until the offer decides between staging and direct copies
    void* wait_event = nullptr;
    Completion done;
    uint32_t chunks_left = 0;
    Status status = Status::Ok();
  };
  struct StagedChunk {
    std::shared_ptr<StagedPut> put;
    bool first_of_put = false;
    std::vector<gpudirect::CopySegment> gathers;  // dst: the offset inside the slot
    std::vector<staging::ScatterPiece> pieces;
    uint64_t bytes = 0;
    // Chunks of later puts packed into this one's slot (see pump), and the engine events their
    // gathers wait for: one copy then carries several layers.
    std::vector<std::shared_ptr<StagedPut>> packed = {};
    std::vector<void*> packed_waits = {};
  };
  struct StagedLane {
    enum class State { kRequested, kReady, kDirect } state = State::kRequested;
    uint64_t token = 0;  // names this lane in the staging messages
    gpudirect::DeviceBuffer here;
    gpudirect::CudaStream gather_stream;
    gpudirect::CudaStream copy_stream;
    // staging_copy_streams > 1: the other parts of each copy, and an event each that
    // copy_stream waits for before it marks the copy done.
    std::vector<gpudirect::CudaStream> extra_copy_streams;
    std::vector<gpudirect::CudaEvent> extra_copied;
    std::vector<gpudirect::CudaEvent> gathered, copied;  // per local slot
    std::vector<bool> local_used;
    uint32_t next_local = 0;
    std::vector<gpudirect::CudaEvent> filled;           // per receiver slot (interprocess): its copy is done
    gpudirect::NcclComm comm;                           // the nccl transport: slots go by ncclSend
    bool offered = false, joined = false;               // nccl: ready once both have happened
    Status failure;                                     // why the lane copies directly (or, nccl, fails)
    std::unique_ptr<gpudirect::CudaIpcMapping> remote;  // the receiver's slots, mapped here
    uint32_t remote_slots = 0;
    uint64_t slot_bytes = 0;
    std::deque<uint32_t> free_remote;  // without hand-over: receiver slots whose answer came
    // GPU hand-over (see kHandoverInFlight): the receiver's stream sets freed[s] to a use of
    // slot s once it has scattered it; this side's copy into slot s for use u waits on the GPU
    // for freed[s] >= u - 1, then sets the receiver's ready[s] to u. Slots go round-robin.
    bool handover = false;
    gpudirect::DeviceBuffer freed;  // this GPU: one uint32 a receiver slot, zeroed
    gpudirect::CudaStream release;  // writes freed when the receiver will not (it died, we close)
    uint32_t* ready = nullptr;      // the receiver's counters, inside `remote`
    std::vector<uint32_t> uses;     // per receiver slot, chunks launched into it so far
    uint32_t next_remote = 0;
    std::deque<std::shared_ptr<StagedPut>> unoffered;  // puts made before the offer came
    std::deque<StagedChunk> waiting;                   // chunks waiting for a receiver slot
    uint32_t copies_unfinished = 0;  // with staging_copies_ahead: launched copies not yet seen done
    std::map<uint64_t, std::vector<std::shared_ptr<StagedPut>>> in_flight;  // by batch: its chunks' puts
    uint64_t next_batch = 1;
    uint64_t submitted = 0, completed = 0;                 // staged puts
    std::vector<std::pair<uint64_t, Completion>> flushes;  // run when completed >= first
  };
  static constexpr uint32_t kLocalSlots = 2;
  // With hand-over, chunks launched and not yet answered, at most. Below the copier's 8
  // descriptor slots: a gather reusing one (copier_->copy blocks the host until the launch that
  // last used it is done) then always waits for an answered chunk's gather, never for one that
  // waits on the GPU for the receiver, whose scatter needs this thread's UCX progress.
  static constexpr size_t kHandoverInFlight = 6;
  // 64 MiB (two Llama-3-8B layers of 8192 tokens) for both: a staged copy of 64 MiB ran at 0.97
  // of one 1 GiB copy (32 MiB: 0.93), and one 32 MiB ncclSend at 0.86 of a 1 GiB one (128 MiB:
  // 0.95), so 32 MiB sends alone keep the nccl path under 0.9x (perf/RESULTS.md, sessions 2, 7, 9).
  uint64_t staging_slot_bytes() const {
    if (options_.staging_bytes != 0) return options_.staging_bytes;
    return uint64_t{64} << 20;
  }
  // A chunk whose sources are at most this many runs, of this many bytes on average, is copied
  // from them directly (no gather into local staging).
  static constexpr size_t kDirectRunsMax = 16;
  static constexpr uint64_t kDirectRunMinBytes = 1 << 20;
  static constexpr uint64_t kCounterBytes = 4096;

  // The lane to `peer`, made (and staging asked for) on first use; null when it cannot be made,
  // in which case puts go direct.
  StagedLane* lane_for(PeerId peer) {
    auto it = lanes_.find(peer);
    if (it != lanes_.end()) return it->second.get();
    auto lane = std::make_unique<StagedLane>();
    lane->token = token_base_ ^ peer;
    lane->slot_bytes = staging_slot_bytes();
    auto here = gpudirect::DeviceBuffer::allocate(options_.device, lane->slot_bytes * kLocalSlots);
    auto gather_stream = gpudirect::CudaStream::create(options_.device);
    // nccl: the send kernel on the copy stream goes before a gather that became ready with it (see
    // the receiver's receive stream, StagingReceiver::offer).
    auto copy_stream =
        gpudirect::CudaStream::create(options_.device, nccl() ? gpudirect::CudaStream::Priority::kHigh
                                                              : gpudirect::CudaStream::Priority::kNormal);
    Status made = !here.ok()            ? here.status()
                  : !gather_stream.ok() ? gather_stream.status()
                  : !copy_stream.ok()   ? copy_stream.status()
                                        : Status::Ok();
    std::vector<std::vector<uint8_t>> event_handles;
    std::vector<uint8_t> nccl_id;
    if (made.ok() && nccl()) {
      auto id = gpudirect::NcclComm::unique_id();
      if (id.ok()) {
        nccl_id = std::move(id.value());
      } else {
        made = id.status();
      }
    }
    for (uint32_t i = 0; made.ok() && !nccl() && i < options_.staging_remote_slots; ++i) {
      auto e = gpudirect::CudaEvent::create_interprocess(options_.device);
      auto h = e.ok() ? e->ipc_handle() : Result<std::vector<uint8_t>>(e.status());
      if (!h.ok()) {
        made = h.status();
        break;
      }
      event_handles.push_back(std::move(h.value()));
      lane->filled.push_back(std::move(e.value()));
    }
    for (uint32_t i = 1; made.ok() && i < options_.staging_copy_streams; ++i) {
      auto extra = gpudirect::CudaStream::create(options_.device);
      auto e = gpudirect::CudaEvent::create(options_.device);
      if (!extra.ok() || !e.ok()) {
        made = !extra.ok() ? extra.status() : e.status();
        break;
      }
      lane->extra_copy_streams.push_back(std::move(extra.value()));
      lane->extra_copied.push_back(std::move(e.value()));
    }
    for (uint32_t i = 0; made.ok() && i < kLocalSlots; ++i) {
      auto g = gpudirect::CudaEvent::create(options_.device);
      auto c = gpudirect::CudaEvent::create(options_.device);
      if (!g.ok() || !c.ok()) {
        made = !g.ok() ? g.status() : c.status();
        break;
      }
      lane->gathered.push_back(std::move(g.value()));
      lane->copied.push_back(std::move(c.value()));
      lane->local_used.push_back(false);
    }
    if (!made.ok()) {
      spdlog::warn("{}: cannot stage puts to peer {} ({}){}", name(), peer, made.to_string(),
                   nccl() ? "" : "; copying directly");
      lane->state = StagedLane::State::kDirect;
      lane->failure = made;
      return lanes_.emplace(peer, std::move(lane)).first->second.get();
    }
    lane->here = std::move(here.value());
    lane->gather_stream = std::move(gather_stream.value());
    lane->copy_stream = std::move(copy_stream.value());
    std::vector<uint8_t> handover;
    if (!nccl() && options_.staging_handover) {
      // Without these the lane still works, slots going back with the receiver's answers.
      auto freed = gpudirect::DeviceBuffer::allocate(options_.device, kCounterBytes);
      auto release = gpudirect::CudaStream::create(options_.device);
      Status ok = !freed.ok() ? freed.status() : !release.ok() ? release.status() : Status::Ok();
      if (ok.ok()) ok = gpudirect::fill_device(freed->data(), 0, kCounterBytes);
      auto blob = ok.ok() ? gpudirect::export_cuda_ipc(freed->data(), kCounterBytes)
                          : Result<std::vector<uint8_t>>(ok);
      if (blob.ok()) {
        handover = std::move(blob.value());
        lane->freed = std::move(freed.value());
        lane->release = std::move(release.value());
      } else {
        spdlog::warn("{}: staging to peer {} without GPU hand-over: {}", name(), peer,
                     blob.status().to_string());
      }
    }
    const uint64_t token = lane->token;
    StagedLane* raw = lanes_.emplace(peer, std::move(lane)).first->second.get();
    staging::StagingRequest request{token,    options_.staging_remote_slots, staging_slot_bytes(),
                                    address_, std::move(event_handles),      nccl_id};
    request.handover = std::move(handover);
    if (nccl()) {
      // Join the communicator as rank 0 off this thread: it blocks until the receiver joins.
      helpers_.spawn([this, token, id = std::move(nccl_id), device = options_.device]() {
        auto comm = std::make_shared<Result<gpudirect::NcclComm>>(
            gpudirect::NcclComm::create(id, 0, device, kNcclJoinTimeout, &stopping_));
        inner_->post([this, token, comm]() {
          PeerId p = 0;
          StagedLane* l = lane_by_token(token, &p);
          if (l == nullptr || l->state != StagedLane::State::kRequested) return;
          if (!comm->ok()) return staging_refused(p, token, comm->status());
          l->comm = std::move(comm->value());
          l->joined = true;
          lane_ready_if_complete(p, *l);
        });
      });
    }
    inner_->notify(peer, staging::encode(request), [this, peer, token](const Status& s) {
      if (!s.ok()) staging_refused(peer, token, s);
    });
    // A receiver that never answers (an older build ignores the request) must not hold puts.
    const std::chrono::seconds offer_timeout = nccl() ? kNcclOfferTimeout : kOfferTimeout;
    inner_->post_after(offer_timeout, [this, peer, token, offer_timeout] {
      staging_refused(peer, token,
                      Status(ErrorCode::kTimeout,
                             "no staging offer within " + std::to_string(offer_timeout.count()) + " s"));
    });
    return raw;
  }

  StagedLane* lane_by_token(uint64_t token, PeerId* peer_out) {
    const PeerId peer = static_cast<PeerId>(token ^ token_base_);
    auto it = lanes_.find(peer);
    if ((token ^ token_base_) >> 32 != 0 || it == lanes_.end() || it->second->token != token) return nullptr;
    if (peer_out != nullptr) *peer_out = peer;
    return it->second.get();
  }

  // No staging from this peer: its puts go direct from now on, the held ones too.
  void staging_refused(PeerId peer, uint64_t token, const Status& why) {
    StagedLane* lane = lane_by_token(token, nullptr);
    if (lane == nullptr || lane->state != StagedLane::State::kRequested) return;
    if (nccl()) {  // nothing else can carry the bytes: the lane and its puts fail with the reason
      spdlog::error("nccl: no staging with peer {}: {}", peer, why.to_string());
      lane->failure = Status(why.code(), "nccl staging with the peer failed: " + why.message());
      fail_lane(*lane, lane->failure);
      return;
    }
    spdlog::warn("cuda_ipc: peer {} offers no staging ({}); copying directly", peer, why.to_string());
    lane->state = StagedLane::State::kDirect;
    lane->failure = why;
    auto held = std::move(lane->unoffered);
    for (auto& put : held) {
      // Counted as staged when it came: the lane's count moves on when its direct copy is done.
      start_put(peer, std::move(put->ops), put->wait_event,
                [this, peer, done = std::move(put->done)](const Status& s) {
                  if (done) done(s);
                  if (auto l = lanes_.find(peer); l != lanes_.end()) {
                    ++l->second->completed;
                    finish_flushes(*l->second);
                  }
                });
    }
  }

  void staging_offered(const staging::StagingOffer& offer) {
    PeerId peer = 0;
    StagedLane* lane = lane_by_token(offer.sender, &peer);
    if (lane == nullptr || lane->state != StagedLane::State::kRequested) return;
    if (offer.error != 0) {
      return staging_refused(
          peer, offer.sender,
          Status(static_cast<ErrorCode>(offer.error), "the receiver refused: " + offer.message));
    }
    const uint32_t asked =
        nccl() ? options_.staging_remote_slots : static_cast<uint32_t>(lane->filled.size());
    if (offer.slot_bytes != lane->slot_bytes || offer.slots != asked) {
      return staging_refused(peer, offer.sender,
                             Status(ErrorCode::kMalformed, "the offer's slots are not the ones asked for"));
    }
    if (!nccl()) {  // the copy engines write into the receiver's slots through a mapping
      auto mapping = gpudirect::CudaIpcMapping::open(offer.cuda_ipc, options_.device);
      if (!mapping.ok()) return staging_refused(peer, offer.sender, mapping.status());
      if (mapping->size() < uint64_t{offer.slots} * offer.slot_bytes) {
        return staging_refused(
            peer, offer.sender,
            Status(ErrorCode::kMalformed, "the offered staging is smaller than its slots"));
      }
      lane->remote = std::make_unique<gpudirect::CudaIpcMapping>(std::move(mapping.value()));
      const uint64_t counters_end = offer.ready_offset + uint64_t{offer.slots} * 4;
      if (offer.ready_offset != 0 && lane->freed.data() != nullptr && counters_end <= lane->remote->size()) {
        lane->handover = true;
        lane->ready =
            reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(lane->remote->data()) + offer.ready_offset);
        lane->uses.assign(offer.slots, 0);
      } else if (lane->freed.data() != nullptr) {
        spdlog::info("cuda_ipc: peer {} stages without GPU hand-over: slots come back with its answers",
                     peer);
      }
    }
    lane->remote_slots = offer.slots;
    for (uint32_t i = 0; i < offer.slots; ++i) lane->free_remote.push_back(i);
    lane->offered = true;
    lane_ready_if_complete(peer, *lane);
  }

  // Staging is usable once the receiver offered slots (and, nccl, both joined the communicator).
  void lane_ready_if_complete(PeerId peer, StagedLane& lane) {
    if (!lane.offered || (nccl() && !lane.joined)) return;
    lane.state = StagedLane::State::kReady;
    spdlog::info("{}: staging puts to peer {} through {} slots of {} KiB on its GPU, {}", name(), peer,
                 lane.remote_slots, lane.slot_bytes >> 10,
                 lane.handover ? "handed back on the GPUs" : "handed back with the receiver's answers");
    auto held = std::move(lane.unoffered);
    for (auto& put : held) stage(peer, lane, std::move(put));
  }

  // Cuts a put (its ops already checked and turned into segments_) into chunks and queues them.
  void stage(PeerId peer, StagedLane& lane, std::shared_ptr<StagedPut> put) {
    if (lane.state == StagedLane::State::kRequested) {
      lane.unoffered.push_back(std::move(put));
      return;
    }
    if (!put->ops.empty()) {  // held before the offer: make its segments now
      if (Status s = make_segments(peer, put->ops); !s.ok()) {
        if (put->done) put->done(s);
        ++lane.completed;
        finish_flushes(lane);
        return;
      }
      put->ops.clear();
    }
    HostTimer timed = time_host(HostWork::kStage);
    const uint64_t slot_bytes = lane.slot_bytes;
    StagedChunk chunk{put, true, {}, {}, 0};
    chunk.gathers.reserve(std::min<size_t>(segments_.size(), 1u << 16));
    chunk.pieces.reserve(std::min<size_t>(segments_.size(), 1u << 16));
    auto close_chunk = [&] {
      ++put->chunks_left;
      lane.waiting.push_back(std::move(chunk));
      chunk = StagedChunk{put, false, {}, {}, 0};
    };
    for (size_t i = 0; i < segments_.size(); ++i) {
      const gpudirect::CopySegment& seg = segments_[i];
      const uint64_t peer_dst = staged_destinations_[i];
      for (uint64_t at = 0; at < seg.bytes;) {
        const uint64_t take = std::min(seg.bytes - at, slot_bytes - chunk.bytes);
        chunk.gathers.push_back(gpudirect::CopySegment{seg.src + at, chunk.bytes, take});
        if (!chunk.pieces.empty() &&
            chunk.pieces.back().destination + chunk.pieces.back().bytes == peer_dst + at) {
          chunk.pieces.back().bytes += take;  // adjacent destinations: one piece
        } else {
          chunk.pieces.push_back(staging::ScatterPiece{peer_dst + at, take});
        }
        chunk.bytes += take;
        at += take;
        if (chunk.bytes == slot_bytes) close_chunk();
      }
    }
    if (chunk.bytes > 0) close_chunk();
    timed = {};  // the staging section ends here
    pump(peer, lane);
  }

  // Launches waiting chunks while the receiver has free slots.
  void pump(PeerId peer, StagedLane& lane) {
    while (lane.state == StagedLane::State::kReady && !lane.waiting.empty()) {
      // Chunks held back while the copy engines have enough queued gather into larger copies.
      if (options_.staging_copies_ahead > 0 && lane.copies_unfinished >= options_.staging_copies_ahead) break;
      uint32_t remote_slot = 0;
      uint32_t use = 0;  // 0: no hand-over
      if (lane.handover) {
        // The GPU waits for the slot to come back; the host only bounds how far it runs ahead.
        if (lane.in_flight.size() >= kHandoverInFlight) break;
        remote_slot = lane.next_remote;
        lane.next_remote = (remote_slot + 1) % lane.remote_slots;
        use = ++lane.uses[remote_slot];
      } else {
        if (lane.free_remote.empty()) break;
        remote_slot = lane.free_remote.front();
        lane.free_remote.pop_front();
      }
      StagedChunk chunk = std::move(lane.waiting.front());
      lane.waiting.pop_front();
      // Queued chunks that fit in the same slot go with it: fewer, larger copies keep the copy
      // engines closer to the link rate (two 32 MiB layers a copy: 0.92x of it against 0.89x,
      // perf/RESULTS.md). Only what is already queued is packed: nothing waits for a next put.
      while (!lane.waiting.empty() && chunk.bytes + lane.waiting.front().bytes <= lane.slot_bytes) {
        StagedChunk& next = lane.waiting.front();
        for (gpudirect::CopySegment g : next.gathers) {
          g.dst += chunk.bytes;
          chunk.gathers.push_back(g);
        }
        chunk.pieces.insert(chunk.pieces.end(), next.pieces.begin(), next.pieces.end());
        chunk.bytes += next.bytes;
        if (next.first_of_put && next.put->wait_event != nullptr)
          chunk.packed_waits.push_back(next.put->wait_event);
        chunk.packed.push_back(std::move(next.put));
        chunk.packed.insert(chunk.packed.end(), next.packed.begin(), next.packed.end());
        lane.waiting.pop_front();
      }
      if (Status s = launch_chunk(peer, lane, chunk, remote_slot, use); !s.ok()) {
        broken_ = Status(s.code(), "cuda_ipc staged copy failed: " + s.message());
        spdlog::error("{}", broken_.to_string());
        fail_lane(lane, broken_);
        complete_all(broken_);
        return;
      }
    }
  }

  Status launch_chunk(PeerId peer, StagedLane& lane, StagedChunk& chunk, uint32_t remote_slot, uint32_t use) {
    HostTimer timed = time_host(HostWork::kLaunch);
    // Sources that are a few long runs go from the engine's blocks straight into the receiver's
    // slot on the copy engines, with no gather. Besides saving a pass over the layer, this keeps
    // kernels off the sending GPU while its copy engines write over NVLink: between two processes
    // a concurrent gather kernel was measured to hold each 32 MiB copy back by about its own
    // length (114 us instead of 91, perf/RESULTS.md). Over nccl the runs go as that many sends of
    // one group, received back to back into the slot: no gather kernel then competes with NCCL's
    // send kernel for the SMs.
    const std::vector<gpudirect::CopySegment> runs =
        gpudirect::merge_contiguous(chunk.gathers, kDirectRunsMax);
    const bool direct = !runs.empty() && chunk.bytes / runs.size() >= kDirectRunMinBytes;
    // A direct chunk uses no local slot, and its copy waits for the layers' events itself: one
    // cross-stream hop (a few microseconds before every copy) fewer than through the gather stream.
    const uint32_t local = lane.next_local;
    if (!direct) lane.next_local = (local + 1) % kLocalSlots;
    const gpudirect::CudaStream& gather = direct ? lane.copy_stream : lane.gather_stream;
    if (chunk.first_of_put && chunk.put->wait_event != nullptr) {
      if (Status s = gather.wait_event(chunk.put->wait_event); !s.ok()) return s;
    }
    for (void* packed_wait : chunk.packed_waits) {
      if (Status s = gather.wait_event(packed_wait); !s.ok()) return s;
    }
    if (!direct && lane.local_used[local]) {  // the copy that last read this local slot
      if (Status s = gather.wait_event(lane.copied[local].handle()); !s.ok()) return s;
    }
    const uint64_t here = reinterpret_cast<uint64_t>(lane.here.data()) + local * lane.slot_bytes;
    std::optional<TracedPut> traced_gather =
        direct ? std::nullopt : begin_trace(gather, chunk.bytes, chunk.gathers.size(), false);
    // Every layer gathers the same extents at another base: the plan is uploaded once and each
    // layer is one launch with two bases (no descriptor packing or upload per layer).
    uint64_t src_base = 0;
    if (direct) {
      // Nothing to gather; the gather stream still orders the copy after the layer's event.
    } else if (const gpudirect::ResidentSegments* plan = gather_plan(chunk.gathers, &src_base);
               plan != nullptr) {
      if (Status s = copier_->copy_resident(*plan, src_base, here, gather.handle()); !s.ok()) return s;
    } else {
      for (gpudirect::CopySegment& g : chunk.gathers) g.dst += here;
      if (Status s = copier_->copy(chunk.gathers, gather.handle()); !s.ok()) return s;
    }
    if (traced_gather) {
      auto end = gpudirect::CudaEvent::create(options_.device, true);
      if (end.ok() && end->record(gather.handle()).ok()) {
        traced_gather->end.emplace(std::move(end.value()));
        traced_gathers_.push_back(std::move(*traced_gather));
      }
    }
    if (!direct) {
      if (Status s = lane.gathered[local].record(gather); !s.ok()) return s;
      if (Status s = lane.copy_stream.wait_event(lane.gathered[local].handle()); !s.ok()) return s;
    }
    const uint32_t* slot_freed =
        use > 1 ? static_cast<const uint32_t*>(lane.freed.data()) + remote_slot : nullptr;
    if (slot_freed != nullptr) {  // the receiver has scattered this slot's previous use
      if (Status s = lane.copy_stream.wait_value(slot_freed, use - 1); !s.ok()) return s;
    }
    std::optional<TracedPut> traced = begin_trace(lane.copy_stream, chunk.bytes, chunk.pieces.size(), true);
    std::vector<uint64_t> sends;  // nccl, more than one run: the size of each send, in order
    uint8_t* there =
        nccl() ? nullptr : static_cast<uint8_t*>(lane.remote->data()) + remote_slot * lane.slot_bytes;
    if (nccl()) {
      // The receiver posts the matching receives into `remote_slot` when the Scatter arrives.
      std::vector<gpudirect::NcclComm::Part> parts;
      if (direct) {
        for (const gpudirect::CopySegment& run : runs)
          parts.push_back({reinterpret_cast<const void*>(run.src), run.bytes});
        if (parts.size() > 1) {
          for (const auto& part : parts) sends.push_back(part.bytes);
        }
      } else {
        parts.push_back({reinterpret_cast<const void*>(here), chunk.bytes});
      }
      if (Status s = lane.comm.send(parts, lane.copy_stream.handle()); !s.ok()) return s;
    } else if (direct) {  // on copy_stream alone: each run is already one large copy
      for (const gpudirect::CopySegment& run : runs) {
        if (Status s = lane.copy_stream.copy_async(there + run.dst, reinterpret_cast<const void*>(run.src),
                                                   run.bytes, options_.staging_copy_overlap_hint);
            !s.ok()) {
          return s;
        }
      }
    } else {
      // Split over the copy streams in 64 KiB-aligned parts; copy_stream takes the first.
      const uint64_t parts = lane.extra_copy_streams.size() + 1;
      const uint64_t part = ((chunk.bytes + parts - 1) / parts + 65535) & ~uint64_t{65535};
      for (uint64_t i = 1; i < parts && i * part < chunk.bytes; ++i) {
        const gpudirect::CudaStream& extra = lane.extra_copy_streams[i - 1];
        const uint64_t at = i * part;
        if (Status s = extra.wait_event(lane.gathered[local].handle()); !s.ok()) return s;
        if (slot_freed != nullptr) {
          if (Status s = extra.wait_value(slot_freed, use - 1); !s.ok()) return s;
        }
        if (Status s = extra.copy_async(there + at, reinterpret_cast<const void*>(here + at),
                                        std::min(part, chunk.bytes - at), options_.staging_copy_overlap_hint);
            !s.ok()) {
          return s;
        }
        if (Status s = lane.extra_copied[i - 1].record(extra); !s.ok()) return s;
      }
      if (Status s =
              lane.copy_stream.copy_async(there, reinterpret_cast<const void*>(here),
                                          std::min(part, chunk.bytes), options_.staging_copy_overlap_hint);
          !s.ok()) {
        return s;
      }
      for (uint64_t i = 1; i < parts && i * part < chunk.bytes; ++i) {
        if (Status s = lane.copy_stream.wait_event(lane.extra_copied[i - 1].handle()); !s.ok()) return s;
      }
    }
    if (traced) end_trace(std::move(*traced), lane.copy_stream);
    if (options_.staging_copies_ahead > 0) {
      ++lane.copies_unfinished;
      enqueue_events({&lane.copy_stream}, [this, token = lane.token](const Status&) {
        PeerId p = 0;
        StagedLane* l = lane_by_token(token, &p);
        if (l == nullptr) return;
        if (l->copies_unfinished > 0) --l->copies_unfinished;
        pump(p, *l);
      });
    }
    if (!direct) {
      if (Status s = lane.copied[local].record(lane.copy_stream); !s.ok()) return s;
      lane.local_used[local] = true;
    }
    // The receiver's scatter waits for this on its GPU, so it is told now, not when the copy ends.
    if (use != 0) {
      if (Status s = lane.copy_stream.write_value(lane.ready + remote_slot, use); !s.ok()) return s;
    } else if (!nccl()) {
      if (Status s = lane.filled[remote_slot].record(lane.copy_stream); !s.ok()) return s;
    }
    const uint64_t batch = lane.next_batch++;
    std::vector<std::shared_ptr<StagedPut>> puts{chunk.put};
    puts.insert(puts.end(), chunk.packed.begin(), chunk.packed.end());
    lane.in_flight.emplace(batch, std::move(puts));
    if (trace_) staged_sent_at_.emplace(batch, std::chrono::steady_clock::now());
    mark('L');
    staging::Scatter scatter{lane.token, batch, remote_slot, std::move(chunk.pieces)};
    scatter.use = use;
    scatter.sends = std::move(sends);
    std::vector<uint8_t> encoded = [&] {
      HostTimer timed_encode = time_host(HostWork::kEncode);
      return staging::encode(scatter);
    }();
    HostTimer timed_notify = time_host(HostWork::kNotify);
    inner_->notify(
        peer, std::move(encoded), [this, token = lane.token, batch, remote_slot](const Status& sent) {
          if (sent.ok()) return;
          chunk_done(staging::Scattered{token, batch, remote_slot, static_cast<uint32_t>(sent.code()),
                                        sent.message()});
          // With hand-over the receiver would have handed this slot back: nobody will.
          if (StagedLane* l = lane_by_token(token, nullptr); l != nullptr && l->handover) {
            release_handover(*l);
            fail_lane(*l,
                      Status(sent.code(), "a staged chunk did not reach the receiver: " + sent.message()));
          }
        });
    return Status::Ok();
  }

  // The uploaded plan for gathers whose destinations are slot offsets, with sources relative to
  // their lowest address (returned in `src_base`); null for small batches or when a plan cannot
  // be made (the caller uploads the batch instead).
  const gpudirect::ResidentSegments* gather_plan(const std::vector<gpudirect::CopySegment>& gathers,
                                                 uint64_t* src_base) {
    if (gathers.size() < kResidentMinExtents) return nullptr;
    uint64_t base = UINT64_MAX;
    for (const gpudirect::CopySegment& g : gathers) base = std::min(base, g.src);
    relative_.clear();
    for (const gpudirect::CopySegment& g : gathers) relative_.push_back({g.src - base, g.dst, g.bytes});
    const gpudirect::ResidentSegments* plan = gather_plans_.find_or_make(relative_);
    // Clear the plans only while no chunk is in flight: none still reads one then, and waiting
    // for a gather that (through its copy) waits on a receiver's hand-over could stop this thread.
    const bool idle =
        std::all_of(lanes_.begin(), lanes_.end(), [](const auto& l) { return l.second->in_flight.empty(); });
    if (plan == nullptr && gather_plans_.full() && idle) {
      for (const auto& [peer, lane] : lanes_) (void)lane->gather_stream.synchronize();
      gather_plans_.clear();
      plan = gather_plans_.find_or_make(relative_);
    }
    *src_base = base;
    return plan;
  }

  // Sets every freed counter to its slot's last use, so this side's copy streams stop waiting for
  // a receiver that will not hand slots back (it died, a chunk never reached it, this transport
  // closes). A copy released this way may overwrite a slot the receiver still scatters from: the
  // caller fails the lane's puts in the same step, so none of them is reported complete.
  void release_handover(StagedLane& lane) {
    if (!lane.handover) return;
    Status s = Status::Ok();
    for (uint32_t i = 0; s.ok() && i < lane.remote_slots; ++i)
      s = lane.release.write_value(static_cast<uint32_t*>(lane.freed.data()) + i, lane.uses[i]);
    if (s.ok()) s = lane.release.synchronize();
    if (!s.ok())
      spdlog::error("{}: cannot release staged copies waiting for a receiver: {}", name(), s.to_string());
  }

  // The receiver's answer for one chunk (or a failure to send it the chunk).
  void chunk_done(const staging::Scattered& answer) {
    PeerId peer = 0;
    StagedLane* lane = lane_by_token(answer.sender, &peer);
    if (lane == nullptr) return;
    auto it = lane->in_flight.find(answer.batch);
    if (it == lane->in_flight.end() || answer.slot >= lane->remote_slots) {
      spdlog::warn("cuda_ipc: peer {} answered for batch {} slot {}, which is not in flight", peer,
                   answer.batch, answer.slot);
      return;
    }
    mark('A');
    std::vector<std::shared_ptr<StagedPut>> puts = std::move(it->second);
    lane->in_flight.erase(it);
    if (auto sent = staged_sent_at_.find(answer.batch); sent != staged_sent_at_.end()) {
      staged_round_trip_us_.push_back(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - sent->second).count());
      staged_sent_at_.erase(sent);
    }
    if (!lane->handover) lane->free_remote.push_back(answer.slot);  // else the GPUs hand it back
    for (HostTimer timed = time_host(HostWork::kPutsDone); const std::shared_ptr<StagedPut>& put : puts) {
      if (answer.error != 0 && put->status.ok()) {
        put->status = Status(static_cast<ErrorCode>(answer.error),
                             "the receiver could not place a staged put: " + answer.message);
      }
      if (--put->chunks_left == 0) {
        ++lane->completed;
        if (put->done) put->done(put->status);
        finish_flushes(*lane);
      }
    }
    if (answer.error == static_cast<uint32_t>(ErrorCode::kUnsupportedVersion) ||
        answer.error == static_cast<uint32_t>(ErrorCode::kMalformed)) {
      // The receiver could not read a Scatter (staging::refusal): it speaks another version, so
      // none would land. The lane's other puts fail with the reason, slots it waits for on the
      // GPU are let go, and later puts copy directly (nccl: fail).
      const Status why(static_cast<ErrorCode>(answer.error),
                       "the receiver cannot read staged puts: " + answer.message);
      spdlog::warn("{}: peer {} cannot read this side's staging messages ({}){}", name(), peer,
                   answer.message, nccl() ? "" : "; copying directly from now on");
      release_handover(*lane);
      lane->failure = why;
      return fail_lane(*lane, why);
    }
    pump(peer, *lane);
  }

  void finish_flushes(StagedLane& lane) {
    auto ready = std::stable_partition(lane.flushes.begin(), lane.flushes.end(),
                                       [&](const auto& f) { return f.first > lane.completed; });
    std::vector<std::pair<uint64_t, Completion>> run(std::make_move_iterator(ready),
                                                     std::make_move_iterator(lane.flushes.end()));
    lane.flushes.erase(ready, lane.flushes.end());
    for (auto& f : run) {
      if (f.second) f.second(Status::Ok());
    }
  }

  // Completes everything the lane holds with `why`; the lane takes no more staged puts.
  void fail_lane(StagedLane& lane, const Status& why) {
    lane.state = StagedLane::State::kDirect;
    std::vector<std::shared_ptr<StagedPut>> puts;
    for (auto& p : lane.unoffered) puts.push_back(p);
    for (auto& c : lane.waiting) puts.push_back(c.put);
    for (auto& [batch, p] : lane.in_flight) puts.insert(puts.end(), p.begin(), p.end());
    lane.unoffered.clear();
    lane.waiting.clear();
    lane.in_flight.clear();
    std::sort(puts.begin(), puts.end());
    puts.erase(std::unique(puts.begin(), puts.end()), puts.end());
    for (auto& p : puts) {
      if (p->done) std::exchange(p->done, nullptr)(why);
    }
    lane.completed = lane.submitted;
    auto flushes = std::move(lane.flushes);
    lane.flushes.clear();
    for (auto& f : flushes) {
      if (f.second) f.second(why);
    }
  }

  // Receiver side: a sender asked for staging. The answer goes over a connection back to the
  // sender's worker, made on a helper thread (connect blocks until this thread has done it).
  void staging_requested(staging::StagingRequest request) {
    if (auto back = back_peers_.find(request.sender); back != back_peers_.end()) {
      if (!request.nccl_id.empty()) return;  // a communicator is joined once; the first offer stands
      return send_offer(back->second, request, {});
    }
    // The answer goes over a connection back to the sender's worker, made on a helper thread
    // (connect blocks until this thread has done it); for nccl the communicator is joined there
    // too (it blocks until the sender has joined).
    helpers_.spawn([this, request = std::move(request)]() mutable {
      // The connection back must be made as the sender made its own (UCX refuses two endpoints
      // between a pair of workers with different error handling), which depends on whether the
      // two share a host: the sender's address names its host.
      auto parsed = parse_address(request.reply_address);
      Result<PeerId> back = parsed.status();
      if (parsed.ok()) back = inner_->connect(parsed->ucx, ConnectOptions{parsed->boot_id == this_boot_id()});
      auto comm = std::make_shared<Result<gpudirect::NcclComm>>(gpudirect::NcclComm{});
      if (back.ok() && !request.nccl_id.empty())
        *comm =
            gpudirect::NcclComm::create(request.nccl_id, 1, options_.device, kNcclJoinTimeout, &stopping_);
      inner_->post([this, back, comm, request = std::move(request)] {
        if (!back.ok()) {
          spdlog::warn("{}: cannot answer sender {:016x}'s staging request: {}", name(), request.sender,
                       back.status().to_string());
          return;
        }
        back_peers_[request.sender] = back.value();
        back_senders_[back.value()] = request.sender;
        if (!comm->ok()) {
          staging::StagingOffer refused{request.sender,
                                        0,
                                        0,
                                        {},
                                        static_cast<uint32_t>(comm->status().code()),
                                        "joining the NCCL communicator: " + comm->status().message()};
          inner_->notify(back.value(), staging::encode(refused), nullptr);
          return;
        }
        send_offer(back.value(), request, std::move(comm->value()));
      });
    });
  }

  void send_offer(PeerId back, const staging::StagingRequest& request, gpudirect::NcclComm comm) {
    if (!receiver_) return;
    inner_->notify(back, staging::encode(receiver_->offer(request, std::move(comm))), nullptr);
  }

  void scatter_requested(const staging::Scatter& scatter) {
    auto back = back_peers_.find(scatter.sender);
    if (back == back_peers_.end() || !receiver_) {
      spdlog::warn("cuda_ipc: scatter from sender {:016x}, which asked for no staging", scatter.sender);
      return;
    }
    const auto asked = std::chrono::steady_clock::now();
    mark('R');  // a Scatter received (the sender marked L when it sent it)
    HostTimer timed = time_host(HostWork::kReceiverScatter);
    receiver_->scatter(scatter, [this, to = back->second, asked](staging::Scattered answer) {
      mark('W');  // its answer goes (the sender marks A when it takes it)
      if (trace_ && scatter_us_.size() < 65536) {
        scatter_us_.push_back(
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - asked).count());
      }
      if (answer.error != 0) spdlog::warn("cuda_ipc: refused a staged put: {}", answer.message);
      inner_->notify(to, staging::encode(answer), nullptr);
    });
  }

  void on_notification(std::span<const uint8_t> bytes) {
    if (!staging::is_staging_message(bytes)) {
      if (user_notification_handler_) user_notification_handler_(bytes);
      return;
    }
    const auto began = trace_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    Result<staging::Message> message = [&] {
      HostTimer timed = time_host(HostWork::kDecode);
      return staging::decode(bytes);
    }();
    if (!message.ok()) {
      spdlog::warn("cuda_ipc: dropped a staging message: {}", message.status().to_string());
      // A Scatter this build cannot read (a newer version, damaged pieces) is still answered, so
      // the sender's put fails now with the reason rather than by its timeout.
      if (auto ids = staging::scatter_ids(bytes)) {
        if (auto back = back_peers_.find(ids->sender); back != back_peers_.end())
          inner_->notify(back->second, staging::encode(staging::refusal(*ids, message.status())), nullptr);
      }
      return;
    }
    // KVF_CUDA_IPC_TRACE: this thread's time on a chunk, from its message to its work enqueued.
    std::optional<HostWork> traced;
    if (trace_ && std::holds_alternative<staging::Scatter>(message.value())) traced = HostWork::kScatter;
    if (trace_ && std::holds_alternative<staging::Scattered>(message.value())) traced = HostWork::kAnswer;
    std::visit(
        [this](auto& m) {
          using T = std::decay_t<decltype(m)>;
          if constexpr (std::is_same_v<T, staging::StagingRequest>) {
            staging_requested(std::move(m));
          } else if constexpr (std::is_same_v<T, staging::StagingOffer>) {
            staging_offered(m);
          } else if constexpr (std::is_same_v<T, staging::Scatter>) {
            scatter_requested(m);
          } else if constexpr (std::is_same_v<T, staging::StagingClosed>) {
            forget_sender(m.sender);
          } else {
            chunk_done(m);
          }
        },
        message.value());
    if (traced) note_host_time(*traced, began);
  }

  // Receiver side: a sender closed or died. Its slots go; its communicator is closed on a helper
  // thread (the close meets the sender's own, or gives up and aborts if the sender is gone).
  void forget_sender(uint64_t sender) {
    auto back = back_peers_.find(sender);
    if (back == back_peers_.end()) return;
    back_senders_.erase(back->second);
    back_peers_.erase(back);
    if (!receiver_) return;
    gpudirect::NcclComm comm = receiver_->drop(sender);
    if (comm.valid()) close_communicator_later(std::move(comm));
  }

  void close_communicator_later(gpudirect::NcclComm comm) {
    helpers_.spawn([comm = std::move(comm)]() mutable {
      if (Status s = comm.close(kNcclCloseTimeout); !s.ok()) spdlog::warn("nccl: {}", s.to_string());
    });
  }

  // Sender side: tells the receiver this lane is done (so it closes its end of the communicator
  // too) and hands back the lane's communicator for the caller to close off the progress thread.
  // Also for cuda_ipc lanes: the receiver frees the slots now, instead of when it notices that
  // this process is gone (a receiver serving one short-lived sender after another otherwise
  // keeps their slots until its staging limit refuses the next one, which then copies directly).
  gpudirect::NcclComm close_lane(PeerId peer, StagedLane& lane) {
    if (!lane.offered && !lane.comm.valid()) return {};
    inner_->notify(peer, staging::encode(staging::StagingClosed{lane.token}), nullptr);
    return std::move(lane.comm);
  }

  void on_peer_failure(PeerId peer, const Status& why) {
    if (auto back = back_senders_.find(peer); back != back_senders_.end()) {
      // A sender we staged for is gone: its slots go (its connection was ours, not the user's).
      forget_sender(back->second);
      return;
    }
    if (auto lane = lanes_.find(peer); lane != lanes_.end()) {
      lane->second->comm.abort();       // a send to a dead peer would hold the stream forever
      release_handover(*lane->second);  // as would waiting for its hand-over
      (void)lane->second->copy_stream.synchronize();
      fail_lane(*lane->second, Status(ErrorCode::kPeerLost, "peer lost: " + why.message()));
    }
    if (user_failure_handler_) user_failure_handler_(peer, why);
  }

  // segments_ (and, for staging, staged_destinations_: the peer's own address of each) for a
  // batch into the peer's GPU regions, bounds-checked.
  Status make_segments(PeerId peer, const std::vector<PutOp>& ops) {
    const bool staged = may_stage();  // direct puts need no peer addresses
    segments_.clear();
    staged_destinations_.clear();
    segments_.reserve(ops.size());
    if (staged) staged_destinations_.reserve(ops.size());
    // A layer's extents all go to one region: look it up once, not per extent.
    RemoteRegionId cached_id = 0;
    const Region* r = nullptr;
    for (const PutOp& op : ops) {
      if (r == nullptr || op.remote != cached_id) {
        auto it = regions_.find(op.remote);
        if (it == regions_.end() || it->second.peer != peer || !it->second.cuda) {
          return Status(ErrorCode::kInvalidArgument, "a put batch mixes GPU and host regions");
        }
        cached_id = op.remote;
        r = &it->second;
      }
      if (op.remote_offset > r->length || op.length > r->length - op.remote_offset) {
        return Status(ErrorCode::kInvalidArgument,
                      "put of " + std::to_string(op.length) + " bytes at offset " +
                          std::to_string(op.remote_offset) + " overruns the peer's region of " +
                          std::to_string(r->length) + " bytes");
      }
      segments_.push_back(gpudirect::CopySegment{reinterpret_cast<uint64_t>(op.local),
                                                 reinterpret_cast<uint64_t>(r->mapped + op.remote_offset),
                                                 op.length});
      if (staged) staged_destinations_.push_back(r->peer_address + op.remote_offset);
    }
    return Status::Ok();
  }

  void start_put(PeerId peer, std::vector<PutOp> ops, void* wait_event, Completion done) {
    auto fail = [&](Status s) {
      if (done) done(std::move(s));
    };
    if (!broken_.ok()) return fail(broken_);
    auto p = peers_.find(peer);
    if (p == peers_.end())
      return fail(Status(ErrorCode::kNotFound, "put: unknown peer " + std::to_string(peer)));
    if (ops.empty()) return fail(Status::Ok());
    auto first = regions_.find(ops.front().remote);
    if (first == regions_.end() || first->second.peer != peer) {
      return fail(Status(ErrorCode::kInvalidArgument, "put into region " +
                                                          std::to_string(ops.front().remote) +
                                                          " which was not imported from this peer"));
    }
    if (!first->second.cuda) {
      // Host memory on the other side: the inner UCX transport moves it.
      std::vector<PutOp> inner_ops;
      inner_ops.reserve(ops.size());
      for (PutOp op : ops) {
        auto r = regions_.find(op.remote);
        if (r == regions_.end() || r->second.peer != peer || r->second.cuda) {
          return fail(Status(ErrorCode::kInvalidArgument, "a put batch mixes GPU and host regions"));
        }
        op.remote = r->second.inner;
        inner_ops.push_back(op);
      }
      ++p->second.host_puts_since_flush;
      if (wait_event != nullptr) {
        inner_->put_after_event(peer, std::move(inner_ops), wait_event, std::move(done));
      } else {
        inner_->put(peer, std::move(inner_ops), std::move(done));
      }
      return;
    }
    mark('P');
    if (Status s = make_segments(peer, ops); !s.ok()) return fail(s);
    if (options_.copy == CudaCopyMethod::kStaged || nccl() ||
        adaptive_stages(peer, p->second, first->second, wait_event)) {
      StagedLane* lane = lane_for(peer);
      if (lane->state == StagedLane::State::kDirect && nccl()) return fail(lane->failure);
      if (lane->state != StagedLane::State::kDirect) {
        auto put = std::make_shared<StagedPut>();
        put->wait_event = wait_event;
        put->done = std::move(done);
        if (lane->state == StagedLane::State::kRequested) put->ops = std::move(ops);
        ++lane->submitted;  // flushes from now on wait for it
        if (trace_) {
          const auto now = std::chrono::steady_clock::now();
          if (last_put_at_) {
            put_interval_us_.push_back(
                std::chrono::duration<double, std::micro>(now - *last_put_at_).count());
          }
          last_put_at_ = now;
        }
        return stage(peer, *lane, std::move(put));
      }
    }
    const gpudirect::CudaStream& stream = streams_[next_stream_];
    next_stream_ = (next_stream_ + 1) % streams_.size();
    if (wait_event != nullptr) {
      if (Status s = stream.wait_event(wait_event); !s.ok()) return fail(s);
    }
    std::optional<TracedPut> traced =
        begin_trace(stream, gpudirect::total_bytes(segments_), segments_.size(), use_copy_engines(segments_));
    Status launched;
    if (use_copy_engines(segments_)) {
      launched = copier_->copy_with_copy_engines(segments_, stream.handle(),
                                                 options_.copy != CudaCopyMethod::kCopyEnginePerCopy);
    } else if (const gpudirect::ResidentSegments* plan = resident_plan(ops); plan != nullptr) {
      launched = copier_->copy_resident(*plan, resident_src_base_, resident_dst_base_, stream.handle());
    } else {
      launched = copier_->copy(segments_, stream.handle());
    }
    if (traced && launched.ok()) end_trace(std::move(*traced), stream);
    if (!launched.ok()) {
      broken_ = Status(launched.code(), "cuda_ipc copy failed: " + launched.message());
      spdlog::error("{}", broken_.to_string());
      complete_all(broken_);
      return fail(broken_);
    }
    mark('L');
    // kAdaptive counts the direct puts in flight (its "link busy"); the others need no count.
    const bool counted = options_.copy == CudaCopyMethod::kAdaptive;
    if (counted) ++p->second.direct_in_flight;
    if (!counted && !timeline_) return enqueue_events({&stream}, std::move(done));
    enqueue_events({&stream}, [this, peer, counted, done = std::move(done)](const Status& st) {
      if (auto q = peers_.find(peer); counted && q != peers_.end()) --q->second.direct_in_flight;
      if (timeline_) mark('D');
      if (done) done(st);
    });
  }

  // kAdaptive: whether this put to `peer` (whose first extent goes to `region`) is staged; see
  // fabric/copy_choice.h. Counts the choices for the shutdown line.
  bool adaptive_stages(PeerId peer, const Peer& p, const Region& region, void* wait_event) {
    if (options_.copy != CudaCopyMethod::kAdaptive) return false;
    auto lane = lanes_.find(peer);
    AdaptivePutState state;
    state.peer_on_other_gpu = region.other_gpu;
    state.staging_refused = lane != lanes_.end() && lane->second->state == StagedLane::State::kDirect;
    state.link_busy =
        p.direct_in_flight > 0 || (lane != lanes_.end() && lane->second->completed < lane->second->submitted);
    if (wait_event != nullptr) {
      auto fired = gpudirect::event_done(wait_event);
      state.data_ready = fired.ok() && fired.value();
    }
    bool staged = choose_adaptive_path(state, options_.adaptive_stages_same_gpu) == AdaptivePath::kStaged;
    // The first staged choice asks the peer for staging; until its offer comes (the receiver
    // allocates and exports its slots) puts go direct rather than wait for it.
    if (staged && lane_for(peer)->state != StagedLane::State::kReady) staged = false;
    ++(staged ? adaptive_staged_ : adaptive_direct_);
    return staged;
  }

  // Layers of one request repeat the same extents at other bases. Seen relative to the batch's
  // lowest source address and the destination region's start, they are identical, so they are
  // uploaded once and every later layer is one launch with two bases: no descriptor packing or
  // upload per layer. Returns null (use the plain path) for small or multi-region batches.
  const gpudirect::ResidentSegments* resident_plan(const std::vector<PutOp>& ops) {
    if (!options_.resident_plans || ops.size() < kResidentMinExtents) return nullptr;
    const RemoteRegionId remote = ops.front().remote;
    uint64_t src_base = UINT64_MAX;
    for (const PutOp& op : ops) {
      if (op.remote != remote) return nullptr;
      src_base = std::min<uint64_t>(src_base, reinterpret_cast<uint64_t>(op.local));
    }
    const uint64_t dst_base = reinterpret_cast<uint64_t>(regions_.at(remote).mapped);
    relative_.clear();
    for (const gpudirect::CopySegment& seg : segments_) {
      relative_.push_back(gpudirect::CopySegment{seg.src - src_base, seg.dst - dst_base, seg.bytes});
    }
    const gpudirect::ResidentSegments* plan = resident_.find_or_make(relative_);
    if (plan == nullptr && resident_.full()) {
      // No launch may still read a plan that goes: only direct puts (on streams_) use these.
      for (const auto& stream : streams_) (void)stream.synchronize();
      resident_.clear();
      plan = resident_.find_or_make(relative_);
    }
    resident_src_base_ = src_base;
    resident_dst_base_ = dst_base;
    return plan;  // null: too many pieces for one launch, the plain path splits
  }

  bool use_copy_engines(const std::vector<gpudirect::CopySegment>& segments) const {
    switch (options_.copy) {
      case CudaCopyMethod::kKernel:
        return false;
      case CudaCopyMethod::kCopyEngine:
      case CudaCopyMethod::kCopyEnginePerCopy:
        return true;
      case CudaCopyMethod::kAuto:
      case CudaCopyMethod::kAdaptive:  // its direct puts
      case CudaCopyMethod::kStaged:    // here only when the peer offers no staging: as kAuto
      case CudaCopyMethod::kNccl:      // never here: nccl puts are always staged
        break;
    }
    return gpudirect::total_bytes(segments) / segments.size() >= options_.copy_engine_min_extent;
  }

  // Every stream direct puts are issued on. (Staged puts finish when the receiver answers.)
  std::vector<const gpudirect::CudaStream*> all_streams() const {
    std::vector<const gpudirect::CudaStream*> out;
    for (const auto& stream : streams_) out.push_back(&stream);
    return out;
  }

  // Before waiting for a hand-over lane's streams: with chunks unanswered its copies may wait on
  // the GPU for a receiver whose scatter needs this thread. Its puts fail (so none is reported
  // complete after a released copy) and its waits are released.
  void quiesce_lane(StagedLane& lane, const std::string& why) {
    if (!lane.handover) return;
    if (!lane.in_flight.empty() || !lane.waiting.empty()) fail_lane(lane, Status(ErrorCode::kAborted, why));
    release_handover(lane);
  }

  void synchronize_lane(const StagedLane& lane) {
    if (lane.copy_stream.handle() != nullptr) (void)lane.copy_stream.synchronize();
    for (const auto& extra : lane.extra_copy_streams) (void)extra.synchronize();
  }

  void synchronize_all() {
    for (const auto& [peer, lane] : lanes_) synchronize_lane(*lane);
    for (const auto& stream : streams_) (void)stream.synchronize();
  }

  // KVF_CUDA_IPC_TRACE=1: every put batch is bracketed by timing events, and a summary of where
  // the GPU time went (copy time, idle gaps between batches) is printed when the transport ends,
  // to tell a host-bound stream (gaps) from a slow copy (long batches).
  struct TracedPut {
    gpudirect::CudaEvent start;
    std::optional<gpudirect::CudaEvent> end;
    uint64_t bytes = 0;
    size_t segments = 0;
    bool copy_engines = false;
  };
  std::optional<TracedPut> begin_trace(const gpudirect::CudaStream& stream, uint64_t bytes, size_t segments,
                                       bool copy_engines) {
    if (!trace_ || traced_.size() >= 65536) return std::nullopt;
    tie_gpu_clock(stream);
    auto start = gpudirect::CudaEvent::create(options_.device, true);
    if (!start.ok() || !start->record(stream.handle()).ok()) return std::nullopt;
    return TracedPut{std::move(start.value()), std::nullopt, bytes, segments, copy_engines};
  }
  void end_trace(TracedPut put, const gpudirect::CudaStream& stream) {
    auto end = gpudirect::CudaEvent::create(options_.device, true);
    if (!end.ok() || !end->record(stream.handle()).ok()) return;
    put.end.emplace(std::move(end.value()));
    traced_.push_back(std::move(put));
  }
  static double median_of(std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::nth_element(v.begin(), v.begin() + static_cast<long>(v.size() / 2), v.end());
    return v[v.size() / 2];
  }

  // The progress thread's work per staged chunk, timed under KVF_CUDA_IPC_TRACE: a put taken
  // (sender: its segments, chunks and launches), a Scatter (receiver: decode, checks, scatter
  // enqueued) and a Scattered answer (sender: the puts it completes, the chunks it launches next).
  // The parts after the first three are sections of them: decoding a staging message; the
  // receiver's StagingReceiver::scatter; the puts an answer completes (their callbacks: the
  // scheduler's next layer); launching a chunk (all of it), and within that encoding and sending
  // its Scatter; cutting a put into chunks.
  enum class HostWork {
    kPut,
    kScatter,
    kAnswer,
    kDecode,
    kReceiverScatter,
    kPutsDone,
    kLaunch,
    kEncode,
    kNotify,
    kStage,
    kCount
  };
  class HostTimer {  // times a scope under KVF_CUDA_IPC_TRACE; assigning {} ends it early
   public:
    HostTimer() = default;
    HostTimer(Impl* self, HostWork work, std::chrono::steady_clock::time_point began)
        : self_(self), work_(work), began_(began) {}
    HostTimer(const HostTimer&) = delete;
    HostTimer& operator=(HostTimer&& o) noexcept {
      end();
      self_ = std::exchange(o.self_, nullptr);
      work_ = o.work_;
      began_ = o.began_;
      return *this;
    }
    ~HostTimer() { end(); }

   private:
    void end() {
      if (self_ != nullptr) std::exchange(self_, nullptr)->note_host_time(work_, began_);
    }
    Impl* self_ = nullptr;
    HostWork work_ = HostWork::kPut;
    std::chrono::steady_clock::time_point began_;
  };
  HostTimer time_host(HostWork work) {
    return HostTimer(trace_ ? this : nullptr, work,
                     trace_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{});
  }
  void note_host_time(HostWork work, std::chrono::steady_clock::time_point began) {
    auto& v = host_us_[static_cast<size_t>(work)];
    if (v.size() < 65536)
      v.push_back(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - began).count());
  }

  void report_trace() {
    static constexpr const char* kHostWork[] = {
        "puts taken",         "scatters asked", "answers",         "decodes",         "of which scatter",
        "of which puts done", "chunk launches", "of which encode", "of which notify", "of which staging"};
    static_assert(std::size(kHostWork) == static_cast<size_t>(HostWork::kCount));
    for (size_t i = 0; i < host_us_.size(); ++i) {
      std::vector<double>& v = host_us_[i];
      if (v.empty()) continue;
      double sum = 0;
      for (double us : v) sum += us;
      std::sort(v.begin(), v.end());
      std::fprintf(stderr,
                   "cuda_ipc trace (GPU %d, host): %zu %s took the progress thread median %.1f us, p90 %.1f, "
                   "max %.1f, %.1f ms in all\n",
                   options_.device, v.size(), kHostWork[i], v[v.size() / 2], v[v.size() * 9 / 10], v.back(),
                   sum / 1e3);
      v.clear();
    }
    if (!staged_round_trip_us_.empty()) {
      std::fprintf(
          stderr,
          "cuda_ipc trace (GPU %d, staged sender): %zu chunks; from handing a chunk to the receiver to "
          "its answer median %.1f us\n",
          options_.device, staged_round_trip_us_.size(), median_of(staged_round_trip_us_));
      staged_round_trip_us_.clear();
    }
    if (!put_interval_us_.empty() || !traced_gathers_.empty()) {
      std::vector<double> gather_us;
      for (const TracedPut& g : traced_gathers_) {
        auto ms = g.end->elapsed_ms_since(g.start);
        if (ms.ok()) gather_us.push_back(ms.value() * 1e3);
      }
      std::fprintf(
          stderr,
          "cuda_ipc trace (GPU %d, staged sender): %zu gathers, median %.1f us on the GPU; staged puts "
          "arrive every %.1f us (median)\n",
          options_.device, gather_us.size(), median_of(gather_us), median_of(put_interval_us_));
      traced_gathers_.clear();
      put_interval_us_.clear();
    }
    if (!scatter_us_.empty()) {
      std::fprintf(stderr,
                   "cuda_ipc trace (GPU %d, staged receiver): %zu scatters; from the request to the answer "
                   "median %.1f us\n",
                   options_.device, scatter_us_.size(), median_of(scatter_us_));
      scatter_us_.clear();
    }
    if (timeline_) {
      for (const TimelineMark& m : timeline_marks_)
        std::fprintf(stderr, "cuda_ipc timeline: %.1f %c\n", m.host_us, m.what);
      timeline_marks_.clear();
    }
    if (timeline_ && gpu_epoch_) {
      for (const TracedPut& t : traced_) {
        auto a = t.start.elapsed_ms_since(*gpu_epoch_);
        auto b = t.end->elapsed_ms_since(*gpu_epoch_);
        if (a.ok() && b.ok())
          std::fprintf(stderr, "cuda_ipc timeline: %.1f S\ncuda_ipc timeline: %.1f E\n",
                       gpu_epoch_host_us_ + a.value() * 1e3, gpu_epoch_host_us_ + b.value() * 1e3);
      }
    }
    if (traced_.empty()) return;
    std::vector<double> copy_us, gap_us;
    double busy_ms = 0;
    uint64_t bytes = 0;
    size_t segments = 0, engine_puts = 0;
    for (size_t i = 0; i < traced_.size(); ++i) {
      auto ms = traced_[i].end->elapsed_ms_since(traced_[i].start);
      if (!ms.ok()) continue;
      copy_us.push_back(ms.value() * 1e3);
      busy_ms += ms.value();
      bytes += traced_[i].bytes;
      segments += traced_[i].segments;
      engine_puts += traced_[i].copy_engines ? 1 : 0;
      if (i > 0) {
        auto gap = traced_[i].start.elapsed_ms_since(*traced_[i - 1].end);
        if (gap.ok() && gap.value() < 1.0) gap_us.push_back(gap.value() * 1e3);  // within a request
      }
    }
    auto median = [](std::vector<double> v) {
      if (v.empty()) return 0.0;
      std::nth_element(v.begin(), v.begin() + static_cast<long>(v.size() / 2), v.end());
      return v[v.size() / 2];
    };
    std::fprintf(
        stderr,
        "cuda_ipc trace (GPU %d, %zu stream(s)): %zu put batches (%zu on copy engines), %zu segments, "
        "%.1f MiB; copy time %.2f ms = %.1f GB/s while copying; per batch median %.1f us; gap between "
        "consecutive batches median %.1f us (%zu gaps under 1 ms)\n",
        options_.device, streams_.size(), copy_us.size(), engine_puts, segments,
        static_cast<double>(bytes) / (1 << 20), busy_ms,
        busy_ms > 0 ? static_cast<double>(bytes) / (busy_ms / 1e3) / 1e9 : 0.0, median(copy_us),
        median(gap_us), gap_us.size());
    if (!gap_us.empty()) {
      std::sort(gap_us.begin(), gap_us.end());
      double idle = 0;
      for (double g : gap_us) idle += g;
      std::fprintf(stderr,
                   "cuda_ipc trace (GPU %d): gaps under 1 ms: p90 %.1f us, max %.1f us, %.2f ms in all\n",
                   options_.device, gap_us[gap_us.size() * 9 / 10], gap_us.back(), idle / 1e3);
    }
    traced_.clear();
  }

  // Records an event on each of `streams` now; `done` runs once the streams have reached them.
  void enqueue_events(const std::vector<const gpudirect::CudaStream*>& streams,
                      std::function<void(const Status&)> done) {
    PendingEvent pending{{}, std::move(done)};
    for (const gpudirect::CudaStream* stream_ptr : streams) {
      const gpudirect::CudaStream& stream = *stream_ptr;
      std::vector<gpudirect::CudaEvent>& pool = free_events_[stream.device()];
      if (pool.empty()) {
        auto created = gpudirect::CudaEvent::create(stream.device());
        if (!created.ok()) {
          if (pending.done) pending.done(created.status());
          return;
        }
        pool.push_back(std::move(created.value()));
      }
      gpudirect::CudaEvent event = std::move(pool.back());
      pool.pop_back();
      if (Status s = event.record(stream.handle()); !s.ok()) {
        if (pending.done) pending.done(s);
        return;
      }
      pending.events.push_back(std::move(event));
    }
    events_.push_back(std::move(pending));
    if (!polling_) {
      polling_ = true;
      inner_->post_after(options_.poll_interval, [this] { poll_loop(); });
    }
  }

  void poll_loop() {
    poll();
    if (events_.empty()) {
      polling_ = false;
      return;
    }
    inner_->post_after(options_.poll_interval, [this] { poll_loop(); });
  }

  // Completes entries in the order they were made, each once all its events have fired: a
  // flush's events follow every earlier put's on each stream, so flushes finish in order too.
  void poll() {
    while (!events_.empty()) {
      PendingEvent& front = events_.front();
      while (!front.events.empty()) {
        auto ready = gpudirect::event_done(front.events.back().handle());
        if (!ready.ok()) {
          broken_ = Status(ready.status().code(), "cuda_ipc stream failed: " + ready.status().message());
          spdlog::error("{}", broken_.to_string());
          complete_all(broken_);
          return;
        }
        if (!ready.value()) return;
        free_events_[front.events.back().device()].push_back(std::move(front.events.back()));
        front.events.pop_back();
      }
      auto done = std::move(front.done);
      events_.pop_front();
      if (done) done(Status::Ok());
    }
  }

  void complete_all(const Status& s) {
    std::deque<PendingEvent> events;
    events.swap(events_);
    for (auto& e : events) {
      if (e.done) e.done(s);
    }
  }

  CudaIpcTransportOptions options_;
  std::unique_ptr<UcxTransport> inner_;
  std::vector<uint8_t> address_;
  // Progress-thread state.
  std::vector<gpudirect::CudaStream> streams_;
  size_t next_stream_ = 0;
  const bool trace_ = [] {
    const char* v = std::getenv("KVF_CUDA_IPC_TRACE");
    return v != nullptr && *v != '\0' && *v != '0';
  }();
  std::vector<TracedPut> traced_;
  // KVF_CUDA_IPC_TRACE=2 also keeps a timeline: host moments (a put taken, its copy launched, its
  // completion seen) and each copy's start and end on the GPU, on the host's steady clock (the GPU
  // clock is tied to it once, by waiting for an event on an idle stream), printed at the end so
  // that a request's start (kvfabric-perf --timeline) can be laid beside them.
  const bool timeline_ = [] {
    const char* v = std::getenv("KVF_CUDA_IPC_TRACE");
    return v != nullptr && std::string_view(v) == "2";
  }();
  struct TimelineMark {
    double host_us;
    char what;  // P: put taken, L: copy launched, D: completion seen, A: staged answer
  };
  std::vector<TimelineMark> timeline_marks_;
  std::optional<gpudirect::CudaEvent> gpu_epoch_;
  double gpu_epoch_host_us_ = 0;
  static double steady_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void mark(char what) {
    if (timeline_ && timeline_marks_.size() < 65536) timeline_marks_.push_back({steady_us(), what});
  }
  // Ties GPU event times to the host clock: an event recorded on an idle stream completes at once,
  // so the moment the host sees it complete is (within microseconds) its GPU time.
  void tie_gpu_clock(const gpudirect::CudaStream& stream) {
    if (!timeline_ || gpu_epoch_) return;
    auto e = gpudirect::CudaEvent::create(options_.device, true);
    if (!e.ok() || !stream.synchronize().ok() || !e->record(stream.handle()).ok()) return;
    for (;;) {
      auto done = e->done();
      if (!done.ok()) return;
      if (done.value()) break;
    }
    gpu_epoch_host_us_ = steady_us();
    gpu_epoch_.emplace(std::move(e.value()));
  }
  std::unique_ptr<gpudirect::SegmentCopier> copier_;
  std::unordered_map<PeerId, Peer> peers_;
  std::unordered_map<RemoteRegionId, Region> regions_;
  RemoteRegionId next_region_ = 1;
  std::deque<PendingEvent> events_;
  std::unordered_map<int, std::vector<gpudirect::CudaEvent>> free_events_;  // by device
  std::map<PeerId, std::unique_ptr<StagedLane>> lanes_;                     // staged puts, by peer
  std::vector<gpudirect::CopySegment> segments_;
  uint64_t adaptive_direct_ = 0, adaptive_staged_ = 0;  // kAdaptive's choices so far
  std::vector<uint64_t> staged_destinations_;  // the peer's address of each of segments_' destinations
  // KVF_CUDA_IPC_TRACE: when each staged chunk was handed to the receiver, and how long until
  // its answer came (copy + scatter + two messages).
  std::unordered_map<uint64_t, std::chrono::steady_clock::time_point> staged_sent_at_;
  std::vector<double> staged_round_trip_us_;
  // KVF_CUDA_IPC_TRACE: the progress thread's time on each piece of staged work (see HostWork).
  std::array<std::vector<double>, static_cast<size_t>(HostWork::kCount)> host_us_;
  std::vector<double> scatter_us_;  // receiver: request to answer
  std::vector<TracedPut> traced_gathers_;
  std::vector<double> put_interval_us_;
  std::optional<std::chrono::steady_clock::time_point> last_put_at_;
  // Names this transport's staging lanes to receivers (xor the peer id); random per process.
  const uint64_t token_base_ = std::random_device{}() | uint64_t{std::random_device{}()} << 32;
  // How long a sender waits for the receiver's staging offer. The nccl transport's receiver answers
  // only after both ranks joined the communicator (NCCL's bootstrap takes seconds), so it waits
  // longer; each side gives up joining after kNcclJoinTimeout.
  static constexpr std::chrono::seconds kOfferTimeout{10};
  static constexpr std::chrono::seconds kNcclOfferTimeout{40};
  static constexpr std::chrono::seconds kNcclJoinTimeout{30};
  static constexpr std::chrono::seconds kNcclCloseTimeout{10};
  std::atomic<bool> stopping_{false};
  // Receiver side of staging: slots offered to senders, and the connections back to them.
  std::unique_ptr<StagingReceiver> receiver_;
  std::unordered_map<uint64_t, PeerId> back_peers_;    // by sender token
  std::unordered_map<PeerId, uint64_t> back_senders_;  // by back connection
  // Helper threads for what blocks on a peer (connecting back, joining and closing NCCL
  // communicators). Started on the progress thread, joined by the destructor: hence the mutex.
  HelperThreads helpers_;
  NotificationHandler user_notification_handler_;
  PeerFailureHandler user_failure_handler_;
  // Uploaded request plans: direct puts (see resident_plan) and staged gathers (gather_plan).
  static constexpr size_t kResidentMinExtents = 16;
  static constexpr size_t kMaxResidentPlans = 64;
  gpudirect::ResidentPlanCache resident_{*copier_, kMaxResidentPlans};
  gpudirect::ResidentPlanCache gather_plans_{*copier_, kMaxResidentPlans};
  std::vector<gpudirect::CopySegment> relative_;
  uint64_t resident_src_base_ = 0;
  uint64_t resident_dst_base_ = 0;
  bool polling_ = false;
  Status broken_ = Status::Ok();  // a CUDA error is sticky: every later op fails with it
};

Result<std::unique_ptr<CudaIpcTransport>> CudaIpcTransport::create(
    std::shared_ptr<gpudirect::UcxContext> context, CudaIpcTransportOptions options) {
  auto inner = UcxTransport::create(std::move(context), options.ucx);
  if (!inner.ok()) return inner.status();
  // The streams and the copier are made on the progress thread, which issues all CUDA work.
  if (options.streams == 0 || options.streams > 16) {
    return Status(ErrorCode::kInvalidArgument, "cuda_ipc: streams must be 1..16");
  }
  std::promise<Status> made;
  std::vector<gpudirect::CudaStream> streams;
  std::unique_ptr<gpudirect::SegmentCopier> copier;
  inner.value()->post([&] {
    for (uint32_t i = 0; i < options.streams; ++i) {
      auto stream = gpudirect::CudaStream::create(options.device);
      if (!stream.ok()) return made.set_value(stream.status());
      streams.push_back(std::move(stream.value()));
    }
    auto c = gpudirect::SegmentCopier::create(options.device);
    if (!c.ok()) return made.set_value(c.status());
    copier = std::move(c.value());
    uint32_t blocks = options.copy_kernel_blocks;
    if (blocks == 0 && options.copy == CudaCopyMethod::kNccl)
      blocks = static_cast<uint32_t>(std::max(1, copier->multiprocessors()));
    if (blocks != 0) {
      gpudirect::KernelShape shape = copier->kernel_shape();
      shape.max_blocks = blocks;
      if (Status s = copier->set_kernel_shape(shape); !s.ok()) return made.set_value(s);
    }
    made.set_value(Status::Ok());
  });
  if (Status st = made.get_future().get(); !st.ok()) {
    return Status(st.code(),
                  "cuda_ipc transport on GPU " + std::to_string(options.device) + ": " + st.message());
  }
  auto impl =
      std::make_unique<Impl>(options, std::move(inner.value()), std::move(streams), std::move(copier));
  return std::unique_ptr<CudaIpcTransport>(new CudaIpcTransport(std::move(impl)));
}

CudaIpcTransport::CudaIpcTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaIpcTransport::~CudaIpcTransport() = default;

uint64_t CudaIpcTransport::suggested_inflight_bytes() const {
  return impl_->suggested_inflight_bytes();
}
std::string_view CudaIpcTransport::name() const {
  return impl_->name();
}
std::vector<uint8_t> CudaIpcTransport::address() const {
  return impl_->address();
}
int CudaIpcTransport::device() const {
  return impl_->device();
}
Result<PeerId> CudaIpcTransport::connect(std::span<const uint8_t> address, const ConnectOptions& options) {
  return impl_->connect(address, options);
}
Result<RemoteRegionId> CudaIpcTransport::import_region(PeerId peer,
                                                       const protocol::RegionDescriptor& region) {
  return impl_->import_region(peer, region);
}
void CudaIpcTransport::disconnect(PeerId peer) {
  impl_->disconnect(peer);
}
void CudaIpcTransport::put(PeerId peer, std::vector<PutOp> ops, Completion done) {
  impl_->put(peer, std::move(ops), nullptr, std::move(done));
}
void CudaIpcTransport::put_after_event(PeerId peer, std::vector<PutOp> ops, void* cuda_event,
                                       Completion done) {
  impl_->put(peer, std::move(ops), cuda_event, std::move(done));
}
void CudaIpcTransport::flush(PeerId peer, Completion done) {
  impl_->flush(peer, std::move(done));
}
void CudaIpcTransport::notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) {
  impl_->inner().notify(peer, bytes, std::move(done));
}
void CudaIpcTransport::set_notification_handler(NotificationHandler handler) {
  impl_->set_notification_handler(std::move(handler));
}
void CudaIpcTransport::set_peer_failure_handler(PeerFailureHandler handler) {
  impl_->set_peer_failure_handler(std::move(handler));
}
void CudaIpcTransport::post(std::function<void()> fn) {
  impl_->inner().post(std::move(fn));
}
void CudaIpcTransport::post_after(std::chrono::nanoseconds delay, std::function<void()> fn) {
  impl_->inner().post_after(delay, std::move(fn));
}

}  // namespace kvf::fabric
