#include "codec_stream_check.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <numeric>
#include <random>
#include <span>

#include <spdlog/spdlog.h>

#include "kvf/gpudirect/kv_codec.h"

namespace kvf::perf {
namespace {

using protocol::KvCodec;

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t key_base(const fabric::PatternKey& k) {
  uint64_t h = splitmix64(k.seed ^ 0x6b76636f64656373ull);
  h = splitmix64(h ^ (uint64_t{k.layer} << 32 | k.block));
  return splitmix64(h ^ k.part);
}

// One bf16 from 16 random bits: sign, 3 bits of exponent (2^-7 .. 2^0), 7 of mantissa, and when
// the other 5 are zero an outlier 16x larger.
inline uint16_t kv_value(uint32_t r) {
  const uint32_t sign = r & 0x8000u;
  const uint32_t exponent = 120u + ((r >> 7) & 7u) + (((r >> 10) & 31u) == 0 ? 4u : 0u);
  return static_cast<uint16_t>(sign | exponent << 7 | (r & 0x7fu));
}

uint64_t get_seed(const std::vector<uint8_t>& context) {
  uint64_t seed = 0;
  for (size_t i = 0; i < 8 && i < context.size(); ++i) seed |= uint64_t{context[i]} << (8 * i);
  return seed;
}

}  // namespace

std::vector<uint8_t> seed_context(uint64_t seed) {
  std::vector<uint8_t> out(8);
  for (size_t i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(seed >> (8 * i));
  return out;
}

void fill_kv_values(uint8_t* dst, uint64_t bytes, uint32_t row_bytes, const fabric::PatternKey& key) {
  const uint64_t base = key_base(key);
  const uint64_t rows = bytes / row_bytes;
  uint64_t word = 0;
  for (uint64_t t = 0; t < rows; ++t) {
    uint8_t* row = dst + t * row_bytes;
    if (splitmix64(base ^ (t * 0xD1B54A32D192ED03ull)) % 61 == 0) {
      std::memset(row, 0, row_bytes);
      continue;
    }
    for (uint32_t c = 0; c + 8 <= row_bytes; c += 8) {
      const uint64_t r = splitmix64(base + word++);
      const uint16_t v[4] = {kv_value(static_cast<uint32_t>(r)), kv_value(static_cast<uint32_t>(r >> 16)),
                             kv_value(static_cast<uint32_t>(r >> 32)),
                             kv_value(static_cast<uint32_t>(r >> 48))};
      std::memcpy(row + c, v, 8);
    }
    for (uint32_t c = row_bytes / 8 * 8; c < row_bytes; c += 2) {  // a row of 2 or 6 bytes' tail
      const auto v = kv_value(static_cast<uint32_t>(splitmix64(base + word++)));
      std::memcpy(row + c, &v, 2);
    }
  }
}

Status expected_kv_values(KvCodec codec, uint32_t row_bytes, const fabric::PatternKey& key, uint64_t bytes,
                          std::vector<uint8_t>& out, std::vector<uint8_t>& scratch) {
  out.resize(bytes);
  fill_kv_values(out.data(), bytes, row_bytes, key);
  if (codec == KvCodec::kIdentity) return Status::Ok();
  const uint32_t channels = row_bytes / 2;
  const uint64_t rows = bytes / row_bytes;
  scratch.resize(gpudirect::encoded_rows_bytes(channels, rows));
  if (Status s = gpudirect::encode_rows(codec, channels, out, rows, scratch); !s.ok()) return s;
  return gpudirect::decode_rows(codec, channels, scratch, rows, out);
}

Status fill_kv_layer(const gpudirect::MemoryRegion& source, const protocol::KvLayout& layout, uint32_t layer,
                     uint64_t seed, uint32_t row_bytes) {
  if (source.kind() == protocol::MemoryKind::kCudaDevice) {
    return Status(ErrorCode::kInvalidArgument, "--codec streams host memory only");
  }
  uint8_t* base = const_cast<uint8_t*>(source.data()) + layer * layout.layer_bytes();
  for (uint32_t b = 0; b < layout.desc().num_blocks; ++b) {
    for (uint32_t p = 0; p < layout.parts(); ++p) {
      auto e = layout.extent(b, static_cast<protocol::KvPart>(p));
      if (e.length % row_bytes != 0) {
        return Status(ErrorCode::kInvalidArgument, "a block part of " + std::to_string(e.length) +
                                                       " bytes is not whole rows of " +
                                                       std::to_string(row_bytes) + " bytes (--row-bytes)");
      }
      fill_kv_values(base + e.offset, e.length, row_bytes, fabric::PatternKey{seed, layer, b, p});
    }
  }
  return Status::Ok();
}

std::string codec_server_name(const CodecServerInfo& info) {
  return "kvfabric-perf-server [codec " + std::string(protocol::codec_name(info.codec)) + ", rows " +
         std::to_string(info.row_bytes) + ", verify port " + std::to_string(info.verify_port) + "]";
}

std::optional<CodecServerInfo> parse_codec_server_name(const std::string& name) {
  const size_t open = name.find(" [codec ");
  if (open == std::string::npos) return std::nullopt;
  const size_t rows = name.find(", rows ", open);
  const size_t port = name.find(", verify port ", open);
  const size_t close = name.find(']', open);
  if (rows == std::string::npos || port == std::string::npos || close == std::string::npos)
    return std::nullopt;
  auto codec = protocol::parse_codec(name.substr(open + 8, rows - open - 8));
  if (!codec.ok()) return std::nullopt;
  CodecServerInfo info;
  info.codec = codec.value();
  try {
    info.row_bytes = static_cast<uint32_t>(std::stoul(name.substr(rows + 7, port - rows - 7)));
    info.verify_port = static_cast<uint16_t>(std::stoul(name.substr(port + 14, close - port - 14)));
  } catch (const std::exception&) {
    return std::nullopt;
  }
  return info;
}

Result<std::unique_ptr<CodecVerifyServer>> CodecVerifyServer::start(
    std::shared_ptr<gpudirect::UcxContext> ucx, const protocol::KvLayoutDesc& desc, KvCodec codec,
    uint32_t row_bytes, const std::string& host) {
  auto layout = protocol::KvLayout::create(desc);
  if (!layout.ok()) return layout.status();
  std::unique_ptr<CodecVerifyServer> server(new CodecVerifyServer());
  server->info_.codec = codec;
  server->info_.row_bytes = row_bytes;
  auto region = gpudirect::MemoryRegion::allocate_host(ucx, layout->layer_bytes() * desc.num_layers);
  if (!region.ok()) return region.status();
  server->layout_.emplace(std::move(layout.value()));
  server->region_.emplace(std::move(region.value()));
  server->control_ = std::make_unique<fabric::ControlContext>();
  CodecVerifyServer* self = server.get();
  auto listening = fabric::ControlServer::listen(
      server->control_->io(), host, 0, [self](std::shared_ptr<fabric::ControlConnection> connection) {
        std::weak_ptr<fabric::ControlConnection> weak = connection;
        {
          std::lock_guard lock(self->mutex_);
          self->connections_.push_back(connection);
        }
        connection->start(
            [self, weak](const protocol::Message& m) {
              auto c = weak.lock();
              if (!c) return;
              if (const auto* r = std::get_if<protocol::RunRequest>(&m)) return self->answer(c, r->run_id);
              c->send(protocol::ErrorReply{ErrorCode::kInvalidArgument,
                                           "this port answers RunRequest{run_id = a request id} only"});
            },
            [self, weak](const Status&) {
              auto c = weak.lock();
              std::lock_guard lock(self->mutex_);
              std::erase_if(self->connections_, [&](const auto& p) { return p == c; });
            });
      });
  if (!listening.ok()) return listening.status();
  server->server_ = std::move(listening.value());
  server->info_.verify_port = server->server_->port();
  return server;
}

CodecVerifyServer::~CodecVerifyServer() {
  if (server_) server_->stop();
  std::vector<std::shared_ptr<fabric::ControlConnection>> open;
  {
    std::lock_guard lock(mutex_);
    open.swap(connections_);
    waiting_.clear();
  }
  // Answers already queued must be written before the context stops (which drops them).
  if (control_)
    control_->close_and_wait(open, Status(ErrorCode::kAborted, "server stopping"), std::chrono::seconds(5));
  open.clear();
  if (control_) control_->stop();
}

uint16_t CodecVerifyServer::port() const {
  return info_.verify_port;
}

fabric::EnginePool CodecVerifyServer::pool() {
  fabric::EnginePool pool;
  pool.region = &*region_;
  pool.layout = layout_->desc();
  pool.allocate = [this](uint64_t request_id, uint32_t n) { return allocate(request_id, n); };
  pool.release = [this](uint64_t, std::vector<uint32_t>) { release(); };
  return pool;
}

// Runs on the receiver's worker: the whole pool goes to one request, poisoned, its blocks shuffled.
std::vector<uint32_t> CodecVerifyServer::allocate(uint64_t request_id, uint32_t n) {
  const uint32_t blocks = layout_->desc().num_blocks;
  if (n != blocks) {
    spdlog::warn("codec check: request {} asks for {} blocks, this server's pool is {} (--blocks)",
                 request_id, n, blocks);
    return {};
  }
  {
    // A failed stream's blocks come back after the receiver's retire grace.
    std::unique_lock lock(mutex_);
    if (!freed_.wait_for(lock, std::chrono::seconds(20), [&] { return !busy_; })) return {};
    busy_ = true;
  }
  fabric::poison(region_->data(), region_->size());
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(request_id ^ 0x5DEECE66Dull));
  return order;
}

void CodecVerifyServer::release() {
  {
    std::lock_guard lock(mutex_);
    busy_ = false;
  }
  freed_.notify_all();
}

Status CodecVerifyServer::check(const fabric::StreamReport& report) {
  if (!report.status.ok()) return report.status;
  const protocol::KvLayout& layout = *layout_;
  if (report.context.size() != 8 || report.blocks.size() != layout.desc().num_blocks) {
    return Status(ErrorCode::kInvalidArgument,
                  "the stream carries no seed (a client without --codec?) or not the pool's blocks");
  }
  const uint64_t seed = get_seed(report.context);
  std::vector<uint8_t> expected, scratch;
  uint64_t checked = 0;
  for (uint32_t l = 0; l < layout.desc().num_layers; ++l) {
    const uint8_t* layer = region_->data() + l * layout.layer_bytes();
    for (uint32_t i = 0; i < report.blocks.size(); ++i) {
      for (uint32_t p = 0; p < layout.parts(); ++p) {
        auto e = layout.extent(report.blocks[i], static_cast<protocol::KvPart>(p));
        if (Status s = expected_kv_values(info_.codec, info_.row_bytes, fabric::PatternKey{seed, l, i, p},
                                          e.length, expected, scratch);
            !s.ok()) {
          return Status(s.code(), "computing the expected bytes: " + s.message());
        }
        if (std::memcmp(layer + e.offset, expected.data(), e.length) != 0) {
          uint64_t at = 0;
          while (layer[e.offset + at] == expected[at]) ++at;
          return Status(ErrorCode::kVerifyFailed,
                        "layer " + std::to_string(l) + " block " + std::to_string(i) + " (slot " +
                            std::to_string(report.blocks[i]) + ") part " + std::to_string(p) +
                            ": first byte unlike the " + std::string(protocol::codec_name(info_.codec)) +
                            " decode of the sender's values at offset " + std::to_string(at));
        }
        checked += e.length;
      }
    }
  }
  return Status(ErrorCode::kOk, std::to_string(checked) + " bytes equal the " +
                                    std::string(protocol::codec_name(info_.codec)) +
                                    " decode of the sender's values");
}

void CodecVerifyServer::stream_done(const fabric::StreamReport& report) {
  const Status outcome = check(report);
  if (report.status.ok()) {
    std::printf("stream %llu: %s %s\n", static_cast<unsigned long long>(report.request_id),
                outcome.ok() ? "codec check passed:" : "codec check FAILED:", outcome.message().c_str());
    std::fflush(stdout);
    release();  // a failed stream's blocks come back through EnginePool::release
  }
  record(report.request_id, outcome);
}

void CodecVerifyServer::record(uint64_t request_id, const Status& outcome) {
  std::vector<std::shared_ptr<fabric::ControlConnection>> ready;
  {
    std::lock_guard lock(mutex_);
    outcomes_[request_id] = outcome;
    while (outcomes_.size() > 1024) outcomes_.erase(outcomes_.begin());
    auto [first, last] = waiting_.equal_range(request_id);
    for (auto it = first; it != last; ++it) {
      if (auto c = it->second.lock()) ready.push_back(std::move(c));
    }
    waiting_.erase(first, last);
  }
  for (auto& c : ready) {
    c->send(protocol::RunResult{request_id, outcome.code(), outcome.message(), {}});
  }
}

// On the control thread: answers now if the request is checked, else once it is.
void CodecVerifyServer::answer(const std::shared_ptr<fabric::ControlConnection>& connection,
                               uint64_t request_id) {
  Status outcome;
  {
    std::lock_guard lock(mutex_);
    auto it = outcomes_.find(request_id);
    if (it == outcomes_.end()) {
      waiting_.emplace(request_id, connection);
      return;
    }
    outcome = it->second;
  }
  connection->send(protocol::RunResult{request_id, outcome.code(), outcome.message(), {}});
}

Status query_codec_check(const std::string& host, uint16_t port, uint64_t request_id,
                         std::chrono::milliseconds timeout, std::string* message) {
  auto client = fabric::BlockingControlClient::connect(host, port, timeout);
  if (!client.ok()) {
    return Status(client.status().code(), "the server's codec check port " + host + ":" +
                                              std::to_string(port) + ": " + client.status().message());
  }
  if (Status s = client->send(protocol::RunRequest{request_id, protocol::RunMode::kBandwidth, 0, 0}); !s.ok())
    return s;
  auto reply = client->receive(timeout);
  if (!reply.ok()) return Status(reply.status().code(), "no codec check answer: " + reply.status().message());
  const auto* r = std::get_if<protocol::RunResult>(&reply.value());
  if (r == nullptr || r->run_id != request_id) {
    return Status(ErrorCode::kMalformed, "the codec check port answered something else");
  }
  if (message != nullptr) *message = r->message;
  return r->code == ErrorCode::kOk ? Status::Ok() : Status(r->code, r->message);
}

Result<RowCodecSpeed> measure_row_codec(KvCodec codec, uint32_t row_bytes, uint64_t bytes, uint64_t run_bytes,
                                        uint32_t iters) {
  if (codec == KvCodec::kIdentity || row_bytes == 0 || row_bytes % 2 != 0 || run_bytes % row_bytes != 0 ||
      bytes % run_bytes != 0 || iters == 0) {
    return Status(ErrorCode::kInvalidArgument,
                  "codec: int8 or fp8, an even --row-bytes, runs of whole rows, bytes of whole runs");
  }
  const uint32_t channels = row_bytes / 2;
  const uint64_t run_rows = run_bytes / row_bytes, runs = bytes / run_bytes;
  const uint64_t encoded_run = gpudirect::encoded_rows_bytes(channels, run_rows);
  std::vector<uint8_t> raw(bytes), encoded(runs * encoded_run), decoded(bytes);
  fill_kv_values(raw.data(), bytes, row_bytes, fabric::PatternKey{1, 2, 3, 0});
  // This thread's CPU time, not the wall clock: the figure is per core, whatever else the machine
  // runs meanwhile (on a shared VM the wall clock also counts other processes' turns).
  auto cpu_seconds = [] {
    timespec t{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
  };
  auto best = [&](auto&& pass) -> Result<double> {
    double seconds = 1e30;
    for (uint32_t i = 0; i < iters; ++i) {
      const double t0 = cpu_seconds();
      if (Status s = pass(); !s.ok()) return s;
      seconds = std::min(seconds, cpu_seconds() - t0);
    }
    return static_cast<double>(bytes) / seconds / 1e9;
  };
  auto encode = best([&] {
    for (uint64_t r = 0; r < runs; ++r) {
      if (Status s = gpudirect::encode_rows(codec, channels, {raw.data() + r * run_bytes, run_bytes},
                                            run_rows, {encoded.data() + r * encoded_run, encoded_run});
          !s.ok())
        return s;
    }
    return Status::Ok();
  });
  if (!encode.ok()) return encode.status();
  auto decode = best([&] {
    for (uint64_t r = 0; r < runs; ++r) {
      if (Status s = gpudirect::decode_rows(codec, channels, {encoded.data() + r * encoded_run, encoded_run},
                                            run_rows, {decoded.data() + r * run_bytes, run_bytes});
          !s.ok())
        return s;
    }
    return Status::Ok();
  });
  if (!decode.ok()) return decode.status();
  auto copy = best([&] {
    for (uint64_t r = 0; r < runs; ++r)
      std::memcpy(decoded.data() + r * run_bytes, raw.data() + r * run_bytes, run_bytes);
    return Status::Ok();
  });
  return RowCodecSpeed{encode.value(), decode.value(), copy.value()};
}

}  // namespace kvf::perf
