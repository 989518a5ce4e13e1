#include "catch.h"
#include "kvf/protocol/status.h"

TEST_CASE("Status carries code and message") {
  kvf::Status ok;
  REQUIRE(ok.ok());
  kvf::Status bad(kvf::ErrorCode::kPeerLost, "connection reset");
  REQUIRE_FALSE(bad.ok());
  REQUIRE(bad.to_string() == "peer_lost: connection reset");
  kvf::Result<int> r = bad;
  REQUIRE_FALSE(r.ok());
  REQUIRE(r.status().code() == kvf::ErrorCode::kPeerLost);
  kvf::Result<int> v = 7;
  REQUIRE(*v == 7);
}
