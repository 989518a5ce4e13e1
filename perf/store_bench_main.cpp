// kvfabric-store-bench: the in-process cost of the prefix store core, each figure beside its
// anchor measured in the same run.
//   lookups: 64-key prompts through ChunkStore::lookup (hits, a miss at the first key, a miss
//            half way), on 1..N threads; anchor: the same probes into a bare std::unordered_map
//            with no lock and no LRU.
//   put/get: reserve + memcpy into the arena + commit (which hashes the bytes), and acquire +
//            memcpy out + release (and + verify); anchor: plain memcpy of the same chunks.
//            Rounds alternate store and memcpy; medians and their ratio are printed.
//   ssd:     with --ssd-path DIR, the SSD tier under the store (a file of --ssd-bytes in DIR):
//            spill = the reserves that evict a round of chunks from a full arena into the tier
//            (each one writes a chunk; the evicting caller waits for its write, other callers do
//            not: the write runs without the store's mutex);
//            promote = acquire + release of each spilled chunk into a free arena (read back and
//            checksummed); anchors: raw pwrite and pread of the same chunk-sized pieces to and from
//            another file in DIR, with O_DIRECT exactly when the tier has it, and pread + the
//            same checksum (what a promotion cannot avoid on one thread). Rounds alternate store
//            and raw I/O; medians and their ratios are printed. Meanwhile another thread times
//            store lookups during the spills and, its anchor, during the raw writes.
//   kvfabric-store-bench [--arena 1G] [--sizes 256K,4M] [--round-bytes 256M] [--rounds 7]
//                        [--lookup-entries 131072] [--prompt-keys 64] [--threads 1,2] [--seconds 1]
//                        [--shm] [--ssd-path DIR [--ssd-bytes 1G] [--ssd-io auto]] [--json FILE]
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "kvf/store/chunk_store.h"
#include "perf_util.h"

namespace {

using namespace kvf;
using namespace kvf::store;
using protocol::ChunkKey;
using Clock = std::chrono::steady_clock;

int fail(const std::string& message) {
  std::fprintf(stderr, "kvfabric-store-bench: %s\n", message.c_str());
  return 1;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

Result<std::unique_ptr<ChunkStore>> make_store(uint64_t bytes, bool shm, const std::string& tag) {
  auto arena = shm ? gpudirect::MemoryRegion::create_shared(
                         nullptr, "/kvf-store-bench-" + tag + "-" + std::to_string(getpid()), bytes)
                   : gpudirect::MemoryRegion::allocate_host(nullptr, bytes);
  if (!arena.ok()) return arena.status();
  ChunkStoreOptions options;
  options.alignment = 256;
  return ChunkStore::create(std::move(arena.value()), std::move(options));
}

// --- lookups ------------------------------------------------------------------------------------

struct LookupResult {
  std::string mode;
  unsigned threads = 0;
  double prompts_per_s = 0;
  double keys_per_s = 0;         // keys probed (a prompt that misses at key k probes k+1)
  double anchor_keys_per_s = 0;  // the same probes into a bare unordered_map
};

// Runs `probe(prompt index)` on `threads` threads for `seconds`; returns (prompts, keys probed)/s.
template <typename Probe>
std::pair<double, double> run_threads(unsigned threads, double seconds, size_t prompts, Probe probe) {
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> total_prompts{0}, total_keys{0};
  std::vector<std::thread> pool;
  auto start = Clock::now();
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::mt19937_64 rng(t + 1);
      uint64_t n = 0, keys = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        for (int i = 0; i < 64; ++i, ++n) keys += probe(rng() % prompts);
      }
      total_prompts += n;
      total_keys += keys;
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : pool) t.join();
  double elapsed = seconds_since(start);
  return {static_cast<double>(total_prompts.load()) / elapsed,
          static_cast<double>(total_keys.load()) / elapsed};
}

Result<std::vector<LookupResult>> bench_lookups(const cxxopts::ParseResult& args,
                                                const std::vector<uint64_t>& threads) {
  const uint64_t entries = args["lookup-entries"].as<uint64_t>();
  const size_t prompt_keys = args["prompt-keys"].as<size_t>();
  const double seconds = args["seconds"].as<double>();
  if (prompt_keys == 0 || entries < prompt_keys)
    return Status(ErrorCode::kInvalidArgument, "bad --prompt-keys");
  const size_t prompts = entries / prompt_keys;
  // One 256-byte chunk per key: the index is what is measured, not the bytes.
  auto created = make_store(entries * 256, args["shm"].as<bool>(), "lookup");
  if (!created.ok()) return created.status();
  ChunkStore& store = *created.value();
  std::mt19937_64 rng(1);
  std::vector<std::vector<ChunkKey>> hit(prompts), miss(prompts), half(prompts);
  std::unordered_map<ChunkKey, uint64_t> bare;
  for (size_t p = 0; p < prompts; ++p) {
    for (size_t k = 0; k < prompt_keys; ++k) {
      ChunkKey key{rng(), rng()};
      auto r = store.reserve(key, 256, 1);
      if (!r.ok()) return r.status();
      if (Status s = store.commit(key, r->id); !s.ok()) return s;
      bare.emplace(key, r->offset);
      hit[p].push_back(key);
    }
    miss[p] = hit[p];
    miss[p][0] = ChunkKey{rng(), rng()};
    half[p] = hit[p];
    half[p][prompt_keys / 2] = ChunkKey{rng(), rng()};
  }
  auto bare_lookup = [&bare](const std::vector<ChunkKey>& keys) {
    size_t n = 0;
    for (const auto& k : keys) {
      if (bare.find(k) == bare.end()) break;
      ++n;
    }
    return n;
  };
  std::vector<LookupResult> out;
  struct Mode {
    const char* name;
    std::vector<std::vector<ChunkKey>>* prompts;
  };
  for (Mode mode : {Mode{"hit", &hit}, Mode{"miss-first", &miss}, Mode{"miss-half", &half}}) {
    for (uint64_t t : threads) {
      auto& ps = *mode.prompts;
      auto [pps, kps] = run_threads(static_cast<unsigned>(t), seconds, prompts, [&](size_t p) {
        size_t m = store.lookup(ps[p]);
        return m == ps[p].size() ? m : m + 1;
      });
      // The anchor runs on bare memory shared read-only by the threads (no writes: no lock needed).
      auto [apps, akps] = run_threads(static_cast<unsigned>(t), seconds, prompts, [&](size_t p) {
        size_t m = bare_lookup(ps[p]);
        return m == ps[p].size() ? m : m + 1;
      });
      (void)apps;
      out.push_back({mode.name, static_cast<unsigned>(t), pps, kps, akps});
    }
  }
  return out;
}

// --- put/get vs memcpy --------------------------------------------------------------------------

struct CopyResult {
  uint64_t chunk_bytes = 0;
  uint64_t chunks = 0;
  double put_gbps = 0, get_gbps = 0, get_verify_gbps = 0, memcpy_gbps = 0;
};

Result<std::vector<CopyResult>> bench_copies(const cxxopts::ParseResult& args,
                                             const std::vector<uint64_t>& sizes) {
  auto arena_bytes = perf::parse_size(args["arena"].as<std::string>());
  auto round_bytes = perf::parse_size(args["round-bytes"].as<std::string>());
  const int rounds = args["rounds"].as<int>();
  if (!arena_bytes || !round_bytes || rounds < 1)
    return Status(ErrorCode::kInvalidArgument, "bad --arena, --round-bytes or --rounds");
  auto created = make_store(*arena_bytes, args["shm"].as<bool>(), "copy");
  if (!created.ok()) return created.status();
  ChunkStore& store = *created.value();
  std::vector<CopyResult> out;
  for (uint64_t size : sizes) {
    uint64_t chunks = std::max<uint64_t>(4, *round_bytes / size);
    // Leave the allocator slack so a round never evicts (eviction is not what is measured).
    while (chunks > 1 && chunks * (size + 256) > *arena_bytes) --chunks;
    const uint64_t total = chunks * size;
    // Page-aligned like the arena and like engines' buffers: memcpy's speed depends on how source
    // and destination are aligned to each other (malloc's 16-byte offset made every copy out of
    // the arena 3x slower than the anchor on AMD EPYC).
    auto src_region = gpudirect::MemoryRegion::allocate_host(nullptr, total);
    auto dst_region = gpudirect::MemoryRegion::allocate_host(nullptr, total);
    if (!src_region.ok()) return src_region.status();
    if (!dst_region.ok()) return dst_region.status();
    std::span<uint8_t> src(src_region->data(), total), dst(dst_region->data(), total);
    std::mt19937_64 rng(size);
    for (size_t i = 0; i < total; i += 8) {
      uint64_t v = rng();
      std::memcpy(src.data() + i, &v, std::min<size_t>(8, total - i));
    }
    std::memset(dst.data(), 0, total);
    std::vector<ChunkKey> keys(chunks);
    for (auto& k : keys) k = ChunkKey{rng(), rng()};
    std::vector<double> put_s, get_s, getv_s, memcpy_s;
    for (int round = -1; round < rounds; ++round) {  // round -1 warms up (faults the arena in)
      store.clear_all();
      auto t0 = Clock::now();
      for (uint64_t i = 0; i < chunks; ++i) {
        auto r = store.reserve(keys[i], size, 1);
        if (!r.ok()) return r.status();
        std::memcpy(store.bytes(r.value()).data(), src.data() + i * size, size);
        if (Status s = store.commit(keys[i], r->id); !s.ok()) return s;
      }
      double put = seconds_since(t0);
      // The anchor: the same chunk-sized copies with no store around them.
      t0 = Clock::now();
      for (uint64_t i = 0; i < chunks; ++i) std::memcpy(dst.data() + i * size, src.data() + i * size, size);
      double copy = seconds_since(t0);
      t0 = Clock::now();
      for (uint64_t i = 0; i < chunks; ++i) {
        auto l = store.acquire(keys[i], 2);
        if (!l.ok()) return l.status();
        std::memcpy(dst.data() + i * size, store.bytes(l.value()).data(), size);
        if (Status s = store.release(l->id); !s.ok()) return s;
      }
      double get = seconds_since(t0);
      t0 = Clock::now();
      for (uint64_t i = 0; i < chunks; ++i) {
        auto l = store.acquire(keys[i], 2);
        if (!l.ok()) return l.status();
        std::memcpy(dst.data() + i * size, store.bytes(l.value()).data(), size);
        if (Status s = store.verify(l.value()); !s.ok()) return s;
        if (Status s = store.release(l->id); !s.ok()) return s;
      }
      double getv = seconds_since(t0);
      if (std::memcmp(dst.data(), src.data(), total) != 0) {
        return Status(ErrorCode::kVerifyFailed, "bytes read back from the store differ");
      }
      if (round < 0) continue;
      put_s.push_back(put);
      get_s.push_back(get);
      getv_s.push_back(getv);
      memcpy_s.push_back(copy);
    }
    auto gbps = [total](const std::vector<double>& s) {
      return static_cast<double>(total) / perf::percentile(s, 50) / 1e9;
    };
    out.push_back({size, chunks, gbps(put_s), gbps(get_s), gbps(getv_s), gbps(memcpy_s)});
  }
  store.clear_all();
  return out;
}

// --- the SSD tier: spill and promote vs raw file I/O ----------------------------------------------

struct SsdResult {
  uint64_t chunk_bytes = 0;
  uint64_t chunks = 0;
  double spill_gbps = 0, raw_write_gbps = 0, promote_gbps = 0, raw_read_gbps = 0;
  double raw_read_hash_gbps = 0;  // pread + the checksum a promotion checks: its floor on one thread
  double spill_ms_per_chunk = 0;  // how long the evicting reserve takes per spilled chunk
  // Another thread's store calls (LookupProber) while the spills run, and, the anchor, while the
  // raw writes run (the same disk load, no store involved): p99 and max, ms.
  double lookup_p99_spill_ms = 0, lookup_max_spill_ms = 0;
  double lookup_p99_write_ms = 0, lookup_max_write_ms = 0;
};

// While a phase runs, another thread calls ChunkStore::lookup (of a key the store does not hold:
// it still takes the store's mutex) every 50 us and records how long each call took: what any
// store call waits for while that phase runs.
class LookupProber {
 public:
  explicit LookupProber(ChunkStore& store) : store_(store), thread_([this] { run(); }) {}
  ~LookupProber() { stop(); }
  // Stops the thread; the latencies (ms) of every call made.
  std::vector<double>& stop() {
    done_ = true;
    if (thread_.joinable()) thread_.join();
    return ms_;
  }

 private:
  void run() {
    const ChunkKey absent[] = {ChunkKey{0x5eed, 0x0b5e}};
    while (!done_.load()) {
      const auto t0 = std::chrono::steady_clock::now();
      (void)store_.lookup(absent);
      ms_.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  ChunkStore& store_;
  std::atomic<bool> done_{false};
  std::vector<double> ms_;
  std::thread thread_;  // last: starts once the rest is made
};

struct AlignedBuffer {
  explicit AlignedBuffer(uint64_t bytes)
      : data(static_cast<uint8_t*>(
            std::aligned_alloc(kSsdBlock, (bytes + kSsdBlock - 1) / kSsdBlock * kSsdBlock))) {}
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  uint8_t* data;
};

Status full_io(bool write, int fd, uint8_t* data, uint64_t length, uint64_t offset) {
  uint64_t done = 0;
  while (done < length) {
    ssize_t n = write ? ::pwrite(fd, data + done, length - done, static_cast<off_t>(offset + done))
                      : ::pread(fd, data + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return Status(ErrorCode::kInternal, std::string(write ? "pwrite" : "pread") + " of the anchor file: " +
                                              (n < 0 ? std::strerror(errno) : "end of file"));
    }
    done += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Result<std::pair<std::string, std::vector<SsdResult>>> bench_ssd(const cxxopts::ParseResult& args,
                                                                 const std::vector<uint64_t>& sizes) {
  const std::string dir = args["ssd-path"].as<std::string>();
  auto ssd_bytes = perf::parse_size(args["ssd-bytes"].as<std::string>());
  auto round_bytes = perf::parse_size(args["round-bytes"].as<std::string>());
  const int rounds = args["rounds"].as<int>();
  if (!ssd_bytes || !round_bytes || rounds < 1) {
    return Status(ErrorCode::kInvalidArgument, "bad --ssd-bytes, --round-bytes or --rounds");
  }
  const std::string tag = std::to_string(getpid());
  std::string mode;
  std::vector<SsdResult> out;
  for (uint64_t size : sizes) {
    if (size % kSsdBlock != 0) {
      return Status(ErrorCode::kInvalidArgument, "--sizes: SSD chunk sizes must be multiples of 4 KiB");
    }
    const uint64_t chunks = std::max<uint64_t>(4, *round_bytes / size);
    const uint64_t total = chunks * size;
    if (*ssd_bytes < total) {
      return Status(ErrorCode::kInvalidArgument,
                    "--ssd-bytes must hold a round (" + std::to_string(total) + ")");
    }
    // The arena holds exactly one round: each filler chunk reserved after it spills one real chunk.
    // 4 KiB alignment, as kvfabricd sets with an SSD tier: blocks are O_DIRECT buffers as they lie.
    auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, total);
    if (!arena.ok()) return arena.status();
    ChunkStoreOptions options;
    options.alignment = kSsdBlock;
    options.ssd = SsdTierOptions{};
    options.ssd->path = dir + "/kvf-store-bench-" + tag + ".ssd";
    options.ssd->capacity = *ssd_bytes;
    const std::string io = args["ssd-io"].as<std::string>();
    if (io == "buffered") {
      options.ssd->io = SsdIoMode::kBuffered;
    } else if (io == "direct") {
      options.ssd->io = SsdIoMode::kDirect;
    } else if (io != "auto") {
      return Status(ErrorCode::kInvalidArgument, "--ssd-io: auto, direct or buffered");
    }
    auto created = ChunkStore::create(std::move(arena.value()), std::move(options));
    if (!created.ok()) return created.status();
    ChunkStore& store = *created.value();
    const bool direct = store.ssd_tier()->direct();
    mode = store.ssd_tier()->io_name();

    const std::string anchor_path = dir + "/kvf-store-bench-" + tag + ".anchor";
    const int fd =
        ::open(anchor_path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | (direct ? O_DIRECT : 0), 0600);
    if (fd < 0) return Status(ErrorCode::kInternal, "open " + anchor_path + ": " + std::strerror(errno));
    struct Closer {
      int fd;
      std::string path;
      ~Closer() {
        ::close(fd);
        ::unlink(path.c_str());
      }
    } closer{fd, anchor_path};
    if (int err = ::posix_fallocate(fd, 0, static_cast<off_t>(2 * total)); err != 0) {
      return Status(ErrorCode::kInternal, "posix_fallocate " + anchor_path + ": " + std::strerror(err));
    }

    AlignedBuffer src(total), dst(total);
    std::mt19937_64 rng(size);
    for (uint64_t i = 0; i < total; i += 8) {
      uint64_t v = rng();
      std::memcpy(src.data + i, &v, std::min<uint64_t>(8, total - i));
    }
    std::vector<ChunkKey> real(chunks), filler(chunks);
    for (auto& k : real) k = ChunkKey{rng(), rng()};
    for (auto& k : filler) k = ChunkKey{rng(), rng()};
    std::vector<double> spill_s, promote_s, write_s, read_s, read_hash_s;
    std::vector<double> lookup_spill_ms, lookup_write_ms;
    for (int round = -1; round < rounds; ++round) {  // round -1 warms up (faults the arena, the file)
      store.clear_all();
      for (uint64_t i = 0; i < chunks; ++i) {
        auto r = store.reserve(real[i], size, 1);
        if (!r.ok()) return r.status();
        std::memcpy(store.bytes(r.value()).data(), src.data + i * size, size);
        if (Status s = store.commit(real[i], r->id); !s.ok()) return s;
      }
      const uint64_t spills_before = store.stats().ssd_spills;
      double spill = 0;
      auto prober = std::make_unique<LookupProber>(store);
      for (uint64_t i = 0; i < chunks; ++i) {
        auto t0 = Clock::now();
        auto r = store.reserve(filler[i], size, 1);  // evicts and spills real[i]
        spill += seconds_since(t0);
        if (!r.ok()) return r.status();
        if (Status s = store.commit(filler[i], r->id); !s.ok()) return s;
      }
      if (round >= 0) {
        const std::vector<double>& ms = prober->stop();
        lookup_spill_ms.insert(lookup_spill_ms.end(), ms.begin(), ms.end());
      }
      prober.reset();
      if (store.stats().ssd_spills - spills_before != chunks) {
        return Status(ErrorCode::kInternal, "a round did not spill every chunk to the SSD tier");
      }
      store.clear(filler);  // room for the promotions: none of them spills
      auto t0 = Clock::now();
      for (uint64_t i = 0; i < chunks; ++i) {
        auto l = store.acquire(real[i], 2);  // promotes: reads and checksums
        if (!l.ok()) return l.status();
        if (Status s = store.release(l->id); !s.ok()) return s;
      }
      const double promote = seconds_since(t0);
      for (uint64_t i = 0; i < chunks; ++i) {  // now in DRAM: check what came back
        auto l = store.acquire(real[i], 2);
        if (!l.ok()) return l.status();
        if (std::memcmp(store.bytes(l.value()).data(), src.data + i * size, size) != 0) {
          return Status(ErrorCode::kVerifyFailed, "a promoted chunk differs from what was stored");
        }
        if (Status s = store.release(l->id); !s.ok()) return s;
      }
      // The anchors, each write followed at once by the read of what it wrote, as the promotions
      // follow the spills: a virtual disk's host may cache recent writes, so every timed read is
      // of bytes written the same distance before it.
      // The two anchors swap halves of the file every round (the host's cache may favour one).
      const uint64_t a = (round & 1) != 0 ? total : 0, b = total - a;
      prober = std::make_unique<LookupProber>(store);
      t0 = Clock::now();
      for (uint64_t i = 0; i < chunks; ++i) {
        if (Status s = full_io(true, fd, src.data + i * size, size, a + i * size); !s.ok()) return s;
      }
      const double write = seconds_since(t0);
      if (round >= 0) {
        const std::vector<double>& ms = prober->stop();
        lookup_write_ms.insert(lookup_write_ms.end(), ms.begin(), ms.end());
      }
      prober.reset();
      t0 = Clock::now();
      for (uint64_t i = 0; i < chunks; ++i) {
        if (Status s = full_io(false, fd, dst.data + i * size, size, a + i * size); !s.ok()) return s;
      }
      const double read = seconds_since(t0);
      if (std::memcmp(dst.data, src.data, total) != 0) {
        return Status(ErrorCode::kVerifyFailed, "the anchor read back other bytes");
      }
      for (uint64_t i = 0; i < chunks; ++i) {
        if (Status s = full_io(true, fd, src.data + i * size, size, b + i * size); !s.ok()) return s;
      }
      uint64_t sums = 0;
      t0 = Clock::now();
      for (uint64_t i = 0; i < chunks; ++i) {
        if (Status s = full_io(false, fd, dst.data + i * size, size, b + i * size); !s.ok()) return s;
        sums ^= chunk_checksum(dst.data + i * size, size);
      }
      const double read_hash = seconds_since(t0);
      if (sums == 0x5eed) std::printf("(improbable checksum)\n");  // keeps the hash from being elided
      if (round < 0) continue;
      spill_s.push_back(spill);
      promote_s.push_back(promote);
      write_s.push_back(write);
      read_s.push_back(read);
      read_hash_s.push_back(read_hash);
    }
    store.clear_all();
    auto gbps = [total](const std::vector<double>& s) {
      return static_cast<double>(total) / perf::percentile(s, 50) / 1e9;
    };
    SsdResult r;
    r.chunk_bytes = size;
    r.chunks = chunks;
    r.spill_gbps = gbps(spill_s);
    r.raw_write_gbps = gbps(write_s);
    r.promote_gbps = gbps(promote_s);
    r.raw_read_gbps = gbps(read_s);
    r.raw_read_hash_gbps = gbps(read_hash_s);
    r.spill_ms_per_chunk = perf::percentile(spill_s, 50) / static_cast<double>(chunks) * 1e3;
    if (!lookup_spill_ms.empty() && !lookup_write_ms.empty()) {
      r.lookup_p99_spill_ms = perf::percentile(lookup_spill_ms, 99);
      r.lookup_max_spill_ms = perf::percentile(lookup_spill_ms, 100);
      r.lookup_p99_write_ms = perf::percentile(lookup_write_ms, 99);
      r.lookup_max_write_ms = perf::percentile(lookup_write_ms, 100);
    }
    out.push_back(r);
  }
  return std::make_pair(mode, out);
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-store-bench", "The prefix store core in-process, beside its anchors.");
  // clang-format off
  options.add_options()
      ("arena", "put/get: the store arena", cxxopts::value<std::string>()->default_value("1G"))
      ("sizes", "put/get: chunk sizes", cxxopts::value<std::string>()->default_value("256K,4M"))
      ("round-bytes", "put/get: bytes moved per round (fresh to the cache)", cxxopts::value<std::string>()->default_value("256M"))
      ("rounds", "put/get: timed rounds (medians are reported)", cxxopts::value<int>()->default_value("7"))
      ("lookup-entries", "lookups: chunk keys held by the store", cxxopts::value<uint64_t>()->default_value("131072"))
      ("prompt-keys", "lookups: keys per prompt", cxxopts::value<size_t>()->default_value("64"))
      ("threads", "lookups: thread counts", cxxopts::value<std::string>()->default_value("1,2"))
      ("seconds", "lookups: seconds per measurement", cxxopts::value<double>()->default_value("1"))
      ("shm", "arena in POSIX shared memory instead of private memory", cxxopts::value<bool>()->default_value("false"))
      ("skip-lookups", "only put/get", cxxopts::value<bool>()->default_value("false"))
      ("skip-copies", "only lookups", cxxopts::value<bool>()->default_value("false"))
      ("ssd-path", "ssd: measure the SSD tier with its file (and the anchor's) in this directory", cxxopts::value<std::string>())
      ("ssd-bytes", "ssd: the SSD tier's size (at least --round-bytes)", cxxopts::value<std::string>()->default_value("1G"))
      ("ssd-io", "ssd: the tier's I/O, auto (O_DIRECT where the fs takes it), direct or buffered; the anchor does the same", cxxopts::value<std::string>()->default_value("auto"))
      ("json", "also write the results to FILE", cxxopts::value<std::string>())
      ("h,help", "this help");
  // clang-format on
  cxxopts::ParseResult args;
  try {
    args = options.parse(argc, argv);
  } catch (const std::exception& e) {
    return fail(e.what());
  }
  if (args.count("help") != 0) {
    std::printf("%s\n", options.help().c_str());
    return 0;
  }
  auto sizes = perf::parse_size_list(args["sizes"].as<std::string>());
  if (!sizes.ok()) return fail(sizes.status().message());
  auto threads = perf::parse_size_list(args["threads"].as<std::string>());  // plain integers parse as sizes
  if (!threads.ok()) return fail("--threads: " + threads.status().message());

  nlohmann::json json;
  json["shm"] = args["shm"].as<bool>();
  if (!args["skip-lookups"].as<bool>()) {
    auto lookups = bench_lookups(args, threads.value());
    if (!lookups.ok()) return fail(lookups.status().to_string());
    std::printf("lookups: %llu keys stored, %zu-key prompts\n",
                static_cast<unsigned long long>(args["lookup-entries"].as<uint64_t>()),
                args["prompt-keys"].as<size_t>());
    std::printf("%-11s %7s %14s %14s %18s %7s\n", "mode", "threads", "prompts/s", "keys/s", "anchor keys/s",
                "ratio");
    for (const auto& r : lookups.value()) {
      std::printf("%-11s %7u %14.0f %14.0f %18.0f %7.2f\n", r.mode.c_str(), r.threads, r.prompts_per_s,
                  r.keys_per_s, r.anchor_keys_per_s, r.keys_per_s / r.anchor_keys_per_s);
      json["lookups"].push_back({{"mode", r.mode},
                                 {"threads", r.threads},
                                 {"prompts_per_s", r.prompts_per_s},
                                 {"keys_per_s", r.keys_per_s},
                                 {"anchor_keys_per_s", r.anchor_keys_per_s}});
    }
  }
  if (!args["skip-copies"].as<bool>()) {
    auto copies = bench_copies(args, sizes.value());
    if (!copies.ok()) return fail(copies.status().to_string());
    std::printf("\nput/get vs memcpy (GB/s, medians of %d rounds)\n", args["rounds"].as<int>());
    std::printf("%10s %7s %9s %9s %11s %9s %10s %10s\n", "chunk", "chunks", "put", "get", "get+verify",
                "memcpy", "put/memcpy", "get/memcpy");
    for (const auto& r : copies.value()) {
      std::printf("%10llu %7llu %9.2f %9.2f %11.2f %9.2f %10.2f %10.2f\n",
                  static_cast<unsigned long long>(r.chunk_bytes), static_cast<unsigned long long>(r.chunks),
                  r.put_gbps, r.get_gbps, r.get_verify_gbps, r.memcpy_gbps, r.put_gbps / r.memcpy_gbps,
                  r.get_gbps / r.memcpy_gbps);
      json["copies"].push_back({{"chunk_bytes", r.chunk_bytes},
                                {"chunks", r.chunks},
                                {"put_gbps", r.put_gbps},
                                {"get_gbps", r.get_gbps},
                                {"get_verify_gbps", r.get_verify_gbps},
                                {"memcpy_gbps", r.memcpy_gbps}});
    }
  }
  if (args.count("ssd-path") != 0) {
    auto ssd = bench_ssd(args, sizes.value());
    if (!ssd.ok()) return fail(ssd.status().to_string());
    const auto& [mode, results] = ssd.value();
    std::printf(
        "\nssd tier in %s (%s I/O): spill and promote vs raw pwrite/pread (GB/s, medians of %d rounds)\n",
        args["ssd-path"].as<std::string>().c_str(), mode.c_str(), args["rounds"].as<int>());
    std::printf("%10s %7s %9s %10s %10s %9s %9s %10s %12s %16s %14s\n", "chunk", "chunks", "spill",
                "raw write", "spill/raw", "promote", "raw read", "read+hash", "promote/raw",
                "promote/readhash", "ms/spill");
    json["ssd"]["io"] = mode;
    for (const auto& r : results) {
      std::printf("%10llu %7llu %9.2f %10.2f %10.2f %9.2f %9.2f %10.2f %12.2f %16.2f %14.3f\n",
                  static_cast<unsigned long long>(r.chunk_bytes), static_cast<unsigned long long>(r.chunks),
                  r.spill_gbps, r.raw_write_gbps, r.spill_gbps / r.raw_write_gbps, r.promote_gbps,
                  r.raw_read_gbps, r.raw_read_hash_gbps, r.promote_gbps / r.raw_read_gbps,
                  r.promote_gbps / r.raw_read_hash_gbps, r.spill_ms_per_chunk);
      json["ssd"]["results"].push_back({{"chunk_bytes", r.chunk_bytes},
                                        {"chunks", r.chunks},
                                        {"spill_gbps", r.spill_gbps},
                                        {"raw_write_gbps", r.raw_write_gbps},
                                        {"promote_gbps", r.promote_gbps},
                                        {"raw_read_gbps", r.raw_read_gbps},
                                        {"raw_read_hash_gbps", r.raw_read_hash_gbps},
                                        {"spill_ms_per_chunk", r.spill_ms_per_chunk},
                                        {"lookup_p99_spill_ms", r.lookup_p99_spill_ms},
                                        {"lookup_max_spill_ms", r.lookup_max_spill_ms},
                                        {"lookup_p99_write_ms", r.lookup_p99_write_ms},
                                        {"lookup_max_write_ms", r.lookup_max_write_ms}});
    }
    std::printf(
        "\nanother thread's store calls (lookups every 50 us) while the spills run vs while the raw "
        "writes run (ms)\n%10s %14s %14s %14s %14s\n",
        "chunk", "p99 spills", "p99 raw write", "max spills", "max raw write");
    for (const auto& r : results) {
      std::printf("%10llu %14.4f %14.4f %14.3f %14.3f\n", static_cast<unsigned long long>(r.chunk_bytes),
                  r.lookup_p99_spill_ms, r.lookup_p99_write_ms, r.lookup_max_spill_ms, r.lookup_max_write_ms);
    }
  }
  if (args.count("json") != 0) {
    if (Status s = perf::write_json_file(args["json"].as<std::string>(), json); !s.ok())
      return fail(s.message());
  }
  return 0;
}
