#include "catch.h"
#include "kvf/protocol/notification.h"

using namespace kvf;
using namespace kvf::protocol;

TEST_CASE("notifications round-trip for every kind") {
  for (NotificationKind k : {NotificationKind::kLayerReady, NotificationKind::kRequestAbort,
                             NotificationKind::kPing, NotificationKind::kPong}) {
    const Notification n{k, ErrorCode::kVerifyFailed, 0x0102030405060708ull, ~0ull, 0xfffffffeu};
    const auto bytes = encode_notification(n);
    Result<Notification> back = decode_notification(bytes);
    REQUIRE(back.ok());
    REQUIRE(*back == n);
  }
}

TEST_CASE("the record layout is the documented one") {
  const Notification n{NotificationKind::kRequestAbort, ErrorCode::kTimeout, 0x1122334455667788ull, 0x99ull,
                       7};
  const auto b = encode_notification(n);
  const std::array<uint8_t, kNotificationBytes> expected = {
      'K',  'V',  'N',  '1',                           // magic
      2,    0,                                         // kind
      4,    0,                                         // code
      0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,  // session_id
      0x99, 0,    0,    0,    0,    0,    0,    0,     // request_id
      7,    0,    0,    0,                             // layer
      0,    0,    0,    0};                            // reserved
  REQUIRE(b == expected);
}

TEST_CASE("bad notifications are rejected") {
  const auto good = encode_notification(Notification{});
  SECTION("wrong size") {
    for (size_t n : {0u, 1u, 31u}) {
      Result<Notification> r = decode_notification(std::span<const uint8_t>(good).first(n));
      REQUIRE_FALSE(r.ok());
      REQUIRE(r.status().code() == ErrorCode::kMalformed);
    }
    std::vector<uint8_t> longer(good.begin(), good.end());
    longer.push_back(0);
    Result<Notification> r = decode_notification(longer);
    REQUIRE_FALSE(r.ok());
    REQUIRE(r.status().message() == "notification: expected 32 bytes, got 33");
  }
  SECTION("bad magic") {
    auto b = good;
    b[3] = '2';
    Result<Notification> r = decode_notification(b);
    REQUIRE_FALSE(r.ok());
    REQUIRE(r.status().message() == "notification: bad magic 0x324e564b (expected 0x314e564b)");
  }
  SECTION("unknown kind") {
    for (int k : {0, 5, 255}) {
      auto b = good;
      b[4] = static_cast<uint8_t>(k);
      REQUIRE_FALSE(decode_notification(b).ok());
    }
  }
  SECTION("unknown error code") {
    auto b = good;
    b[6] = 14;
    Result<Notification> r = decode_notification(b);
    REQUIRE_FALSE(r.ok());
    REQUIRE(r.status().message() == "notification: unknown error code 14");
  }
  SECTION("the reserved word is ignored") {
    auto b = good;
    b[31] = 0xff;
    Result<Notification> r = decode_notification(b);
    REQUIRE(r.ok());
    REQUIRE(*r == Notification{});
  }
}
