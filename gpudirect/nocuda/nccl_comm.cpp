#include "kvf/gpudirect/nccl_comm.h"

namespace kvf::gpudirect {

Status NcclComm::available() {
  return Status(ErrorCode::kUnavailable,
                "this kvfabric was built without CUDA: the nccl transport cannot run");
}
Result<std::vector<uint8_t>> NcclComm::unique_id() {
  return available();
}
Result<NcclComm> NcclComm::create(std::span<const uint8_t>, int, int, std::chrono::milliseconds,
                                  const std::atomic<bool>*) {
  return available();
}
Status NcclComm::send(const void*, uint64_t, void*) {
  return available();
}
Status NcclComm::recv(void*, uint64_t, void*) {
  return available();
}
Status NcclComm::send(std::span<const Part>, void*) {
  return available();
}
Status NcclComm::recv(void*, std::span<const uint64_t>, void*) {
  return available();
}
Status NcclComm::async_error() const {
  return Status::Ok();
}
void NcclComm::abort() {}
Status NcclComm::close(std::chrono::milliseconds) {
  return Status::Ok();
}
void NcclComm::reset() {}

}  // namespace kvf::gpudirect
