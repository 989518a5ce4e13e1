// The `kvfabric` Python module: kvf::engines::KvConnector (include/kvf/engines/kv_connector.h, the
// contract) for engines written in Python. Buffers travel as integer addresses, so a torch engine
// hands over tensor.data_ptr() (host or one GPU's memory) and numpy/ctypes engines their addresses;
// the buffers must outlive the connector. Errors raise kvfabric.Error with .code (the kvf::ErrorCode
// value), .code_name ("not_found", ...) and .message. The wait_* calls release the GIL, so other
// Python threads (the scheduler's) run while a worker thread waits on a load or a save.
//
// PD: the decode side's block manager is a pair of Python callables (allocate_blocks,
// release_blocks) that the connector calls on its own threads: each call takes the GIL for itself.
// So that such a call can never wait on a thread that holds the GIL while waiting on the connector,
// the calls that block (the wait_* calls) and the connector's destruction (close(), or the object's
// release) run with the GIL released; a callback that raises refuses the request (allocate) and is
// reported through sys.unraisablehook.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kvf/engines/kv_connector.h"
#include "kvf/protocol/kv_layout.h"
#include "kvf/store/store_client.h"

namespace py = pybind11;

namespace {

using kvf::ErrorCode;
using kvf::Status;
using kvf::engines::KvConnector;
using kvf::engines::RequestId;

// A failed Status on its way to Python (translated into kvfabric.Error).
struct StatusError {
  Status status;
};

void check(const Status& status) {
  if (!status.ok()) throw StatusError{status};
}

template <typename T>
T value_of(kvf::Result<T> result) {
  if (!result.ok()) throw StatusError{result.status()};
  return std::move(result).value();
}

void throw_invalid(std::string message) {
  throw StatusError{Status(ErrorCode::kInvalidArgument, std::move(message))};
}

kvf::engines::LayerMemory parse_memory(const std::string& name) {
  if (name == "auto") return kvf::engines::LayerMemory::kAuto;
  if (name == "host") return kvf::engines::LayerMemory::kHost;
  if (name == "cuda") return kvf::engines::LayerMemory::kCuda;
  throw_invalid("memory '" + name + "' is not one of auto, host, cuda");
  return kvf::engines::LayerMemory::kAuto;
}

kvf::protocol::KvLayoutKind parse_kind(const std::string& name) {
  return value_of(kvf::protocol::parse_layout_kind(name));
}

// The layout from a LayoutDesc or a dict with the same keys (kind may be omitted: flash_attention).
kvf::protocol::KvLayoutDesc layout_from(const py::handle& obj) {
  if (py::isinstance<kvf::protocol::KvLayoutDesc>(obj)) return obj.cast<kvf::protocol::KvLayoutDesc>();
  if (!py::isinstance<py::dict>(obj)) {
    throw_invalid("layout must be a kvfabric.LayoutDesc or a dict, not " +
                  std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  const auto d = obj.cast<py::dict>();
  static const char* const kKeys[] = {"kind",     "num_layers", "num_blocks", "block_tokens",
                                      "kv_heads", "head_dim",   "dtype_bytes"};
  for (const auto& item : d) {
    const auto key = py::str(item.first).cast<std::string>();
    bool known = false;
    for (const char* k : kKeys) known = known || key == k;
    if (!known) throw_invalid("layout: unknown key '" + key + "'");
  }
  kvf::protocol::KvLayoutDesc desc;
  if (d.contains("kind")) desc.kind = parse_kind(d["kind"].cast<std::string>());
  auto field = [&](const char* key, uint32_t& out) {
    if (!d.contains(key)) throw_invalid(std::string("layout: '") + key + "' is missing");
    out = d[key].cast<uint32_t>();
  };
  field("num_layers", desc.num_layers);
  field("num_blocks", desc.num_blocks);
  field("block_tokens", desc.block_tokens);
  field("kv_heads", desc.kv_heads);
  field("head_dim", desc.head_dim);
  field("dtype_bytes", desc.dtype_bytes);
  return desc;
}

// CUDA's cudaStreamLegacy (stream 0, the legacy default stream), without the CUDA headers:
// KvConnector takes a null stream as "no stream".
void* const kCudaStreamLegacy = reinterpret_cast<void*>(uintptr_t{1});

// The connector and, when it was given a daemon socket, the store client it owns (declared
// first, destroyed last: the connector must not outlive it). The block manager's callables are
// declared before both: they are released (under the GIL) only after the connector, whose threads
// call them, has gone.
class Connector {
 public:
  Connector(const std::string& model, uint32_t chunk_tokens, const std::optional<std::string>& store_socket,
            bool verify_loads, const std::string& memory, const std::optional<std::string>& listen,
            const py::object& allocate_blocks, const py::object& release_blocks, const std::string& name) {
    kvf::engines::KvConnectorOptions o;
    o.model = model;
    o.chunk_tokens = chunk_tokens;
    o.verify_loads = verify_loads;
    o.memory = parse_memory(memory);
    o.name = name;
    if (listen && !listen->empty()) {
      if (allocate_blocks.is_none() || release_blocks.is_none()) {
        throw_invalid(
            "listen is set, so allocate_blocks and release_blocks are required (the decode side's "
            "block manager)");
      }
      o.listen = *listen;
    }
    if (!allocate_blocks.is_none()) {
      if (!PyCallable_Check(allocate_blocks.ptr())) throw_invalid("allocate_blocks is not callable");
      allocate_ = allocate_blocks;
      o.allocate_blocks = [this](RequestId request, uint32_t n) { return call_allocate(request, n); };
    }
    if (!release_blocks.is_none()) {
      if (!PyCallable_Check(release_blocks.ptr())) throw_invalid("release_blocks is not callable");
      release_ = release_blocks;
      o.release_blocks = [this](RequestId request, std::vector<uint32_t> blocks) {
        call_release(request, std::move(blocks));
      };
    }
    if (store_socket && !store_socket->empty()) {
      kvf::store::StoreClientOptions so;
      so.socket_path = *store_socket;
      so.client_name = "kvfabric.python " + model;
      store_ = std::make_unique<kvf::store::StoreClient>(std::move(so));
      o.store = store_.get();
    }
    connector_ = value_of(KvConnector::create(std::move(o)));
  }

  void register_kv_caches(const py::handle& layout, const std::vector<uintptr_t>& layers) {
    auto kv_layout = value_of(kvf::protocol::KvLayout::create(layout_from(layout)));
    kvf::engines::KvCacheView view{kv_layout, {}};
    view.layers.reserve(layers.size());
    for (uintptr_t p : layers) view.layers.push_back(reinterpret_cast<uint8_t*>(p));
    check(connector_->register_kv_caches(view));
  }

  ~Connector() { close(); }
  Connector(const Connector&) = delete;
  Connector& operator=(const Connector&) = delete;

  // Ends the connector (its threads joined, queued work dropped) with the GIL released, so that a
  // callback waiting for the GIL can finish; called with the GIL held.
  void close() {
    if (!connector_) return;
    closing_ = true;
    std::unique_ptr<KvConnector> connector = std::move(connector_);
    {
      py::gil_scoped_release release;
      connector.reset();
    }
    store_.reset();
  }

  KvConnector& c() {
    if (!connector_) throw_invalid("the connector is closed");
    return *connector_;
  }
  const KvConnector& c() const {
    if (!connector_) throw_invalid("the connector is closed");
    return *connector_;
  }

 private:
  // On a connector thread: the Python allocate_blocks(request, n), under the GIL. A list of n
  // block ids; None, an empty list, an exception or a wrong type refuse the request.
  std::vector<uint32_t> call_allocate(RequestId request, uint32_t n) {
    if (closing_) return {};
    py::gil_scoped_acquire gil;
    try {
      py::object got = allocate_(request, n);
      if (got.is_none()) return {};
      return got.cast<std::vector<uint32_t>>();
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("kvfabric.KvConnector allocate_blocks");
    } catch (const std::exception& e) {  // a result that is not a list of block ids
      PyErr_SetString(
          PyExc_TypeError,
          (std::string("allocate_blocks must return a list of block ids or None: ") + e.what()).c_str());
      PyErr_WriteUnraisable(allocate_.ptr());
    }
    return {};
  }

  // On a connector thread: the Python release_blocks(request, blocks), under the GIL.
  void call_release(RequestId request, std::vector<uint32_t> blocks) {
    if (closing_) return;
    py::gil_scoped_acquire gil;
    try {
      release_(request, py::cast(blocks));
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("kvfabric.KvConnector release_blocks");
    }
  }

  py::object allocate_;
  py::object release_;
  std::atomic<bool> closing_{false};
  std::unique_ptr<kvf::store::StoreClient> store_;
  std::unique_ptr<KvConnector> connector_;
};

// bytes from bytes, bytearray, memoryview or any buffer (or a list of ints).
std::vector<uint8_t> bytes_of(const py::handle& obj) {
  if (obj.is_none()) return {};
  PyObject* raw = PyBytes_FromObject(obj.ptr());
  if (raw == nullptr) {
    PyErr_Clear();
    throw_invalid("context must be bytes-like (bytes, bytearray, memoryview), not " +
                  std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  auto b = py::reinterpret_steal<py::bytes>(raw);
  char* data = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(b.ptr(), &data, &size) != 0) throw py::error_already_set();
  return std::vector<uint8_t>(data, data + size);
}

}  // namespace

PYBIND11_MODULE(kvfabric, m) {
  m.doc() = "kvfabric's engine connector (kvf::engines::KvConnector), shaped like vLLM v1's KV connector";

  // kvfabric.Error(Exception): .code, .code_name, .message; str() is "code_name: message".
  // Leaked on purpose: a static py::object would be released after the interpreter is gone.
  static auto* error = new py::exception<StatusError>(m, "Error");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusError& e) {
      py::object exc = py::reinterpret_borrow<py::object>(error->ptr())(e.status.to_string());
      exc.attr("code") = static_cast<int>(e.status.code());
      exc.attr("code_name") = std::string(kvf::error_code_name(e.status.code()));
      exc.attr("message") = e.status.message();
      PyErr_SetObject(error->ptr(), exc.ptr());
    }
  });
  // Whether the GPU paths (memory="cuda", PD over cuda_ipc, CUDA events) were compiled in.
#ifdef KVF_HAVE_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def(
      "error_code_name",
      [](int code) { return std::string(kvf::error_code_name(static_cast<ErrorCode>(code))); },
      py::arg("code"), "The name of a kvf::ErrorCode value (\"not_found\", ...).");

  py::class_<kvf::protocol::KvLayoutDesc>(m, "LayoutDesc",
                                          "The engine's paged KV cache layout (protocol::KvLayoutDesc).")
      .def(py::init([](const std::string& kind, uint32_t num_layers, uint32_t num_blocks,
                       uint32_t block_tokens, uint32_t kv_heads, uint32_t head_dim, uint32_t dtype_bytes) {
             kvf::protocol::KvLayoutDesc d;
             d.kind = parse_kind(kind);
             d.num_layers = num_layers;
             d.num_blocks = num_blocks;
             d.block_tokens = block_tokens;
             d.kv_heads = kv_heads;
             d.head_dim = head_dim;
             d.dtype_bytes = dtype_bytes;
             return d;
           }),
           py::kw_only(), py::arg("kind") = "flash_attention", py::arg("num_layers"), py::arg("num_blocks"),
           py::arg("block_tokens"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("dtype_bytes"))
      .def_property(
          "kind", [](const kvf::protocol::KvLayoutDesc& d) { return std::string(layout_kind_name(d.kind)); },
          [](kvf::protocol::KvLayoutDesc& d, const std::string& k) { d.kind = parse_kind(k); })
      .def_readwrite("num_layers", &kvf::protocol::KvLayoutDesc::num_layers)
      .def_readwrite("num_blocks", &kvf::protocol::KvLayoutDesc::num_blocks)
      .def_readwrite("block_tokens", &kvf::protocol::KvLayoutDesc::block_tokens)
      .def_readwrite("kv_heads", &kvf::protocol::KvLayoutDesc::kv_heads)
      .def_readwrite("head_dim", &kvf::protocol::KvLayoutDesc::head_dim)
      .def_readwrite("dtype_bytes", &kvf::protocol::KvLayoutDesc::dtype_bytes)
      .def_property_readonly("layer_bytes",
                             [](const kvf::protocol::KvLayoutDesc& d) {
                               return value_of(kvf::protocol::KvLayout::create(d)).layer_bytes();
                             })
      .def_property_readonly("block_bytes",
                             [](const kvf::protocol::KvLayoutDesc& d) {
                               return value_of(kvf::protocol::KvLayout::create(d)).block_bytes();
                             })
      .def("__repr__", [](const kvf::protocol::KvLayoutDesc& d) {
        auto layout = kvf::protocol::KvLayout::create(d);
        return layout.ok() ? "LayoutDesc(" + layout->to_string() + ")" : std::string("LayoutDesc(invalid)");
      });

  py::class_<Connector>(m, "KvConnector",
                        "The engine-facing connector. See include/kvf/engines/kv_connector.h for each call.")
      .def(py::init<const std::string&, uint32_t, const std::optional<std::string>&, bool, const std::string&,
                    const std::optional<std::string>&, const py::object&, const py::object&,
                    const std::string&>(),
           py::arg("model"), py::kw_only(), py::arg("chunk_tokens") = kvf::protocol::kDefaultChunkTokens,
           py::arg("store_socket") = py::none(), py::arg("verify_loads") = true, py::arg("memory") = "auto",
           py::arg("listen") = py::none(), py::arg("allocate_blocks") = py::none(),
           py::arg("release_blocks") = py::none(), py::arg("name") = "kvfabric-engine",
           "store_socket: the node's kvfabricd Unix socket (None: no store; every lookup matches nothing). "
           "memory: 'auto', 'host' or 'cuda'. PD, decode side: listen: 'host:port' to take prefill engines' "
           "streams on (port 0: any; listening starts at register_kv_caches, see listen_port); "
           "allocate_blocks(request, n) -> list of n distinct block ids (None or []: refuse) and "
           "release_blocks(request, blocks) (a failed stream's blocks handed back): the engine's block "
           "manager, required when listening, called on the connector's threads (each takes the GIL). "
           "name: shown to peers.")
      .def("close", &Connector::close,
           "Ends the connector now (queued work dropped, PD streams ended); later calls raise. Also done "
           "when the object is released. Must not race other calls on it.")
      .def("__enter__", [](py::object self) { return self; })
      .def(
          "__exit__", [](Connector& s, const py::args&) { s.close(); }, "close()")
      .def("register_kv_caches", &Connector::register_kv_caches, py::arg("layout"), py::arg("layers"),
           "layout: a LayoutDesc or a dict of its fields; layers: one buffer address per layer "
           "(tensor.data_ptr(), ctypes.addressof(...)). The buffers must outlive the connector.")
      .def(
          "get_num_new_matched_tokens",
          [](Connector& s, RequestId request, const std::vector<uint32_t>& prompt, uint64_t computed) {
            return value_of(s.c().get_num_new_matched_tokens(request, prompt, computed));
          },
          py::arg("request"), py::arg("prompt"), py::arg("num_computed_tokens"))
      .def(
          "update_state_after_alloc",
          [](Connector& s, RequestId request, const std::vector<uint32_t>& block_table, uint64_t external) {
            check(s.c().update_state_after_alloc(request, block_table, external));
          },
          py::arg("request"), py::arg("block_table"), py::arg("num_external_tokens"))
      .def(
          "request_finished",
          [](Connector& s, RequestId request) { return value_of(s.c().request_finished(request)); },
          py::arg("request"), "True: free the blocks once get_finished() lists the request as sending.")
      .def(
          "abort", [](Connector& s, RequestId request) { check(s.c().abort(request)); }, py::arg("request"))
      .def("start_load_kv", [](Connector& s) { check(s.c().start_load_kv()); })
      .def(
          "wait_for_layer_load",
          [](Connector& s, uint32_t layer) {
            Status st;
            {
              py::gil_scoped_release release;
              st = s.c().wait_for_layer_load(layer);
            }
            check(st);
          },
          py::arg("layer"))
      .def(
          "wait_for_load",
          [](Connector& s, RequestId request) {
            Status st;
            {
              py::gil_scoped_release release;
              st = s.c().wait_for_load(request);
            }
            check(st);
          },
          py::arg("request"))
      .def(
          "save_kv_layer",
          [](Connector& s, RequestId request, uint32_t layer, std::optional<uintptr_t> cuda_stream) {
            if (!cuda_stream) return check(s.c().save_kv_layer(request, layer));
            void* stream = *cuda_stream == 0 ? kCudaStreamLegacy : reinterpret_cast<void*>(*cuda_stream);
            check(s.c().save_kv_layer(request, layer, stream));
          },
          py::arg("request"), py::arg("layer"), py::arg("cuda_stream") = py::none(),
          "cuda_stream (GPU caches written asynchronously): the cudaStream_t, as an int, holding the layer's "
          "K/V writes (torch.cuda.current_stream().cuda_stream; 0 is the legacy default stream): the "
          "connector records an event on it and reads the layer only once it has passed. None: the layer's "
          "bytes are in place now.")
      .def("wait_for_save",
           [](Connector& s) {
             Status st;
             {
               py::gil_scoped_release release;
               st = s.c().wait_for_save();
             }
             check(st);
           })
      .def(
          "get_finished",
          [](Connector& s) {
            kvf::engines::FinishedRequests f = s.c().get_finished();
            return py::make_tuple(f.sending, f.receiving);
          },
          "(sending, receiving): lists of request ids whose connector work ended since the last call.")
      .def("get_block_ids_with_load_errors",
           [](Connector& s) { return s.c().get_block_ids_with_load_errors(); })
      .def(
          "progress",
          [](const Connector& s, RequestId request) {
            kvf::engines::RequestProgress p = value_of(s.c().progress(request));
            py::dict d;
            d["matched_tokens"] = p.matched_tokens;
            d["loaded_tokens"] = p.loaded_tokens;
            d["layers_saved"] = p.layers_saved;
            d["chunks_stored"] = p.chunks_stored;
            d["load_failed"] = p.load_failed;
            d["aborted"] = p.aborted;
            return d;
          },
          py::arg("request"))
      .def_property_readonly("num_layers", [](const Connector& s) { return s.c().num_layers(); })
      // --- PD ---
      .def(
          "send_kv_to",
          [](Connector& s, RequestId request, const std::string& peer, const py::object& context) {
            check(s.c().send_kv_to(request, peer, bytes_of(context)));
          },
          py::arg("request"), py::arg("peer"), py::arg("context") = py::bytes(),
          "Prefill side: the request's KV goes to the decode engine at peer ('host:port') with context "
          "(bytes-like), layer by layer as save_kv_layer reports each. After update_state_after_alloc, "
          "before the first save_kv_layer; the caches must be one allocation (layer l at layers[0] + "
          "l * layer_bytes).")
      .def(
          "wait_for_send",
          [](Connector& s, RequestId request) {
            KvConnector& c = s.c();
            Status st;
            {
              py::gil_scoped_release release;
              st = c.wait_for_send(request);
            }
            check(st);
          },
          py::arg("request"),
          "Blocks (without the GIL) until the request's stream has ended; raises its error.")
      .def_property_readonly(
          "listen_port", [](const Connector& s) { return s.c().listen_port(); },
          "Decode side: the port listened on (0 when not listening or before register_kv_caches).")
      .def(
          "take_received",
          [](Connector& s, RequestId request) { return value_of(s.c().take_received(request)); },
          py::arg("request"),
          "Decode side: a request get_finished() listed under receiving, once: a ReceivedKv (its blocks are "
          "the engine's to use and free). not_found otherwise.");

  py::class_<kvf::engines::ReceivedKv>(m, "ReceivedKv", "PD, decode side: a request whose KV arrived.")
      .def_readonly("request", &kvf::engines::ReceivedKv::request)
      .def_readonly("blocks", &kvf::engines::ReceivedKv::blocks,
                    "The request's blocks in order (block i holds tokens [i*block_tokens, ...)).")
      .def_property_readonly(
          "context",
          [](const kvf::engines::ReceivedKv& kv) {
            return py::bytes(reinterpret_cast<const char*>(kv.context.data()), kv.context.size());
          },
          "What the prefill engine passed to send_kv_to (bytes).")
      .def_readonly("layer_arrival_ms", &kvf::engines::ReceivedKv::layer_arrival_ms,
                    "Per layer, milliseconds from the stream's acceptance to the layer's arrival.")
      .def("__repr__", [](const kvf::engines::ReceivedKv& kv) {
        return "ReceivedKv(request=" + std::to_string(kv.request) +
               ", blocks=" + std::to_string(kv.blocks.size()) +
               ", context=" + std::to_string(kv.context.size()) + " bytes)";
      });
}
