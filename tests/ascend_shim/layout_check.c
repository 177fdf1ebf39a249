/* Prints, from the real AscendCL headers, every layout and constant the ctypes binding in
 * expertweave_ascend/memory/acl_backend.py declares by hand, one per line:
 *     sizeof TYPE BYTES
 *     field STRUCT MEMBER OFFSET BYTES
 *     const NAME VALUE
 * tests/test_acl_backend.py compares each line with the Python side, and the set of names too.
 */
#include <stddef.h>
#include <stdio.h>

#include "acl/acl_rt.h"

#define SIZE(type) printf("sizeof %s %zu\n", #type, sizeof(type))
#define FIELD(type, member) \
    printf("field %s %s %zu %zu\n", #type, #member, offsetof(type, member), sizeof(((type *)0)->member))
#define CONST(name) printf("const %s %ld\n", #name, (long)(name))

int main(void)
{
    SIZE(aclError);
    SIZE(aclrtDrvMemHandle);
    SIZE(aclrtMemGranularityOptions);
    SIZE(aclrtMemLocation);
    FIELD(aclrtMemLocation, id);
    FIELD(aclrtMemLocation, type);
    SIZE(aclrtPhysicalMemProp);
    FIELD(aclrtPhysicalMemProp, handleType);
    FIELD(aclrtPhysicalMemProp, allocationType);
    FIELD(aclrtPhysicalMemProp, memAttr);
    FIELD(aclrtPhysicalMemProp, location);
    FIELD(aclrtPhysicalMemProp, reserve);

    CONST(ACL_SUCCESS);
    CONST(ACL_MEM_HANDLE_TYPE_NONE);
    CONST(ACL_MEM_ALLOCATION_TYPE_PINNED);
    CONST(ACL_HBM_MEM_HUGE);
    CONST(ACL_MEM_LOCATION_TYPE_DEVICE);
    CONST(ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM);

    CONST(ACL_ERROR_INVALID_PARAM);
    CONST(ACL_ERROR_UNINITIALIZE);
    CONST(ACL_ERROR_BAD_ALLOC);
    CONST(ACL_ERROR_API_NOT_SUPPORT);
    CONST(ACL_ERROR_INVALID_DEVICE);
    CONST(ACL_ERROR_MEMORY_ADDRESS_UNALIGNED);
    CONST(ACL_ERROR_INVALID_RESOURCE_HANDLE);
    CONST(ACL_ERROR_FEATURE_UNSUPPORTED);
    CONST(ACL_ERROR_RT_PARAM_INVALID);
    CONST(ACL_ERROR_RT_INVALID_DEVICEID);
    CONST(ACL_ERROR_RT_CONTEXT_NULL);
    CONST(ACL_ERROR_RT_ADDR_UNALIGNED);
    CONST(ACL_ERROR_RT_INVALID_HANDLE);
    CONST(ACL_ERROR_RT_FEATURE_NOT_SUPPORT);
    CONST(ACL_ERROR_RT_MEMORY_ALLOCATION);
    CONST(ACL_ERROR_RT_MEMORY_FREE);
    CONST(ACL_ERROR_RT_NO_DEVICE);
    CONST(ACL_ERROR_RT_DEVICE_OOM);
    CONST(ACL_ERROR_RT_INTERNAL_ERROR);
    CONST(ACL_ERROR_RT_DRV_INTERNAL_ERROR);
    return 0;
}
