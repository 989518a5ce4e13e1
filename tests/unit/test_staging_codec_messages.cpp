// The staging messages' codec fields (include/kvf/protocol/staging_messages.h, v2): identity
// stays v1 byte for byte (so raw staging still meets v1 peers), a codec makes v2 and round-trips,
// and unknown codecs, odd or oversized rows, a codec on GPU staging, a future version and pieces
// past twice the largest slot are refused.
#include "catch.h"
#include "kvf/protocol/staging_messages.h"

using namespace kvf;
namespace staging = protocol::staging;

TEST_CASE(
    "staging messages: identity stays v1 byte for byte, a codec makes v2, bad codec fields are refused") {
  const staging::Scatter raw{7, 8, 1, {{4096, 512}}, 0, 0};
  const std::vector<uint8_t> v1 = staging::encode(raw);
  REQUIRE(v1[4] == 1);
  REQUIRE(v1.size() == 4 + 2 + 2 + 8 + 8 + 4 + 4 + 16);  // header, sender, batch, slot, count, 1 piece
  staging::Scatter coded = raw;
  coded.codec = 3;
  coded.row_bytes = 256;
  std::vector<uint8_t> v2 = staging::encode(coded);
  REQUIRE(v2[4] == 2);
  REQUIRE(v2.size() == v1.size() + 5);
  auto back = staging::decode(v2);
  REQUIRE(back.ok());
  REQUIRE(std::get<staging::Scatter>(back.value()).codec == 3);
  REQUIRE(std::get<staging::Scatter>(back.value()).row_bytes == 256);

  const staging::StagingRequest request{1, 2, 1 << 20, {9, 9}, {}, {}, 4, 2048};
  const std::vector<uint8_t> r2 = staging::encode(request);
  REQUIRE(r2[4] == 2);
  auto request_back = staging::decode(r2);
  REQUIRE(request_back.ok());
  REQUIRE(std::get<staging::StagingRequest>(request_back.value()).codec == 4);
  REQUIRE(std::get<staging::StagingRequest>(request_back.value()).row_bytes == 2048);
  staging::StagingRequest raw_request = request;
  raw_request.codec = 0;
  raw_request.row_bytes = 0;
  REQUIRE(staging::encode(raw_request)[4] == 1);

  auto refused = [](std::vector<uint8_t> bytes, const std::string& says) {
    auto r = staging::decode(bytes);
    REQUIRE_FALSE(r.ok());
    CAPTURE(r.status().to_string());
    REQUIRE(r.status().message().find(says) != std::string::npos);
  };
  std::vector<uint8_t> bad = v2;
  bad[v2.size() - 5] = 99;  // codec
  refused(bad, "unknown codec 99");
  bad = v2;
  bad[v2.size() - 4] = 3;  // row_bytes 3: odd
  bad[v2.size() - 3] = 0;
  refused(bad, "no row of 16-bit values");
  bad = v2;
  bad[v2.size() - 2] = 0x7f;  // row_bytes past 1 MiB
  refused(bad, "at most");
  bad = v2;
  bad[4] = static_cast<uint8_t>(staging::kVersion + 1);  // a version from the future
  auto future = staging::decode(bad);
  REQUIRE(future.status().code() == ErrorCode::kUnsupportedVersion);
  // A v1 message carries no codec fields: a v2 header over v1 bytes is truncated.
  bad = v1;
  bad[4] = 2;
  REQUIRE(staging::decode(bad).status().code() == ErrorCode::kMalformed);
  // A codec on GPU staging is refused.
  staging::StagingRequest gpu{1, 2, 1 << 20, {9}, {{1}, {2}}, {}, 3, 256};
  refused(staging::encode(gpu), "only host staging encodes");
  // The raw bytes of coded pieces may be up to twice the largest slot.
  staging::Scatter big = coded;
  big.pieces = {{4096, staging::kMaxSlotBytes}, {4096 + staging::kMaxSlotBytes, staging::kMaxSlotBytes}};
  REQUIRE(staging::decode(staging::encode(big)).ok());
  big.pieces.push_back({4096 + 2 * staging::kMaxSlotBytes, 256});
  refused(staging::encode(big), "larger than any slot");
}
