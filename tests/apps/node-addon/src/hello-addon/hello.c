/* Returns the version of the Node headers this addon was compiled against. */
#include <node_api.h>
#include <node_version.h>

static napi_value built_for(napi_env env, napi_callback_info info) {
  napi_value result;
  napi_create_string_utf8(env, "v" NODE_VERSION_STRING, NAPI_AUTO_LENGTH, &result);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "builtFor", NAPI_AUTO_LENGTH, built_for, NULL, &fn);
  napi_set_named_property(env, exports, "builtFor", fn);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
