// kvfabric-pd-demo: a small PD proxy over reference engines that serve the topology's engines
// (kvfabric-engine --topology FILE --engine NAME). For each request it asks the decode engine for
// its KV port (GET /health), sends the prompt to the prefill engine with that address (POST
// /prefill: the prefill engine streams each layer's KV to the decode engine while it computes and
// answers with the first token), then has the decode engine continue from that first token (POST
// /decode) and prints the tokens. With --compare the same prompt also runs on the prefill engine
// alone (POST /generate) and the two token lists must be equal (exit 1 if not).
//
//   kvfabric-pd-demo --topology FILE [--prefill NAME] [--decode NAME] [--prompt-tokens N] [--new M]
//                    [--requests K] [--no-stream] [--compare]
#include <utility>  // before Boost.Asio 1.81, whose awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <cxxopts.hpp>
#include <iostream>
#include <string>
#include <vector>

#include "kvf/fabric/topology.h"

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using json = nlohmann::json;

constexpr int kOk = 0, kFailed = 1, kUsage = 2;

// One engine's HTTP API: a keep-alive connection, one request at a time.
class EngineClient {
 public:
  EngineClient(std::string name, std::string host, uint16_t port)
      : name_(std::move(name)), host_(std::move(host)), port_(port), socket_(io_) {}

  const std::string& name() const { return name_; }
  std::string address() const { return host_ + ":" + std::to_string(port_); }

  // The JSON answer; a transport error or a non-2xx answer is an error naming the engine.
  json call(http::verb verb, const std::string& target, const json& body, std::string* error) {
    for (int attempt = 0; attempt < 2; ++attempt) {  // a keep-alive connection the engine closed: once more
      beast::error_code ec;
      if (!socket_.is_open()) {
        tcp::resolver resolver(io_);
        auto endpoints = resolver.resolve(host_, std::to_string(port_), ec);
        if (!ec) asio::connect(socket_, endpoints, ec);
        if (ec) {
          *error = name_ + " at " + address() + ": " + ec.message();
          socket_.close(ec);
          return {};
        }
      }
      http::request<http::string_body> req{verb, target, 11};
      req.set(http::field::host, host_);
      req.set(http::field::content_type, "application/json");
      req.keep_alive(true);
      if (verb == http::verb::post) req.body() = body.dump();
      req.prepare_payload();
      http::write(socket_, req, ec);
      beast::flat_buffer buffer;
      http::response<http::string_body> res;
      if (!ec) http::read(socket_, buffer, res, ec);
      if (ec) {
        socket_.close(ec);
        if (attempt == 0) continue;
        *error = name_ + " " + target + ": " + ec.message();
        return {};
      }
      json answer = json::parse(res.body(), nullptr, false);
      if (res.result_int() / 100 != 2 || answer.is_discarded()) {
        *error = name_ + " " + target + " answered " + std::to_string(res.result_int()) + ": " + res.body();
        return {};
      }
      if (!res.keep_alive()) socket_.close(ec);
      return answer;
    }
    return {};
  }

 private:
  std::string name_, host_;
  uint16_t port_;
  asio::io_context io_;
  tcp::socket socket_;
};

std::string tokens_text(const json& tokens) {
  std::string out;
  for (const auto& t : tokens) out += " " + std::to_string(t.get<uint64_t>());
  return out;
}

int run(int argc, char** argv) {
  cxxopts::Options cli("kvfabric-pd-demo", "A PD proxy over the topology's reference engines");
  cli.add_options()                                                                  //
      ("topology", "the topology the engines serve", cxxopts::value<std::string>())  //
      ("prefill", "the prefill engine (default: the first with role prefill)",
       cxxopts::value<std::string>())                                                                       //
      ("decode", "the decode engine (default: the first with role decode)", cxxopts::value<std::string>())  //
      ("prompt-tokens", "prompt length (a seeded prompt)",
       cxxopts::value<uint32_t>()->default_value("100"))                                                  //
      ("prompt-seed", "the first request's prompt seed", cxxopts::value<uint64_t>()->default_value("7"))  //
      ("new", "tokens to generate", cxxopts::value<uint32_t>()->default_value("16"))                      //
      ("requests", "requests, one after another", cxxopts::value<uint32_t>()->default_value("1"))         //
      ("first-id", "the first request's id", cxxopts::value<uint64_t>()->default_value("1"))              //
      ("warmup", "--compare: leading requests left out of the medians (one-time set-up)",
       cxxopts::value<uint32_t>()->default_value("0"))                                           //
      ("no-stream", "the prefill engine sends the KV after its prefill, not layer by layer")     //
      ("compare", "also run each prompt on the prefill engine alone; the tokens must be equal")  //
      ("h,help", "print this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help") != 0 || args.count("topology") == 0) {
    std::cout << cli.help() << '\n';
    return args.count("help") != 0 ? kOk : kUsage;
  }
  const std::string file = args["topology"].as<std::string>();
  kvf::fabric::TopologyLoad load = kvf::fabric::load_topology_file(file);
  if (!load.topology) {
    for (const auto& p : load.problems) std::cerr << p.to_string() << '\n';
    return kUsage;
  }
  const kvf::fabric::Topology& t = *load.topology;
  auto pick = [&](const char* option, kvf::fabric::EngineRole role) -> const kvf::fabric::EngineSpec* {
    if (args.count(option) != 0) return t.find_engine(args[option].as<std::string>());
    for (const auto& e : t.engines)
      if (e.role == role) return &e;
    for (const auto& e : t.engines)
      if (e.role == kvf::fabric::EngineRole::kBoth) return &e;
    return nullptr;
  };
  const auto* prefill_spec = pick("prefill", kvf::fabric::EngineRole::kPrefill);
  const auto* decode_spec = pick("decode", kvf::fabric::EngineRole::kDecode);
  if (prefill_spec == nullptr || decode_spec == nullptr) {
    std::cerr << "kvfabric-pd-demo: " << file << " has no "
              << (prefill_spec == nullptr ? "prefill" : "decode")
              << " engine (or --prefill/--decode names none)\n";
    return kUsage;
  }
  EngineClient prefill(prefill_spec->name, t.find_node(prefill_spec->node)->address, prefill_spec->port);
  EngineClient decode(decode_spec->name, t.find_node(decode_spec->node)->address, decode_spec->port);
  std::string error;
  const json health = decode.call(http::verb::get, "/health", {}, &error);
  if (!error.empty() || !health.contains("kv_port")) {
    std::cerr << "kvfabric-pd-demo: the decode engine: " << (error.empty() ? "no KV port in /health" : error)
              << '\n';
    return kFailed;
  }
  const std::string kv_address =
      t.find_node(decode_spec->node)->address + ":" + std::to_string(health["kv_port"].get<uint64_t>());
  std::printf("kvfabric-pd-demo: prefill %s (%s), decode %s (%s, KV at %s), %s\n", prefill.name().c_str(),
              prefill.address().c_str(), decode.name().c_str(), decode.address().c_str(), kv_address.c_str(),
              health.value("device", std::string("?")).c_str());
  const uint32_t n_new = args["new"].as<uint32_t>();
  const bool stream = args.count("no-stream") == 0;
  uint32_t mismatches = 0;
  const uint32_t warmup = args["warmup"].as<uint32_t>();
  // Per measured request: PD's time to first token (the first token known AND every layer at the
  // decode engine, the later of the two), its two parts, and the same prompt on one engine.
  std::vector<double> pd_ttft, pd_prefill, pd_landed, one_ttft;
  for (uint32_t r = 0; r < args["requests"].as<uint32_t>(); ++r) {
    const uint64_t id = args["first-id"].as<uint64_t>() + r;
    const json prompt{{"prompt_tokens", args["prompt-tokens"].as<uint32_t>()},
                      {"prompt_seed", args["prompt-seed"].as<uint64_t>() + r}};
    json p = prompt;
    p["request_id"] = id;
    p["n_new"] = n_new;
    p["decode"] = kv_address;
    p["stream"] = stream;
    const json pre = prefill.call(http::verb::post, "/prefill", p, &error);
    if (!error.empty()) {
      std::cerr << "kvfabric-pd-demo: request " << id << ": " << error << '\n';
      return kFailed;
    }
    const json d{{"request_id", id}, {"first_token", pre["first_token"]}, {"n_new", n_new}};
    const json dec = decode.call(http::verb::post, "/decode", d, &error);
    if (!error.empty()) {
      std::cerr << "kvfabric-pd-demo: request " << id << ": " << error << '\n';
      return kFailed;
    }
    std::printf(
        "request %llu: TTFT %.2f ms (prefill), KV at the decode engine %.2f ms (%s), decode %.2f ms\n",
        static_cast<unsigned long long>(id), pre["prefill_ms"].get<double>(),
        pre["kv_landed_ms"].get<double>(), stream ? "layers streamed" : "sent after the prefill",
        dec["decode_ms"].get<double>());
    std::printf("request %llu tokens:%s\n", static_cast<unsigned long long>(id),
                tokens_text(dec["tokens"]).c_str());
    if (args.count("compare") != 0) {
      json g = prompt;
      g["n_new"] = n_new;
      const json one = prefill.call(http::verb::post, "/generate", g, &error);
      if (!error.empty()) {
        std::cerr << "kvfabric-pd-demo: request " << id << " on one engine: " << error << '\n';
        return kFailed;
      }
      const bool same = one["tokens"] == dec["tokens"];
      if (r >= warmup) {
        const double prefill_ms = pre["prefill_ms"].get<double>(),
                     landed_ms = pre["kv_landed_ms"].get<double>();
        pd_ttft.push_back(std::max(prefill_ms, landed_ms));
        pd_prefill.push_back(prefill_ms);
        pd_landed.push_back(landed_ms);
        one_ttft.push_back(one["ttft_ms"].get<double>());
      }
      mismatches += same ? 0 : 1;
      std::printf("request %llu one engine:%s (TTFT %.2f ms) -> %s\n", static_cast<unsigned long long>(id),
                  tokens_text(one["tokens"]).c_str(), one["ttft_ms"].get<double>(),
                  same ? "same tokens" : "DIFFERENT TOKENS");
    }
    std::fflush(stdout);
  }
  if (mismatches != 0) {
    std::printf("kvfabric-pd-demo: %u requests gave other tokens through PD than on one engine\n",
                mismatches);
    return kFailed;
  }
  if (args.count("compare") != 0)
    std::printf("kvfabric-pd-demo: every request gave exactly the tokens one engine gives\n");
  if (!one_ttft.empty()) {
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    const double pd = median(pd_ttft), one = median(one_ttft);
    std::printf(
        "TTFT medians over %zu requests (%s): one engine %.2f ms; PD %.2f ms (first token at the prefill "
        "engine "
        "%.2f ms, every layer at the decode engine %.2f ms) = %.3fx one engine\n",
        one_ttft.size(), stream ? "layers streamed" : "KV sent after the prefill", one, pd,
        median(pd_prefill), median(pd_landed), one > 0 ? pd / one : 0.0);
  }
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // cxxopts reports bad options by throwing; so does a bad JSON field
    std::cerr << "kvfabric-pd-demo: " << e.what() << '\n';
    return kUsage;
  }
}
