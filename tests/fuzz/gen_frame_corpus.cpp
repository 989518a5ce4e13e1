// Writes the seed corpus of fuzz_frame_decoder into a directory: valid frames of every message
// type, the same payloads in the "type byte | payload" form, and notifications. Run at test time,
// so the corpus always follows the current encoding.
#include <cstdio>
#include <fstream>
#include <string>

#include "sample_messages.h"

namespace {

bool write_file(const std::string& path, const uint8_t* data, size_t size) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return static_cast<bool>(out);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kvf::protocol;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  int files = 0;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    testing::MessageFactory factory(seed);
    for (const Message& m : testing::sample_messages(seed)) {
      const std::vector<uint8_t> frame = encode_frame(m);
      const std::string name = std::string(message_type_name(message_type(m))) + "_" + std::to_string(seed);
      std::vector<uint8_t> payload_form(frame.begin() + kFrameHeaderBytes - 1, frame.end());
      payload_form[0] = static_cast<uint8_t>(message_type(m));
      if (!write_file(dir + "/frame_" + name, frame.data(), frame.size()) ||
          !write_file(dir + "/payload_" + name, payload_form.data(), payload_form.size())) {
        std::fprintf(stderr, "cannot write into %s\n", dir.c_str());
        return 1;
      }
      files += 2;
    }
    const auto n = encode_notification(factory.notification());
    if (!write_file(dir + "/notification_" + std::to_string(seed), n.data(), n.size())) return 1;
    ++files;
  }
  std::printf("wrote %d corpus files into %s\n", files, dir.c_str());
  return 0;
}
