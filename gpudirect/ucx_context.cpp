#include "kvf/gpudirect/ucx_context.h"

#include <string>

namespace kvf::gpudirect {

std::string ucx_status_string(ucs_status_t status) {
  return std::string("UCX error: ") + ucs_status_string(status) + " (" +
         std::to_string(static_cast<int>(status)) + ")";
}

Result<std::shared_ptr<UcxContext>> UcxContext::create() {
  ucp_config_t* config = nullptr;
  ucs_status_t status = ucp_config_read(nullptr, nullptr, &config);
  if (status != UCS_OK)
    return Status(ErrorCode::kTransportError, "ucp_config_read: " + ucx_status_string(status));

  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 1;  // regions are registered from engine threads, workers run elsewhere
  ucp_context_h context = nullptr;
  status = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (status != UCS_OK) return Status(ErrorCode::kTransportError, "ucp_init: " + ucx_status_string(status));
  return std::shared_ptr<UcxContext>(new UcxContext(context));
}

UcxContext::~UcxContext() {
  ucp_cleanup(context_);
}

}  // namespace kvf::gpudirect
