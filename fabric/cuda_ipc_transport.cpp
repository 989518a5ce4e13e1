#include "kvf/fabric/cuda_ipc_transport.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <future>
#include <map>
#include <optional>
#include <unordered_map>

#include <spdlog/spdlog.h>
#include <xxhash.h>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/paged_copy.h"
#include "kvf/gpudirect/segment_copier.h"

namespace kvf::fabric {
namespace {

// address(): magic, version, device, boot id (which host), the inner UCX worker address.
constexpr uint32_t kAddressMagic = 0x4b564349;  // "KVCI"
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
  if (a.size() < 14 || get_u32(a.data()) != kAddressMagic) {
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
  return address.size() >= 4 && get_u32(address.data()) == kAddressMagic ? "cuda_ipc" : "ucx";
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
    put_u32(address_, kAddressMagic);
    address_.push_back(static_cast<uint8_t>(kAddressVersion));
    address_.push_back(static_cast<uint8_t>(kAddressVersion >> 8));
    put_u32(address_, static_cast<uint32_t>(options_.device));
    std::string boot = this_boot_id();
    put_u32(address_, static_cast<uint32_t>(boot.size()));
    address_.insert(address_.end(), boot.begin(), boot.end());
    auto ucx = inner_->address();
    address_.insert(address_.end(), ucx.begin(), ucx.end());
  }

  ~Impl() {
    // Nothing may still write through a mapping that is about to be closed.
    call<int>([this] {
      synchronize_all();
      report_trace();
      complete_all(Status(ErrorCode::kAborted, "transport shut down"));
      regions_.clear();
      peers_.clear();
      events_.clear();
      lanes_.clear();
      free_events_.clear();
      return 0;
    });
    inner_.reset();
  }

  const std::vector<uint8_t>& address() const { return address_; }
  int device() const { return options_.device; }
  Transport& inner() { return *inner_; }

  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options) {
    auto parsed = parse_address(address);
    if (!parsed.ok()) return parsed.status();
    if (parsed->boot_id != this_boot_id()) {
      return Status(ErrorCode::kUnavailable,
                    "cuda_ipc needs the peer on this host; it runs on another (boot id " + parsed->boot_id +
                        "): use the ucx or nccl transport between hosts");
    }
    ConnectOptions inner_options = options;
    inner_options.same_host = true;
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
    return call<Result<RemoteRegionId>>([&]() -> Result<RemoteRegionId> {
      auto p = peers_.find(peer);
      if (p == peers_.end()) return Status(ErrorCode::kNotFound, "unknown peer " + std::to_string(peer));
      // The blob is the exporter's base address of the allocation's exported range, then the
      // CUDA IPC blob; one mapping per allocation serves every region cut from it.
      uint64_t exported_base = get_u64(region.cuda_ipc.data());
      std::vector<uint8_t> blob(region.cuda_ipc.begin() + 8, region.cuda_ipc.end());
      // Staged puts scatter on the GPU that holds the region, so it is mapped there; direct puts
      // write from this GPU, so it is mapped here. One mapping per allocation either way.
      const int staged_device = staging_device_for(blob);
      const int map_on = staged_device >= 0 ? staged_device : options_.device;
      std::shared_ptr<gpudirect::CudaIpcMapping>& mapping = p->second.mappings[blob];
      if (!mapping) {
        auto opened = gpudirect::CudaIpcMapping::open(blob, map_on);
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
      regions_[mine] = Region{peer,
                              true,
                              base,
                              region.length,
                              0,
                              mapping,
                              mapping->local_device() != options_.device ? mapping->local_device() : -1};
      return mine;
    });
  }

  void disconnect(PeerId peer) {
    call<int>([&] {
      synchronize_all();  // no copy may still use the peer's mappings
      poll();
      for (auto it = regions_.begin(); it != regions_.end();) {
        it = it->second.peer == peer ? regions_.erase(it) : std::next(it);
      }
      peers_.erase(peer);
      return 0;
    });
    inner_->disconnect(peer);
  }

  void put(PeerId peer, std::vector<PutOp> ops, void* wait_event, Completion done) {
    inner_->post([this, peer, ops = std::move(ops), wait_event, done = std::move(done)]() mutable {
      start_put(peer, std::move(ops), wait_event, std::move(done));
    });
  }

  void flush(PeerId peer, Completion done) {
    inner_->post([this, peer, done = std::move(done)]() mutable {
      auto p = peers_.find(peer);
      if (p == peers_.end()) {
        if (done) done(Status(ErrorCode::kNotFound, "flush: unknown peer " + std::to_string(peer)));
        return;
      }
      bool host_puts = p->second.host_puts_since_flush > 0;
      p->second.host_puts_since_flush = 0;
      // Everything before this point on every stream is finished when these events are.
      enqueue_events(all_streams(), [this, peer, host_puts, done = std::move(done)](const Status& s) mutable {
        if (!s.ok() || !host_puts) {
          if (done) done(s);
          return;
        }
        inner_->flush(peer, std::move(done));
      });
    });
  }

  template <typename T>
  T call(const std::function<T()>& fn) {
    std::promise<T> promise;
    auto future = promise.get_future();
    inner_->post([&] { promise.set_value(fn()); });
    return future.get();
  }

 private:
  struct Peer {
    int device = 0;
    std::map<std::vector<uint8_t>, std::shared_ptr<gpudirect::CudaIpcMapping>> mappings;
    uint64_t host_puts_since_flush = 0;
  };
  struct Region {
    PeerId peer = 0;
    bool cuda = false;
    uint8_t* mapped = nullptr;  // this process's address of the region's first byte
    uint64_t length = 0;
    RemoteRegionId inner = 0;  // host regions: the id on the inner transport
    std::shared_ptr<gpudirect::CudaIpcMapping> mapping;
    int staged_device = -1;  // >= 0: mapped on that (peer) GPU, puts into it are staged
  };
  struct PendingEvent {
    std::vector<gpudirect::CudaEvent> events;  // all must have fired
    std::function<void(const Status&)> done;
  };
  // The staging of puts into one peer GPU's regions (see the header): two slots of
  // options_.staging_bytes on this GPU and on the peer's, a copy-engine stream here, and a stream
  // and copier on the peer's GPU for the scatter. A slot is reused only after the scatter that
  // read it (`scattered`), which the next gather into it waits for on the GPU.
  struct StagedLane {
    int device = -1;
    gpudirect::DeviceBuffer here;
    gpudirect::DeviceBuffer there;
    gpudirect::CudaStream copy_stream;
    gpudirect::CudaStream scatter_stream;
    std::unique_ptr<gpudirect::SegmentCopier> scatter;
    std::vector<gpudirect::CudaEvent> gathered = {}, copied = {}, scattered = {};
    std::vector<bool> used = {};
    uint32_t next_slot = 0;
    std::vector<gpudirect::CopySegment> gathers = {}, scatters = {};
  };
  static constexpr uint32_t kStagingSlots = 2;

  // The peer GPU to stage through for memory exported in `blob`, or -1 for direct copies.
  int staging_device_for(std::span<const uint8_t> blob) const {
    if (options_.copy != CudaCopyMethod::kStaged) return -1;
    auto holder = gpudirect::device_holding(blob);
    if (!holder.ok() || holder.value() < 0 || holder.value() == options_.device) return -1;
    return holder.value();
  }

  Result<StagedLane*> lane_for(int device) {
    auto it = lanes_.find(device);
    if (it != lanes_.end()) return it->second.get();
    // This process copies into the peer GPU's staging and runs kernels there.
    if (Status s = gpudirect::enable_peer_access(options_.device, device); !s.ok()) return s;
    const uint64_t bytes = options_.staging_bytes * kStagingSlots;
    auto here = gpudirect::DeviceBuffer::allocate(options_.device, bytes);
    if (!here.ok()) return here.status();
    auto there = gpudirect::DeviceBuffer::allocate(device, bytes);
    if (!there.ok()) return there.status();
    auto copy_stream = gpudirect::CudaStream::create(options_.device);
    if (!copy_stream.ok()) return copy_stream.status();
    auto scatter_stream = gpudirect::CudaStream::create(device);
    if (!scatter_stream.ok()) return scatter_stream.status();
    auto scatter = gpudirect::SegmentCopier::create(device);
    if (!scatter.ok()) return scatter.status();
    auto lane = std::make_unique<StagedLane>(
        StagedLane{device, std::move(here.value()), std::move(there.value()), std::move(copy_stream.value()),
                   std::move(scatter_stream.value()), std::move(scatter.value())});
    for (uint32_t i = 0; i < kStagingSlots; ++i) {
      auto g = gpudirect::CudaEvent::create(options_.device);
      auto c = gpudirect::CudaEvent::create(options_.device);
      auto d = gpudirect::CudaEvent::create(device);
      if (!g.ok()) return g.status();
      if (!c.ok()) return c.status();
      if (!d.ok()) return d.status();
      lane->gathered.push_back(std::move(g.value()));
      lane->copied.push_back(std::move(c.value()));
      lane->scattered.push_back(std::move(d.value()));
      lane->used.push_back(false);
    }
    spdlog::info(
        "cuda_ipc: staging puts into GPU {} through {} MiB slots (gather on GPU {}, copy engines, "
        "scatter on GPU {})",
        device, options_.staging_bytes >> 20, options_.device, device);
    return lanes_.emplace(device, std::move(lane)).first->second.get();
  }

  // One staging slot's worth: gather on `stream`, copy, scatter on the lane's stream.
  Status stage_slot(StagedLane& lane, const gpudirect::CudaStream& stream, uint32_t slot, uint64_t bytes) {
    if (lane.used[slot]) {
      if (Status s = stream.wait_event(lane.scattered[slot].handle()); !s.ok()) return s;
    }
    if (Status s = copier_->copy(lane.gathers, stream.handle()); !s.ok()) return s;
    if (Status s = lane.gathered[slot].record(stream); !s.ok()) return s;
    if (Status s = lane.copy_stream.wait_event(lane.gathered[slot].handle()); !s.ok()) return s;
    const uint64_t offset = uint64_t{slot} * options_.staging_bytes;
    if (Status s = lane.copy_stream.copy_async(static_cast<uint8_t*>(lane.there.data()) + offset,
                                               static_cast<const uint8_t*>(lane.here.data()) + offset, bytes);
        !s.ok()) {
      return s;
    }
    if (Status s = lane.copied[slot].record(lane.copy_stream); !s.ok()) return s;
    if (Status s = lane.scatter_stream.wait_event(lane.copied[slot].handle()); !s.ok()) return s;
    if (Status s = lane.scatter->copy(lane.scatters, lane.scatter_stream.handle()); !s.ok()) return s;
    if (Status s = lane.scattered[slot].record(lane.scatter_stream); !s.ok()) return s;
    lane.used[slot] = true;
    return Status::Ok();
  }

  // The batch (already bounds-checked into segments_, destinations as mapped on the lane's GPU)
  // through the staging slots; `done` when the last scatter has finished.
  Status staged_put(StagedLane& lane, const gpudirect::CudaStream& stream) {
    const uint64_t slot_bytes = options_.staging_bytes;
    uint64_t fill = 0;
    uint32_t slot = lane.next_slot;
    lane.gathers.clear();
    lane.scatters.clear();
    auto here = [&](uint64_t at) {
      return reinterpret_cast<uint64_t>(lane.here.data()) + slot * slot_bytes + at;
    };
    auto there = [&](uint64_t at) {
      return reinterpret_cast<uint64_t>(lane.there.data()) + slot * slot_bytes + at;
    };
    for (const gpudirect::CopySegment& seg : segments_) {
      for (uint64_t done_bytes = 0; done_bytes < seg.bytes;) {
        const uint64_t take = std::min(seg.bytes - done_bytes, slot_bytes - fill);
        lane.gathers.push_back(gpudirect::CopySegment{seg.src + done_bytes, here(fill), take});
        lane.scatters.push_back(gpudirect::CopySegment{there(fill), seg.dst + done_bytes, take});
        fill += take;
        done_bytes += take;
        if (fill == slot_bytes) {
          if (Status s = stage_slot(lane, stream, slot, fill); !s.ok()) return s;
          slot = (slot + 1) % kStagingSlots;
          fill = 0;
          lane.gathers.clear();
          lane.scatters.clear();
        }
      }
    }
    if (fill > 0) {
      if (Status s = stage_slot(lane, stream, slot, fill); !s.ok()) return s;
      slot = (slot + 1) % kStagingSlots;
    }
    lane.next_slot = slot;
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
    const int staged_device = first->second.staged_device;
    segments_.clear();
    segments_.reserve(ops.size());
    for (const PutOp& op : ops) {
      auto r = regions_.find(op.remote);
      if (r == regions_.end() || r->second.peer != peer || !r->second.cuda) {
        return fail(Status(ErrorCode::kInvalidArgument, "a put batch mixes GPU and host regions"));
      }
      if (r->second.staged_device != staged_device) {
        return fail(Status(ErrorCode::kInvalidArgument, "a put batch spans regions on different GPUs"));
      }
      if (op.remote_offset > r->second.length || op.length > r->second.length - op.remote_offset) {
        return fail(Status(ErrorCode::kInvalidArgument,
                           "put of " + std::to_string(op.length) + " bytes at offset " +
                               std::to_string(op.remote_offset) + " overruns the peer's region of " +
                               std::to_string(r->second.length) + " bytes"));
      }
      segments_.push_back(
          gpudirect::CopySegment{reinterpret_cast<uint64_t>(op.local),
                                 reinterpret_cast<uint64_t>(r->second.mapped + op.remote_offset), op.length});
    }
    const gpudirect::CudaStream& stream = streams_[next_stream_];
    next_stream_ = (next_stream_ + 1) % streams_.size();
    if (wait_event != nullptr) {
      if (Status s = stream.wait_event(wait_event); !s.ok()) return fail(s);
    }
    // Every batch into a region mapped on its own GPU is staged: copy-engine copies from here
    // into such a mapping were measured at 37 GB/s (the driver does not take the peer path).
    if (staged_device >= 0) {
      auto lane = lane_for(staged_device);
      Status launched = lane.ok() ? staged_put(*lane.value(), stream) : lane.status();
      if (!launched.ok()) {
        broken_ = Status(launched.code(), "cuda_ipc staged copy failed: " + launched.message());
        spdlog::error("{}", broken_.to_string());
        complete_all(broken_);
        return fail(broken_);
      }
      enqueue_events({&lane.value()->scatter_stream}, std::move(done));
      return;
    }
    std::optional<TracedPut> traced = begin_trace(stream);
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
    enqueue_events({&stream}, std::move(done));
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
    const XXH128_hash_t h = XXH3_128bits(relative_.data(), relative_.size() * sizeof(gpudirect::CopySegment));
    const PlanKey key{h.low64, h.high64, relative_.size()};
    auto it = resident_.find(key);
    if (it == resident_.end()) {
      if (resident_.size() >= kMaxResidentPlans) {
        synchronize_all();  // no launch may still read a plan that goes
        resident_.clear();
      }
      auto made = copier_->make_resident(relative_);
      if (!made.ok()) return nullptr;  // too many pieces for one launch: the plain path splits
      it = resident_.emplace(key, std::move(made.value())).first;
    }
    resident_src_base_ = src_base;
    resident_dst_base_ = dst_base;
    return &it->second;
  }

  bool use_copy_engines(const std::vector<gpudirect::CopySegment>& segments) const {
    switch (options_.copy) {
      case CudaCopyMethod::kKernel:
        return false;
      case CudaCopyMethod::kCopyEngine:
      case CudaCopyMethod::kCopyEnginePerCopy:
        return true;
      case CudaCopyMethod::kAuto:
      case CudaCopyMethod::kStaged:  // here only when the peer's GPU is not visible here: as kAuto
        break;
    }
    return gpudirect::total_bytes(segments) / segments.size() >= options_.copy_engine_min_extent;
  }

  // Every stream work is issued on: a staged put ends on its lane's scatter stream, which waits
  // for the lane's copy stream, which waits for the gather on one of streams_.
  std::vector<const gpudirect::CudaStream*> all_streams() const {
    std::vector<const gpudirect::CudaStream*> out;
    for (const auto& stream : streams_) out.push_back(&stream);
    for (const auto& [device, lane] : lanes_) out.push_back(&lane->scatter_stream);
    return out;
  }

  void synchronize_all() {
    for (const auto& lane : lanes_) {
      (void)lane.second->copy_stream.synchronize();
      (void)lane.second->scatter_stream.synchronize();
    }
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
  std::optional<TracedPut> begin_trace(const gpudirect::CudaStream& stream) {
    if (!trace_ || traced_.size() >= 65536) return std::nullopt;
    auto start = gpudirect::CudaEvent::create(options_.device, true);
    if (!start.ok() || !start->record(stream.handle()).ok()) return std::nullopt;
    return TracedPut{std::move(start.value()), std::nullopt, gpudirect::total_bytes(segments_),
                     segments_.size(), use_copy_engines(segments_)};
  }
  void end_trace(TracedPut put, const gpudirect::CudaStream& stream) {
    auto end = gpudirect::CudaEvent::create(options_.device, true);
    if (!end.ok() || !end->record(stream.handle()).ok()) return;
    put.end.emplace(std::move(end.value()));
    traced_.push_back(std::move(put));
  }
  void report_trace() {
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
  std::unique_ptr<gpudirect::SegmentCopier> copier_;
  std::unordered_map<PeerId, Peer> peers_;
  std::unordered_map<RemoteRegionId, Region> regions_;
  RemoteRegionId next_region_ = 1;
  std::deque<PendingEvent> events_;
  std::unordered_map<int, std::vector<gpudirect::CudaEvent>> free_events_;  // by device
  std::map<int, std::unique_ptr<StagedLane>> lanes_;                        // by peer GPU
  std::vector<gpudirect::CopySegment> segments_;
  // Uploaded request plans (see resident_plan), keyed by a 128-bit hash of the relative extents.
  struct PlanKey {
    uint64_t low = 0, high = 0, count = 0;
    bool operator==(const PlanKey&) const = default;
  };
  struct PlanKeyHash {
    size_t operator()(const PlanKey& k) const { return k.low ^ (k.high * 31) ^ k.count; }
  };
  static constexpr size_t kResidentMinExtents = 16;
  static constexpr size_t kMaxResidentPlans = 64;
  std::unordered_map<PlanKey, gpudirect::ResidentSegments, PlanKeyHash> resident_;
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
  impl_->inner().set_notification_handler(std::move(handler));
}
void CudaIpcTransport::set_peer_failure_handler(PeerFailureHandler handler) {
  impl_->inner().set_peer_failure_handler(std::move(handler));
}
void CudaIpcTransport::post(std::function<void()> fn) {
  impl_->inner().post(std::move(fn));
}
void CudaIpcTransport::post_after(std::chrono::nanoseconds delay, std::function<void()> fn) {
  impl_->inner().post_after(delay, std::move(fn));
}

}  // namespace kvf::fabric
