// The `kvfabric` Python module: kvf::engines::KvConnector (include/kvf/engines/kv_connector.h, the
// contract) for engines written in Python. Buffers travel as integer addresses, so a torch engine
// hands over tensor.data_ptr() (host or one GPU's memory) and numpy/ctypes engines their addresses;
// the buffers must outlive the connector. Errors raise kvfabric.Error with .code (the kvf::ErrorCode
// value), .code_name ("not_found", ...) and .message. The wait_* calls release the GIL, so other
// Python threads (the scheduler's) run while a worker thread waits on a load or a save.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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

// The connector and, when it was given a daemon socket, the store client it owns (declared
// first, destroyed last: the connector must not outlive it).
class Connector {
 public:
  Connector(const std::string& model, uint32_t chunk_tokens, const std::optional<std::string>& store_socket,
            bool verify_loads, const std::string& memory) {
    kvf::engines::KvConnectorOptions o;
    o.model = model;
    o.chunk_tokens = chunk_tokens;
    o.verify_loads = verify_loads;
    o.memory = parse_memory(memory);
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

  KvConnector& c() { return *connector_; }
  const KvConnector& c() const { return *connector_; }

 private:
  std::unique_ptr<kvf::store::StoreClient> store_;
  std::unique_ptr<KvConnector> connector_;
};

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
      .def(py::init<const std::string&, uint32_t, const std::optional<std::string>&, bool,
                    const std::string&>(),
           py::arg("model"), py::kw_only(), py::arg("chunk_tokens") = kvf::protocol::kDefaultChunkTokens,
           py::arg("store_socket") = py::none(), py::arg("verify_loads") = true, py::arg("memory") = "auto",
           "store_socket: the node's kvfabricd Unix socket (None: no store; every lookup matches nothing). "
           "memory: 'auto', 'host' or 'cuda'.")
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
          [](Connector& s, RequestId request, uint32_t layer) { check(s.c().save_kv_layer(request, layer)); },
          py::arg("request"), py::arg("layer"))
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
      .def_property_readonly("num_layers", [](const Connector& s) { return s.c().num_layers(); });
}
