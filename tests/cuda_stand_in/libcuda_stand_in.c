/* Stand-in libcuda.so.1: the CUDA driver calls CudaBackend makes, over host memory, for tests without a GPU.
 *
 * Compiled against the real cuda.h (the pinned nvidia-cuda-runtime wheel, the CUDA release cuda-bindings was
 * generated from), so every function below must keep the header's exact signature or the build fails.
 * cuda-bindings finds a driver that is already loaded under the soname libcuda.so.1 and takes every entry
 * point from cuGetProcAddress_v2, which here answers for the functions below and reports the rest as not
 * found, as a driver too old for them would.
 *
 * Semantics follow the driver API documentation where it states them: a mapping is inaccessible until
 * cuMemSetAccess grants access; one handle may be mapped at several addresses; cuMemRelease of a mapped
 * handle succeeds and the memory lives until its last mapping is unmapped; cuMemUnmap must cover whole
 * mappings. Where the documentation is silent (mapping over a mapping, freeing a reservation that still has
 * mappings), the code returned is this stand-in's choice, not a measured fact.
 *
 * Reservations are PROT_NONE mmaps aligned to a 2 MiB granule and a physical handle is one memfd (both from
 * ../stand_in_host_vm.h, shared with the AscendCL stand-in); mapping is
 * mmap(MAP_FIXED | MAP_SHARED) of it with PROT_NONE, cuMemSetAccess mprotects it. The memory is host
 * memory: the tests give CudaBackend a host-memory view (host_backend.host_bytes) to make tensors of it.
 */
#define _GNU_SOURCE
#include <string.h>

#include "stand_in_host_vm.h"
#include "cuda.h"

#define STAND_IN_DRIVER_VERSION CUDA_VERSION

struct handle {
    int fd;
    size_t size;
    int released; /* cuMemRelease was called; the struct lives on while mappings use it */
    int mappings;
    struct handle *next;
};

struct mapping {
    CUdeviceptr base;
    size_t size;
    struct handle *handle;
    struct mapping *next;
};

static struct handle *handles;
static struct mapping *mappings;
static int initialized;
static int primary_refs;
static int primary_context_storage; /* its address is the primary context's handle */
static __thread CUcontext current;

static struct handle *live_handle(CUmemGenericAllocationHandle h)
{
    for (struct handle *p = handles; p; p = p->next)
        if ((CUmemGenericAllocationHandle)(uintptr_t)p == h && !p->released)
            return p;
    return NULL;
}

static int any_mapping_overlaps(CUdeviceptr base, size_t size)
{
    for (struct mapping *m = mappings; m; m = m->next)
        if (m->base < base + size && base < m->base + m->size)
            return 1;
    return 0;
}

/* The bytes of [base, base + size) that whole mappings inside it cover; -1 if a mapping crosses its edge. */
static long long covered_by_whole_mappings(CUdeviceptr base, size_t size)
{
    long long covered = 0;
    for (struct mapping *m = mappings; m; m = m->next) {
        if (!(m->base < base + size && base < m->base + m->size))
            continue;
        if (m->base < base || m->base + m->size > base + size)
            return -1;
        covered += (long long)m->size;
    }
    return covered;
}

static void drop_handle(struct handle *h)
{
    struct handle **link = &handles;
    while (*link != h)
        link = &(*link)->next;
    *link = h->next;
    close(h->fd);
    free(h);
}

static CUresult check_prop(const CUmemAllocationProp *prop)
{
    if (!prop || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return CUDA_ERROR_INVALID_VALUE;
    if (prop->location.id != 0)
        return CUDA_ERROR_INVALID_DEVICE;
    return CUDA_SUCCESS;
}

static const struct {
    CUresult code;
    const char *name, *text;
} error_names[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
};

static CUresult describe(CUresult error, const char **pStr, int text)
{
    if (!pStr)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof error_names / sizeof error_names[0]; i++)
        if (error_names[i].code == error) {
            *pStr = text ? error_names[i].text : error_names[i].name;
            return CUDA_SUCCESS;
        }
    *pStr = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult CUDAAPI cuGetErrorName(CUresult error, const char **pStr) { return describe(error, pStr, 0); }

CUresult CUDAAPI cuGetErrorString(CUresult error, const char **pStr) { return describe(error, pStr, 1); }

CUresult CUDAAPI cuInit(unsigned int Flags)
{
    if (Flags)
        return CUDA_ERROR_INVALID_VALUE;
    initialized = 1;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDriverGetVersion(int *driverVersion)
{
    if (!driverVersion)
        return CUDA_ERROR_INVALID_VALUE;
    *driverVersion = STAND_IN_DRIVER_VERSION;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetCount(int *count)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!count)
        return CUDA_ERROR_INVALID_VALUE;
    *count = 1;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0)
        return CUDA_ERROR_INVALID_DEVICE;
    *device = 0;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pi)
        return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0)
        return CUDA_ERROR_INVALID_DEVICE;
    if (attrib != CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)
        return CUDA_ERROR_NOT_SUPPORTED;
    *pi = 1;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0)
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    primary_refs++;
    pthread_mutex_unlock(&lock);
    *pctx = (CUcontext)&primary_context_storage;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice dev)
{
    if (dev != 0)
        return CUDA_ERROR_INVALID_DEVICE;
    CUresult err = CUDA_SUCCESS;
    pthread_mutex_lock(&lock);
    if (primary_refs == 0)
        err = CUDA_ERROR_INVALID_CONTEXT;
    else
        primary_refs--;
    pthread_mutex_unlock(&lock);
    return err;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext *pctx)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    *pctx = current;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetCurrent(CUcontext ctx)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx && ctx != (CUcontext)&primary_context_storage)
        return CUDA_ERROR_INVALID_CONTEXT;
    current = ctx;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                               CUmemAllocationGranularity_flags option)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!granularity || (option != CU_MEM_ALLOC_GRANULARITY_MINIMUM && option != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))
        return CUDA_ERROR_INVALID_VALUE;
    CUresult err = check_prop(prop);
    if (err == CUDA_SUCCESS)
        *granularity = GRANULE;
    return err;
}

CUresult CUDAAPI cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                     unsigned long long flags)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!ptr || !size || !aligned(size) || flags || (alignment & (alignment - 1)) || alignment > GRANULE)
        return CUDA_ERROR_INVALID_VALUE;
    (void)addr; /* a hint, which the driver may ignore */
    uintptr_t start = reserve_range(size);
    if (!start)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *ptr = start;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    CUresult err = CUDA_SUCCESS;
    pthread_mutex_lock(&lock);
    struct reservation **link = reservation_link(ptr);
    if (!*link || (*link)->size != size || any_mapping_overlaps((*link)->base, size))
        err = CUDA_ERROR_INVALID_VALUE;
    else
        release_reservation(link);
    pthread_mutex_unlock(&lock);
    return err;
}

CUresult CUDAAPI cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                             unsigned long long flags)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!handle || !size || !aligned(size) || flags)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult err = check_prop(prop);
    if (err != CUDA_SUCCESS)
        return err;
    struct handle *h = calloc(1, sizeof *h);
    if (!h)
        return CUDA_ERROR_OUT_OF_MEMORY;
    h->fd = new_memfd("expertweave-cuda-stand-in", size);
    if (h->fd < 0) {
        free(h);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    h->size = size;
    pthread_mutex_lock(&lock);
    h->next = handles;
    handles = h;
    pthread_mutex_unlock(&lock);
    *handle = (CUmemGenericAllocationHandle)(uintptr_t)h;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemRelease(CUmemGenericAllocationHandle handle)
{
    CUresult err = CUDA_SUCCESS;
    pthread_mutex_lock(&lock);
    log_call("cuMemRelease");
    struct handle *h = live_handle(handle);
    if (!h)
        err = CUDA_ERROR_INVALID_VALUE;
    else if (h->mappings)
        h->released = 1; /* freed when its last mapping goes */
    else
        drop_handle(h);
    pthread_mutex_unlock(&lock);
    return err;
}

static CUresult map_locked(CUdeviceptr base, size_t size, size_t offset, CUmemGenericAllocationHandle handle)
{
    struct handle *h = live_handle(handle);
    if (!h || !reservation_holding(base, size) || offset + size > h->size || any_mapping_overlaps(base, size))
        return CUDA_ERROR_INVALID_VALUE;
    struct mapping *m = malloc(sizeof *m);
    if (!m)
        return CUDA_ERROR_OUT_OF_MEMORY;
    void *got = mmap((void *)(uintptr_t)base, size, PROT_NONE, MAP_SHARED | MAP_FIXED, h->fd, (off_t)offset);
    if (got == MAP_FAILED) {
        free(m);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    m->base = base;
    m->size = size;
    m->handle = h;
    m->next = mappings;
    mappings = m;
    h->mappings++;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                          unsigned long long flags)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!ptr || !handle || flags || !aligned(ptr) || !aligned(offset) || !size || !aligned(size))
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lock);
    CUresult err = map_locked(ptr, size, offset, handle);
    pthread_mutex_unlock(&lock);
    return err;
}

CUresult CUDAAPI cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!desc || count != 1 || desc->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return CUDA_ERROR_INVALID_VALUE;
    if (desc->location.id != 0)
        return CUDA_ERROR_INVALID_DEVICE;
    int prot;
    if (desc->flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        prot = PROT_READ | PROT_WRITE;
    else if (desc->flags == CU_MEM_ACCESS_FLAGS_PROT_READ)
        prot = PROT_READ;
    else if (desc->flags == CU_MEM_ACCESS_FLAGS_PROT_NONE)
        prot = PROT_NONE;
    else
        return CUDA_ERROR_INVALID_VALUE;
    CUresult err = CUDA_SUCCESS;
    pthread_mutex_lock(&lock);
    if (!size || covered_by_whole_mappings(ptr, size) != (long long)size)
        err = CUDA_ERROR_INVALID_VALUE; /* access is set on mapped memory only */
    else if (mprotect((void *)(uintptr_t)ptr, size, prot) != 0)
        err = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_unlock(&lock);
    return err;
}

/* No device work runs here, so there is nothing to wait for; the call is logged so tests see its order. */
CUresult CUDAAPI cuCtxSynchronize(void)
{
    pthread_mutex_lock(&lock);
    log_call("cuCtxSynchronize");
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    CUresult err = CUDA_SUCCESS;
    pthread_mutex_lock(&lock);
    log_call("cuMemUnmap");
    if (!size || covered_by_whole_mappings(ptr, size) != (long long)size)
        err = CUDA_ERROR_INVALID_VALUE;
    else if (reserve_again(ptr, size) != 0)
        err = CUDA_ERROR_OUT_OF_MEMORY;
    else {
        struct mapping **link = &mappings;
        while (*link) {
            struct mapping *m = *link;
            if (m->base >= ptr && m->base + m->size <= ptr + size) {
                *link = m->next;
                if (--m->handle->mappings == 0 && m->handle->released)
                    drop_handle(m->handle);
                free(m);
            } else {
                link = &m->next;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    return err;
}

static const struct {
    const char *name;
    void *function;
} entry_points[] = {
    {"cuGetErrorName", (void *)cuGetErrorName},
    {"cuGetErrorString", (void *)cuGetErrorString},
    {"cuInit", (void *)cuInit},
    {"cuDriverGetVersion", (void *)cuDriverGetVersion},
    {"cuDeviceGetCount", (void *)cuDeviceGetCount},
    {"cuDeviceGet", (void *)cuDeviceGet},
    {"cuDeviceGetAttribute", (void *)cuDeviceGetAttribute},
    {"cuDevicePrimaryCtxRetain", (void *)cuDevicePrimaryCtxRetain},
    {"cuDevicePrimaryCtxRelease", (void *)cuDevicePrimaryCtxRelease},
    {"cuCtxGetCurrent", (void *)cuCtxGetCurrent},
    {"cuCtxSetCurrent", (void *)cuCtxSetCurrent},
    {"cuMemGetAllocationGranularity", (void *)cuMemGetAllocationGranularity},
    {"cuMemAddressReserve", (void *)cuMemAddressReserve},
    {"cuMemAddressFree", (void *)cuMemAddressFree},
    {"cuMemCreate", (void *)cuMemCreate},
    {"cuMemRelease", (void *)cuMemRelease},
    {"cuMemMap", (void *)cuMemMap},
    {"cuMemSetAccess", (void *)cuMemSetAccess},
    {"cuMemUnmap", (void *)cuMemUnmap},
    {"cuCtxSynchronize", (void *)cuCtxSynchronize},
};

CUresult CUDAAPI cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                                  CUdriverProcAddressQueryResult *symbolStatus)
{
    (void)flags;
    if (!symbol || !pfn)
        return CUDA_ERROR_INVALID_VALUE;
    *pfn = NULL;
    for (size_t i = 0; i < sizeof entry_points / sizeof entry_points[0]; i++)
        if (strcmp(entry_points[i].name, symbol) == 0 && cudaVersion <= STAND_IN_DRIVER_VERSION) {
            *pfn = entry_points[i].function;
            if (symbolStatus)
                *symbolStatus = CU_GET_PROC_ADDRESS_SUCCESS;
            return CUDA_SUCCESS;
        }
    if (symbolStatus)
        *symbolStatus = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return CUDA_ERROR_NOT_FOUND;
}
