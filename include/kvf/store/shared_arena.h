// SharedArena: the store arena as shared memory that kvfabricd creates and each engine process maps
// for itself, so engines write and read chunks in place (memcpy or DMA) and no chunk byte passes
// through the daemon. The daemon's copy is the creator: it removes the name when destroyed, and the
// memory lives on until the last process unmaps it. Move-only RAII; the bytes may be used from any
// thread, the object itself is not synchronized.
#pragma once

#include <cstdint>
#include <string>

#include "kvf/protocol/status.h"
#include "kvf/protocol/store_rpc.h"

namespace kvf::store {

class SharedArena {
 public:
  using Backing = protocol::store_rpc::ArenaBacking;

  // Daemon side. `tag` (the node name) goes into the name, with this process's id, so two daemons
  // never clash; arenas of the same tag whose daemon died (kill -9) are removed first.
  // With `try_huge_pages`, the arena is first made on a hugetlbfs mount (2 MiB pages, no page-table
  // churn when engines register it with CUDA or UCX); where there is none, or it has too few free
  // pages, it falls back to POSIX shm (/dev/shm) with madvise(MADV_HUGEPAGE), and huge_pages_note()
  // says why. The memory is allocated up front (posix_fallocate), so a full /dev/shm fails here
  // instead of as SIGBUS in an engine later.
  static Result<SharedArena> create(const std::string& tag, uint64_t bytes, bool try_huge_pages);
  // Engine side: maps the arena a daemon's hello named. kNotFound when it no longer exists.
  static Result<SharedArena> open(Backing backing, const std::string& name, uint64_t bytes);

  SharedArena(SharedArena&& other) noexcept;
  SharedArena& operator=(SharedArena&& other) noexcept;
  SharedArena(const SharedArena&) = delete;
  SharedArena& operator=(const SharedArena&) = delete;
  ~SharedArena();

  uint8_t* data() const { return data_; }
  uint64_t size() const { return bytes_; }
  const std::string& name() const { return name_; }  // a shm name ("/kvfabric-a-123") or a file path
  Backing backing() const { return backing_; }
  bool huge_pages() const { return backing_ == Backing::kHugetlbfs; }
  // One line for the daemon's log on which pages the arena got and why.
  const std::string& huge_pages_note() const { return note_; }

 private:
  SharedArena() = default;
  void release();

  uint8_t* data_ = nullptr;
  uint64_t bytes_ = 0;   // what users may touch
  uint64_t mapped_ = 0;  // what was mapped (rounded up to the huge page size on hugetlbfs)
  std::string name_;
  Backing backing_ = Backing::kPosixShm;
  bool creator_ = false;
  std::string note_;
};

}  // namespace kvf::store
