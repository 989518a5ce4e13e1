// kvfabric-store-workload: one engine process of tests/integration/store_workload.sh, a workload
// several times the store's size run by several processes at once against a real kvfabricd over
// its Unix socket (StoreClient: reserve/commit into the shared arena, acquire/release leases).
// Every chunk's length and bytes derive from its key, so any process can check any chunk.
//   writer        puts random chunks of the shared universe (writers' model) until it has
//                 committed --budget-bytes; now and then it reserves and aborts instead.
//   reader        until --stop-file exists: leases 1-4 random chunks of the universe, checks every
//                 byte and the store's checksum, holds the leases a random while (writers keep
//                 evicting meanwhile), checks again, releases; now and then looks up a chain.
//   operator      stores and pins --pinned chunks (its own model), says "pinned", then until
//                 --stop-file: checks they are all still held and one reads back intact; clears a
//                 random universe key every --clear-every-ms, and the writers' whole model each
//                 time the store has evicted --clear-model-after-evictions more entries (so the
//                 store is full and evicting between model clears whatever the build's speed);
//                 the pinned model's chunks must survive every clear.
//   check-pinned  the pinned chunks are all held and intact (--unpin: then unpins them).
//   stats         the daemon's store counters, name=value a line.
//   pinned-keys   the pinned chunks' keys, hex, one a line.
// Every role but stats and pinned-keys ends with one line
//   result role=R name=N k=v ...
// of what it did as the daemon counts it (reserves, inserts, aborts, leases, hits, misses, cleared,
// bytes committed), so the script can check that the daemon's stats add up to the clients' sums.
// Exit: 0 ok, 1 bytes differed or a pinned chunk went missing, 2 usage, 3 a store error.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <cxxopts.hpp>

#include "kvf/protocol/chunk_key.h"
#include "kvf/store/store_client.h"
#include "kvf/store/store_stats_fields.h"

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;
using protocol::ChunkKey;

constexpr int kOk = 0;
constexpr int kVerifyFailed = 1;
constexpr int kUsage = 2;
constexpr int kStoreError = 3;

uint64_t splitmix(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The writers' chunks and the operator's pinned chunks belong to two models.
const ChunkKey kWritersModel =
    protocol::model_fingerprint("store-workload-writers", protocol::KvLayoutDesc{});
const ChunkKey kPinnedModel = protocol::model_fingerprint("store-workload-pinned", protocol::KvLayoutDesc{});

ChunkKey key_of(const ChunkKey& model, uint64_t index) {
  const protocol::ChunkHasher hasher(model, 2);
  const uint32_t tokens[2] = {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32)};
  return hasher.next(ChunkKey{}, tokens);
}

struct Sizes {
  uint64_t min = 0;
  uint64_t max = 0;
};

uint64_t length_of(const ChunkKey& key, Sizes sizes) {
  return sizes.min + (key.lo >> 7) % (sizes.max - sizes.min + 1);
}

std::vector<uint8_t> content_of(const ChunkKey& key, uint64_t length) {
  std::vector<uint8_t> out(length);
  uint64_t state = key.hi ^ (key.lo * 31);
  for (uint64_t i = 0; i < length; i += 8) {
    const uint64_t v = splitmix(state);
    std::memcpy(out.data() + i, &v, std::min<uint64_t>(8, length - i));
  }
  return out;
}

// What a process did, in the daemon's terms.
struct Tally {
  uint64_t reserves = 0, inserts = 0, aborts = 0, present = 0, committed_bytes = 0;
  uint64_t leases = 0, releases = 0, hits = 0, misses = 0, verified = 0, lookups = 0;
  uint64_t cleared = 0, deferred = 0, clear_calls = 0, clear_model_calls = 0, pinned = 0, unpinned = 0;
  uint64_t max_held = 0;  // leases one reader held at once
};

void print_result(const std::string& role, const std::string& name, const Tally& t, double seconds) {
  std::printf(
      "result role=%s name=%s reserves=%llu inserts=%llu aborts=%llu present=%llu committed_bytes=%llu "
      "leases=%llu releases=%llu hits=%llu misses=%llu verified=%llu lookups=%llu cleared=%llu "
      "deferred=%llu clear_calls=%llu clear_model_calls=%llu pinned=%llu unpinned=%llu max_held=%llu "
      "seconds=%.2f\n",
      role.c_str(), name.c_str(), static_cast<unsigned long long>(t.reserves),
      static_cast<unsigned long long>(t.inserts), static_cast<unsigned long long>(t.aborts),
      static_cast<unsigned long long>(t.present), static_cast<unsigned long long>(t.committed_bytes),
      static_cast<unsigned long long>(t.leases), static_cast<unsigned long long>(t.releases),
      static_cast<unsigned long long>(t.hits), static_cast<unsigned long long>(t.misses),
      static_cast<unsigned long long>(t.verified), static_cast<unsigned long long>(t.lookups),
      static_cast<unsigned long long>(t.cleared), static_cast<unsigned long long>(t.deferred),
      static_cast<unsigned long long>(t.clear_calls), static_cast<unsigned long long>(t.clear_model_calls),
      static_cast<unsigned long long>(t.pinned), static_cast<unsigned long long>(t.unpinned),
      static_cast<unsigned long long>(t.max_held), seconds);
  std::fflush(stdout);
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

int store_error(const std::string& what, const Status& s) {
  std::printf("%s: error: %s\n", what.c_str(), s.to_string().c_str());
  std::fflush(stdout);
  return kStoreError;
}

// reserve -> write in place -> commit (or abort), counting as the daemon does.
Status put_one(store::StoreClient& client, const ChunkKey& key, const ChunkKey& model, uint64_t length,
               bool abort_instead, Tally& t) {
  auto r = client.reserve(key, length, model);
  if (!r.ok()) {
    if (r.status().code() == ErrorCode::kAborted) {  // stored, or being stored by the other writer
      ++t.present;
      return Status::Ok();
    }
    return r.status();
  }
  ++t.reserves;
  if (abort_instead) {
    if (Status s = client.abort(*r); !s.ok()) return s;
    ++t.aborts;
    return Status::Ok();
  }
  std::span<uint8_t> dst = client.bytes(*r);
  if (dst.size() != length) return Status(ErrorCode::kPeerLost, "reservation lost");
  const std::vector<uint8_t> data = content_of(key, length);
  std::memcpy(dst.data(), data.data(), length);
  if (Status s = client.commit(*r); !s.ok()) return s;
  ++t.inserts;
  t.committed_bytes += length;
  return Status::Ok();
}

// Checks a leased chunk against what its key says it holds: length, bytes, the store's checksum.
bool intact(store::StoreClient& client, const store::ClientLease& lease, uint64_t want_length,
            const std::vector<uint8_t>& want, std::string& why) {
  std::span<const uint8_t> got = client.bytes(lease);
  if (lease.lease.length != want_length || got.size() != want.size()) {
    why = "length " + std::to_string(lease.lease.length) + ", want " + std::to_string(want_length);
    return false;
  }
  if (std::memcmp(got.data(), want.data(), want.size()) != 0) {
    size_t at = 0;
    while (at < want.size() && got[at] == want[at]) ++at;
    why = "bytes differ from offset " + std::to_string(at);
    return false;
  }
  if (store::chunk_checksum(got.data(), got.size()) != lease.lease.checksum) {
    why = "checksum differs from the store's";
    return false;
  }
  return true;
}

// acquire -> check -> release, counting as the daemon does: false when not stored; `bad` when the
// bytes differ.
Result<bool> read_one(store::StoreClient& client, const ChunkKey& key, Sizes sizes, Tally& t, bool& bad) {
  auto lease = client.acquire(key);
  if (!lease.ok()) {
    if (lease.status().code() == ErrorCode::kNotFound) {
      ++t.misses;
      return false;
    }
    return lease.status();
  }
  ++t.hits;
  ++t.leases;
  const uint64_t length = length_of(key, sizes);
  std::string why;
  if (!intact(client, *lease, length, content_of(key, length), why)) {
    std::printf("FAIL: chunk %s: %s\n", key.to_hex().c_str(), why.c_str());
    bad = true;
  } else {
    ++t.verified;
  }
  if (Status s = client.release(*lease); !s.ok()) return s;
  ++t.releases;
  return true;
}

struct Common {
  std::string socket;
  std::string name;
  uint64_t seed = 1;
  uint64_t universe = 512;
  Sizes sizes;
  Sizes pinned_sizes;
  uint32_t pinned = 8;
  std::string stop_file;
  double max_seconds = 240;
};

store::StoreClientOptions client_options(const Common& c, const std::string& role) {
  store::StoreClientOptions o;
  o.socket_path = c.socket;
  o.client_name = "store-workload " + role + " " + c.name + " pid " + std::to_string(getpid());
  o.call_timeout = std::chrono::milliseconds(10'000);
  o.connect_timeout = std::chrono::milliseconds(5'000);
  return o;
}

bool should_stop(const Common& c, Clock::time_point started) {
  return std::filesystem::exists(c.stop_file) || seconds_since(started) > c.max_seconds;
}

int writer(const Common& c, uint64_t budget, uint32_t abort_every) {
  store::StoreClient client(client_options(c, "writer"));
  std::mt19937_64 rng(c.seed);
  Tally t;
  const auto started = Clock::now();
  uint64_t puts = 0;
  while (t.committed_bytes < budget) {
    const ChunkKey key = key_of(kWritersModel, rng() % c.universe);
    const bool abort_instead = abort_every > 0 && ++puts % abort_every == 0;
    if (Status s = put_one(client, key, kWritersModel, length_of(key, c.sizes), abort_instead, t); !s.ok()) {
      print_result("writer", c.name, t, seconds_since(started));
      return store_error("writer " + c.name + ": put of " + key.to_hex(), s);
    }
    if (seconds_since(started) > c.max_seconds) {
      std::printf("writer %s: FAIL: only %llu of %llu bytes committed in %.0f s\n", c.name.c_str(),
                  static_cast<unsigned long long>(t.committed_bytes), static_cast<unsigned long long>(budget),
                  c.max_seconds);
      print_result("writer", c.name, t, seconds_since(started));
      return kVerifyFailed;
    }
  }
  print_result("writer", c.name, t, seconds_since(started));
  return kOk;
}

int reader(const Common& c, uint32_t max_hold_us) {
  store::StoreClient client(client_options(c, "reader"));
  std::mt19937_64 rng(c.seed);
  Tally t;
  bool bad = false;
  const auto started = Clock::now();
  struct Held {
    ChunkKey key;
    store::ClientLease lease;
    uint64_t length;
    std::vector<uint8_t> want;
  };
  while (!should_stop(c, started)) {
    // Lease a few chunks at once, check them, hold them while the writers evict around them.
    std::vector<Held> held;
    const uint32_t batch = 1 + static_cast<uint32_t>(rng() % 4);
    for (uint32_t i = 0; i < batch; ++i) {
      const ChunkKey key = key_of(kWritersModel, rng() % c.universe);
      auto lease = client.acquire(key);
      if (!lease.ok()) {
        if (lease.status().code() != ErrorCode::kNotFound) {
          print_result("reader", c.name, t, seconds_since(started));
          return store_error("reader " + c.name + ": acquire", lease.status());
        }
        ++t.misses;
        continue;
      }
      ++t.hits;
      ++t.leases;
      const uint64_t length = length_of(key, c.sizes);
      held.push_back(Held{key, *lease, length, content_of(key, length)});
    }
    t.max_held = std::max<uint64_t>(t.max_held, held.size());
    std::string why;
    for (const Held& h : held) {
      if (!intact(client, h.lease, h.length, h.want, why)) {
        std::printf("FAIL: reader %s: chunk %s on lease: %s\n", c.name.c_str(), h.key.to_hex().c_str(),
                    why.c_str());
        bad = true;
      }
    }
    if (max_hold_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % max_hold_us));
    for (const Held& h : held) {
      // Still the same bytes after the hold: a leased entry was neither evicted nor overwritten.
      if (!intact(client, h.lease, h.length, h.want, why)) {
        std::printf("FAIL: reader %s: chunk %s changed while leased: %s\n", c.name.c_str(),
                    h.key.to_hex().c_str(), why.c_str());
        bad = true;
      } else {
        ++t.verified;
      }
      if (Status s = client.release(h.lease); !s.ok()) {
        print_result("reader", c.name, t, seconds_since(started));
        return store_error("reader " + c.name + ": release", s);
      }
      ++t.releases;
    }
    if (rng() % 8 == 0) {
      std::vector<ChunkKey> chain;
      for (int i = 0; i < 4; ++i) chain.push_back(key_of(kWritersModel, rng() % c.universe));
      auto matched = client.lookup(chain);
      if (!matched.ok()) {
        print_result("reader", c.name, t, seconds_since(started));
        return store_error("reader " + c.name + ": lookup", matched.status());
      }
      ++t.lookups;
      t.hits += *matched;
      if (*matched < chain.size()) ++t.misses;
    }
  }
  print_result("reader", c.name, t, seconds_since(started));
  return bad ? kVerifyFailed : kOk;
}

std::vector<ChunkKey> pinned_keys(const Common& c) {
  std::vector<ChunkKey> keys;
  for (uint32_t i = 0; i < c.pinned; ++i) keys.push_back(key_of(kPinnedModel, i));
  return keys;
}

// Every pinned chunk is held (one lookup of the chain) and `reads` of them read back intact.
int check_pinned_now(store::StoreClient& client, const Common& c, const std::vector<ChunkKey>& keys,
                     std::mt19937_64& rng, uint32_t reads, Tally& t, const char* when) {
  auto matched = client.lookup(keys);
  if (!matched.ok()) return store_error(std::string("pinned lookup ") + when, matched.status());
  ++t.lookups;
  t.hits += *matched;
  if (*matched < keys.size()) {
    ++t.misses;
    std::printf("FAIL: %s: only %zu of %zu pinned chunks held\n", when, *matched, keys.size());
    return kVerifyFailed;
  }
  for (uint32_t i = 0; i < reads; ++i) {
    const ChunkKey& key = reads == keys.size() ? keys[i] : keys[rng() % keys.size()];
    bool bad = false;
    auto got = read_one(client, key, c.pinned_sizes, t, bad);
    if (!got.ok()) return store_error(std::string("pinned read ") + when, got.status());
    if (!*got || bad) {
      std::printf("FAIL: %s: pinned chunk %s %s\n", when, key.to_hex().c_str(), *got ? "changed" : "is gone");
      return kVerifyFailed;
    }
  }
  return kOk;
}

int operator_role(const Common& c, uint32_t clear_every_ms, uint64_t clear_model_after_evictions) {
  store::StoreClient client(client_options(c, "operator"));
  std::mt19937_64 rng(c.seed);
  Tally t;
  const auto started = Clock::now();
  const std::vector<ChunkKey> keys = pinned_keys(c);
  for (const ChunkKey& key : keys) {
    if (Status s = put_one(client, key, kPinnedModel, length_of(key, c.pinned_sizes), false, t); !s.ok()) {
      return store_error("operator: put of a pinned chunk", s);
    }
    if (Status s = client.pin(key); !s.ok()) return store_error("operator: pin", s);
    ++t.pinned;
  }
  std::printf("operator: pinned %zu chunks\n", keys.size());
  std::fflush(stdout);
  auto last_clear = Clock::now();
  uint64_t evictions_at_last_model_clear = 0;
  int rc = kOk;
  while (!should_stop(c, started) && rc == kOk) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    rc = check_pinned_now(client, c, keys, rng, 1, t, "during the workload");
    if (rc != kOk) break;
    if (clear_every_ms > 0 && Clock::now() - last_clear >= std::chrono::milliseconds(clear_every_ms)) {
      last_clear = Clock::now();
      const ChunkKey one[] = {key_of(kWritersModel, rng() % c.universe)};
      auto r = client.clear(one);
      if (!r.ok()) return store_error("operator: clear", r.status());
      ++t.clear_calls;
      t.cleared += r->removed;
      t.deferred += r->deferred;
    }
    if (clear_model_after_evictions > 0) {
      auto s = client.stats();
      if (!s.ok()) return store_error("operator: stats", s.status());
      if (s->evictions < evictions_at_last_model_clear + clear_model_after_evictions) continue;
      evictions_at_last_model_clear = s->evictions;
      auto r = client.clear_model(kWritersModel);
      if (!r.ok()) return store_error("operator: clear_model", r.status());
      ++t.clear_model_calls;
      t.cleared += r->removed;
      t.deferred += r->deferred;
      std::printf("operator: cleared the writers' model: %llu entries (%llu still leased)\n",
                  static_cast<unsigned long long>(r->removed), static_cast<unsigned long long>(r->deferred));
      std::fflush(stdout);
      // The pinned chunks are another model's: all of them must still be there, intact.
      rc = check_pinned_now(client, c, keys, rng, static_cast<uint32_t>(keys.size()), t,
                            "right after clearing the writers' model");
    }
  }
  if (rc == kOk)
    rc = check_pinned_now(client, c, keys, rng, static_cast<uint32_t>(keys.size()), t, "at the end");
  print_result("operator", c.name, t, seconds_since(started));
  return rc;
}

int check_pinned(const Common& c, bool unpin) {
  store::StoreClient client(client_options(c, "check-pinned"));
  std::mt19937_64 rng(c.seed);
  Tally t;
  const auto started = Clock::now();
  const std::vector<ChunkKey> keys = pinned_keys(c);
  const int rc =
      check_pinned_now(client, c, keys, rng, static_cast<uint32_t>(keys.size()), t, "after the workload");
  if (rc == kOk && unpin) {
    for (const ChunkKey& key : keys) {
      if (Status s = client.unpin(key); !s.ok()) return store_error("check-pinned: unpin", s);
      ++t.unpinned;
    }
  }
  print_result("check-pinned", c.name, t, seconds_since(started));
  return rc;
}

int stats(const Common& c) {
  store::StoreClient client(client_options(c, "stats"));
  auto s = client.stats();
  if (!s.ok()) return store_error("stats", s.status());
  for (const auto& f : store::store_stats_fields()) {
    std::printf("%.*s=%llu\n", static_cast<int>(f.name.size()), f.name.data(),
                static_cast<unsigned long long>((*s).*f.member));
  }
  return kOk;
}

Sizes parse_sizes(const std::string& text) {
  const size_t dash = text.find('-');
  Sizes s;
  s.min = std::stoull(text.substr(0, dash));
  s.max = dash == std::string::npos ? s.min : std::stoull(text.substr(dash + 1));
  if (s.min == 0 || s.max < s.min) throw std::invalid_argument("sizes must be MIN-MAX with 0 < MIN <= MAX");
  return s;
}

int run(int argc, char** argv) {
  cxxopts::Options cli("kvfabric-store-workload",
                       "one process of the store workload test against a running kvfabricd:\n"
                       "  writer | reader | operator | check-pinned | stats | pinned-keys");
  cli.add_options()  //
      ("role", "writer, reader, operator, check-pinned, stats or pinned-keys",
       cxxopts::value<std::string>())                                                 //
      ("socket", "the daemon's store socket", cxxopts::value<std::string>(), "PATH")  //
      ("name", "this process's name in its result line",
       cxxopts::value<std::string>()->default_value("-"))                                                 //
      ("seed", "random choices of this process", cxxopts::value<uint64_t>()->default_value("1"))          //
      ("universe", "writers' and readers' chunk keys", cxxopts::value<uint64_t>()->default_value("512"))  //
      ("sizes", "chunk lengths MIN-MAX (each chunk's from its key)",                                      //
       cxxopts::value<std::string>()->default_value("65536-393216"))                                      //
      ("pinned", "operator: chunks it pins", cxxopts::value<uint32_t>()->default_value("8"))              //
      ("pinned-size", "bytes of each pinned chunk", cxxopts::value<uint64_t>()->default_value("262144"))  //
      ("budget-bytes", "writer: commit this many bytes", cxxopts::value<uint64_t>())                      //
      ("abort-every", "writer: every Nth reservation is aborted (0: none)",                               //
       cxxopts::value<uint32_t>()->default_value("16"))                                                   //
      ("max-hold-us", "reader: longest hold of its leases",
       cxxopts::value<uint32_t>()->default_value("3000"))                                               //
      ("clear-every-ms", "operator: clear one universe key this often (0: never)",                      //
       cxxopts::value<uint32_t>()->default_value("100"))                                                //
      ("clear-model-after-evictions",                                                                   //
       "operator: clear the writers' model each time the store has evicted this many more (0: never)",  //
       cxxopts::value<uint64_t>()->default_value("64"))                                                 //
      ("stop-file", "reader, operator: stop once this file exists", cxxopts::value<std::string>())      //
      ("max-seconds", "give up after this long", cxxopts::value<double>()->default_value("240"))        //
      ("unpin", "check-pinned: unpin them afterwards")                                                  //
      ("h,help", "print this help");
  cli.parse_positional({"role"});
  cli.positional_help("ROLE");
  const auto args = cli.parse(argc, argv);
  if (args.count("help") || args.count("role") == 0) {
    std::cout << cli.help() << '\n';
    return args.count("help") ? kOk : kUsage;
  }
  const std::string role = args["role"].as<std::string>();
  Common c;
  c.name = args["name"].as<std::string>();
  c.seed = args["seed"].as<uint64_t>();
  c.universe = args["universe"].as<uint64_t>();
  c.sizes = parse_sizes(args["sizes"].as<std::string>());
  c.pinned = args["pinned"].as<uint32_t>();
  c.pinned_sizes = Sizes{args["pinned-size"].as<uint64_t>(), args["pinned-size"].as<uint64_t>()};
  c.max_seconds = args["max-seconds"].as<double>();
  if (c.universe == 0 || c.pinned == 0 || c.pinned_sizes.min == 0) {
    std::cerr << "kvfabric-store-workload: --universe, --pinned and --pinned-size must be positive\n";
    return kUsage;
  }
  if (role == "pinned-keys") {
    for (const auto& key : pinned_keys(c)) std::printf("%s\n", key.to_hex().c_str());
    return kOk;
  }
  if (args.count("socket") == 0) {
    std::cerr << "kvfabric-store-workload: " << role << " needs --socket PATH\n";
    return kUsage;
  }
  c.socket = args["socket"].as<std::string>();
  if ((role == "reader" || role == "operator") && args.count("stop-file") == 0) {
    std::cerr << "kvfabric-store-workload: " << role << " needs --stop-file FILE\n";
    return kUsage;
  }
  if (args.count("stop-file")) c.stop_file = args["stop-file"].as<std::string>();
  if (role == "writer") {
    if (args.count("budget-bytes") == 0) {
      std::cerr << "kvfabric-store-workload: writer needs --budget-bytes\n";
      return kUsage;
    }
    return writer(c, args["budget-bytes"].as<uint64_t>(), args["abort-every"].as<uint32_t>());
  }
  if (role == "reader") return reader(c, args["max-hold-us"].as<uint32_t>());
  if (role == "operator") {
    return operator_role(c, args["clear-every-ms"].as<uint32_t>(),
                         args["clear-model-after-evictions"].as<uint64_t>());
  }
  if (role == "check-pinned") return check_pinned(c, args.count("unpin") > 0);
  if (role == "stats") return stats(c);
  std::cerr << "kvfabric-store-workload: unknown role '" << role << "' (see --help)\n";
  return kUsage;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "kvfabric-store-workload: " << e.what() << " (see --help)\n";
    return kUsage;
  }
}
