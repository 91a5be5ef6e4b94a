//! AscendCL error codes as typed errors: the code, its name, the function
//! that returned it and the runtime's own message.

/// A failed AscendCL call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{function} failed with {name} ({code}){}", message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct AclError {
    /// The `aclError` value.
    pub code: i32,
    /// Its name from the AscendCL headers, or "unknown".
    pub name: &'static str,
    /// The C function that returned it.
    pub function: &'static str,
    /// `aclGetRecentErrMsg()` right after the failure.
    pub message: Option<String>,
}

/// Names of the error codes (acl_base.h and the runtime's rt_error_codes.h).
const NAMES: &[(i32, &str)] = &[
    (100000, "ACL_ERROR_INVALID_PARAM"),
    (100001, "ACL_ERROR_UNINITIALIZE"),
    (100002, "ACL_ERROR_REPEAT_INITIALIZE"),
    (100003, "ACL_ERROR_INVALID_FILE"),
    (100004, "ACL_ERROR_WRITE_FILE"),
    (100005, "ACL_ERROR_INVALID_FILE_SIZE"),
    (100006, "ACL_ERROR_PARSE_FILE"),
    (100007, "ACL_ERROR_FILE_MISSING_ATTR"),
    (100008, "ACL_ERROR_FILE_ATTR_INVALID"),
    (100011, "ACL_ERROR_INVALID_MODEL_ID"),
    (100012, "ACL_ERROR_DESERIALIZE_MODEL"),
    (100013, "ACL_ERROR_PARSE_MODEL"),
    (100014, "ACL_ERROR_READ_MODEL_FAILURE"),
    (100015, "ACL_ERROR_MODEL_SIZE_INVALID"),
    (100016, "ACL_ERROR_MODEL_MISSING_ATTR"),
    (100017, "ACL_ERROR_MODEL_INPUT_NOT_MATCH"),
    (100018, "ACL_ERROR_MODEL_OUTPUT_NOT_MATCH"),
    (100019, "ACL_ERROR_MODEL_NOT_DYNAMIC"),
    (100026, "ACL_ERROR_UNSUPPORTED_DATA_TYPE"),
    (100027, "ACL_ERROR_FORMAT_NOT_MATCH"),
    (100037, "ACL_ERROR_REPEAT_FINALIZE"),
    (148049, "ACL_ERROR_INVALID_OPP_PATH"),
    (148051, "ACL_ERROR_RELATIVE_RESOURCE_NOT_CLEARED"),
    (200000, "ACL_ERROR_BAD_ALLOC"),
    (200001, "ACL_ERROR_API_NOT_SUPPORT"),
    (200002, "ACL_ERROR_INVALID_DEVICE"),
    (200003, "ACL_ERROR_MEMORY_ADDRESS_UNALIGNED"),
    (200004, "ACL_ERROR_RESOURCE_NOT_MATCH"),
    (200005, "ACL_ERROR_INVALID_RESOURCE_HANDLE"),
    (200006, "ACL_ERROR_FEATURE_UNSUPPORTED"),
    (300000, "ACL_ERROR_STORAGE_OVER_LIMIT"),
    (500000, "ACL_ERROR_INTERNAL_ERROR"),
    (500001, "ACL_ERROR_FAILURE"),
    (500002, "ACL_ERROR_GE_FAILURE"),
    (500003, "ACL_ERROR_RT_FAILURE"),
    (500004, "ACL_ERROR_DRV_FAILURE"),
    (500005, "ACL_ERROR_PROFILING_FAILURE"),
    (107000, "ACL_ERROR_RT_PARAM_INVALID"),
    (107001, "ACL_ERROR_RT_INVALID_DEVICEID"),
    (107002, "ACL_ERROR_RT_CONTEXT_NULL"),
    (107003, "ACL_ERROR_RT_STREAM_CONTEXT"),
    (107004, "ACL_ERROR_RT_MODEL_CONTEXT"),
    (107017, "ACL_ERROR_RT_INVALID_HANDLE"),
    (207000, "ACL_ERROR_RT_FEATURE_NOT_SUPPORT"),
    (207001, "ACL_ERROR_RT_MEMORY_ALLOCATION"),
    (207004, "ACL_ERROR_RT_NO_DEVICE"),
    (207015, "ACL_ERROR_RT_REPEATED_INIT"),
    (207018, "ACL_ERROR_RT_DEVICE_OOM"),
    (507000, "ACL_ERROR_RT_INTERNAL_ERROR"),
    (507011, "ACL_ERROR_RT_MODEL_EXECUTE"),
    (507015, "ACL_ERROR_RT_AICORE_EXCEPTION"),
    (507033, "ACL_ERROR_RT_DEV_SETUP_ERROR"),
    (507899, "ACL_ERROR_RT_DRV_INTERNAL_ERROR"),
];

/// The name of an `aclError` value.
pub fn error_name(code: i32) -> &'static str {
    NAMES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, n)| *n)
        .unwrap_or("unknown")
}
