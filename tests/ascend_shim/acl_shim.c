/* Stand-in libascendcl: the AscendCL virtual-memory calls over host memory, for tests without an NPU.
 *
 * Compiled against the real acl/acl_rt.h, so every function below must keep the header's exact
 * signature or the build fails. Reservations are PROT_NONE mmaps aligned to a 2 MiB granule, a
 * physical handle is one memfd (both from ../stand_in_host_vm.h), mapping is mmap(MAP_FIXED | MAP_SHARED) of that memfd over the
 * reservation and unmapping puts PROT_NONE back. Misuse is refused with the header's error codes
 * and leaves a message for aclGetRecentErrMsg, as the runtime does; which code the real runtime
 * returns for each misuse is this stand-in's choice, not a measured fact.
 *
 * The memory is host memory: the tests give AclBackend a host-memory view (host_backend.host_bytes)
 * to make tensors of it.
 *
 * As in the real runtime, the memory calls act on the calling thread's context, which a thread gets from
 * aclrtSetDevice: a thread that never set a device is refused with ACL_ERROR_RT_CONTEXT_NULL.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "stand_in_host_vm.h"
#include "acl/acl_rt.h"

struct handle {
    int fd;
    size_t size;
    uintptr_t mapped_at; /* 0 when not mapped; one mapping per handle, as the host backend allows */
    struct handle *next;
};

struct mapping {
    uintptr_t base;
    size_t size;
    struct handle *handle;
    struct mapping *next;
};

static struct handle *handles;
static struct mapping *mappings;

static __thread char recent[256];
static __thread char handed_out[256];
static __thread int thread_device = -1; /* set by aclrtSetDevice; -1: this thread has no context */

static aclError fail(aclError code, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(recent, sizeof recent, format, args);
    va_end(args);
    return code;
}

static struct handle *live_handle(aclrtDrvMemHandle h)
{
    for (struct handle *p = handles; p; p = p->next)
        if (p == (struct handle *)h)
            return p;
    return NULL;
}

static int any_mapping_overlaps(uintptr_t base, size_t size)
{
    for (struct mapping *m = mappings; m; m = m->next)
        if (m->base < base + size && base < m->base + m->size)
            return 1;
    return 0;
}

static aclError check_prop(const aclrtPhysicalMemProp *prop, const char *call)
{
    if (prop->location.type != ACL_MEM_LOCATION_TYPE_DEVICE)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "%s: location type %d is not ACL_MEM_LOCATION_TYPE_DEVICE",
                    call, (int)prop->location.type);
    if (prop->location.id != 0)
        return fail(ACL_ERROR_RT_INVALID_DEVICEID, "%s: device %u does not exist (the stand-in has device 0)",
                    call, prop->location.id);
    if (prop->allocationType != ACL_MEM_ALLOCATION_TYPE_PINNED || prop->memAttr != ACL_HBM_MEM_HUGE)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "%s: only pinned ACL_HBM_MEM_HUGE memory is supported", call);
    return ACL_SUCCESS;
}

const char *aclGetRecentErrMsg(void)
{
    if (!recent[0])
        return NULL;
    /* Reading the message clears it, so a later success is not blamed on an old failure. */
    memcpy(handed_out, recent, sizeof handed_out);
    recent[0] = '\0';
    return handed_out;
}

aclError aclrtSetDevice(int32_t deviceId)
{
    if (deviceId != 0)
        return fail(ACL_ERROR_RT_INVALID_DEVICEID, "aclrtSetDevice: device %d does not exist (the stand-in has device 0)",
                    (int)deviceId);
    thread_device = deviceId;
    return ACL_SUCCESS;
}

#define NEED_CONTEXT(call)                                                                                      \
    do {                                                                                                         \
        if (thread_device < 0)                                                                                   \
            return fail(ACL_ERROR_RT_CONTEXT_NULL, "%s: the calling thread has no context (no aclrtSetDevice)", \
                        call);                                                                                   \
    } while (0)

aclError aclrtMemGetAllocationGranularity(aclrtPhysicalMemProp *prop, aclrtMemGranularityOptions option,
                                          size_t *granularity)
{
    if (!prop || !granularity)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMemGetAllocationGranularity: prop or granularity is NULL");
    if (option != ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM && option != ACL_RT_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMemGetAllocationGranularity: unknown option %d", (int)option);
    aclError err = check_prop(prop, "aclrtMemGetAllocationGranularity");
    if (err == ACL_SUCCESS)
        *granularity = GRANULE;
    return err;
}

aclError aclrtReserveMemAddress(void **virPtr, size_t size, size_t alignment, void *expectPtr, uint64_t flags)
{
    NEED_CONTEXT("aclrtReserveMemAddress");
    if (!virPtr)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtReserveMemAddress: virPtr is NULL");
    if (alignment || expectPtr || flags)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtReserveMemAddress: alignment, expectPtr and flags must be 0");
    if (!size || !aligned(size))
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtReserveMemAddress: size %zu is not a positive multiple of %zu",
                    size, GRANULE);
    uintptr_t start = reserve_range(size);
    if (!start)
        return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtReserveMemAddress: %s", strerror(errno));
    *virPtr = (void *)start;
    return ACL_SUCCESS;
}

aclError aclrtReleaseMemAddress(void *virPtr)
{
    NEED_CONTEXT("aclrtReleaseMemAddress");
    uintptr_t base = (uintptr_t)virPtr;
    aclError err = ACL_SUCCESS;
    pthread_mutex_lock(&lock);
    struct reservation **link = reservation_link(base);
    if (!*link)
        err = fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtReleaseMemAddress: %p is not a reservation", virPtr);
    else if (any_mapping_overlaps((*link)->base, (*link)->size))
        err = fail(ACL_ERROR_RT_MEMORY_FREE, "aclrtReleaseMemAddress: %p still has memory mapped in it", virPtr);
    else
        release_reservation(link);
    pthread_mutex_unlock(&lock);
    return err;
}

aclError aclrtMallocPhysical(aclrtDrvMemHandle *handle, size_t size, const aclrtPhysicalMemProp *prop,
                             uint64_t flags)
{
    NEED_CONTEXT("aclrtMallocPhysical");
    if (!handle || !prop)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMallocPhysical: handle or prop is NULL");
    if (flags)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMallocPhysical: flags must be 0");
    if (!size || !aligned(size))
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMallocPhysical: size %zu is not a positive multiple of %zu",
                    size, GRANULE);
    aclError err = check_prop(prop, "aclrtMallocPhysical");
    if (err != ACL_SUCCESS)
        return err;
    struct handle *h = calloc(1, sizeof *h);
    if (!h)
        return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMallocPhysical: out of host memory");
    h->fd = new_memfd("expertweave-acl-shim", size);
    if (h->fd < 0) {
        err = fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMallocPhysical: %s", strerror(errno));
        free(h);
        return err;
    }
    h->size = size;
    pthread_mutex_lock(&lock);
    h->next = handles;
    handles = h;
    pthread_mutex_unlock(&lock);
    *handle = h;
    return ACL_SUCCESS;
}

aclError aclrtFreePhysical(aclrtDrvMemHandle handle)
{
    NEED_CONTEXT("aclrtFreePhysical");
    aclError err = ACL_SUCCESS;
    pthread_mutex_lock(&lock);
    log_call("aclrtFreePhysical");
    struct handle *h = live_handle(handle);
    if (!h)
        err = fail(ACL_ERROR_RT_INVALID_HANDLE, "aclrtFreePhysical: %p is not a live physical handle", handle);
    else if (h->mapped_at)
        err = fail(ACL_ERROR_RT_MEMORY_FREE, "aclrtFreePhysical: %p is still mapped at 0x%lx", handle,
                   (unsigned long)h->mapped_at);
    else {
        struct handle **link = &handles;
        while (*link != h)
            link = &(*link)->next;
        *link = h->next;
        close(h->fd);
        free(h);
    }
    pthread_mutex_unlock(&lock);
    return err;
}

static aclError map_locked(uintptr_t base, size_t size, size_t offset, aclrtDrvMemHandle handle)
{
    struct handle *h = live_handle(handle);
    if (!h)
        return fail(ACL_ERROR_RT_INVALID_HANDLE, "aclrtMapMem: %p is not a live physical handle", handle);
    if (!reservation_holding(base, size))
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMapMem: 0x%lx+%zu is not inside one reservation",
                    (unsigned long)base, size);
    if (offset + size > h->size)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMapMem: offset %zu + size %zu passes the handle's %zu bytes",
                    offset, size, h->size);
    if (any_mapping_overlaps(base, size))
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMapMem: 0x%lx+%zu overlaps memory that is already mapped",
                    (unsigned long)base, size);
    if (h->mapped_at)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMapMem: handle %p is already mapped at 0x%lx", handle,
                    (unsigned long)h->mapped_at);
    struct mapping *m = malloc(sizeof *m);
    if (!m)
        return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMapMem: out of host memory");
    void *got = mmap((void *)base, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, h->fd, (off_t)offset);
    if (got == MAP_FAILED) {
        free(m);
        return fail(ACL_ERROR_RT_INTERNAL_ERROR, "aclrtMapMem: %s", strerror(errno));
    }
    m->base = base;
    m->size = size;
    m->handle = h;
    m->next = mappings;
    mappings = m;
    h->mapped_at = base;
    return ACL_SUCCESS;
}

aclError aclrtMapMem(void *virPtr, size_t size, size_t offset, aclrtDrvMemHandle handle, uint64_t flags)
{
    NEED_CONTEXT("aclrtMapMem");
    if (!virPtr || !handle)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMapMem: virPtr or handle is NULL");
    if (flags)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMapMem: flags must be 0");
    if (!aligned((uintptr_t)virPtr) || !aligned(offset))
        return fail(ACL_ERROR_RT_ADDR_UNALIGNED, "aclrtMapMem: address %p or offset %zu is not a multiple of %zu",
                    virPtr, offset, GRANULE);
    if (!size || !aligned(size))
        return fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtMapMem: size %zu is not a positive multiple of %zu",
                    size, GRANULE);
    pthread_mutex_lock(&lock);
    aclError err = map_locked((uintptr_t)virPtr, size, offset, handle);
    pthread_mutex_unlock(&lock);
    return err;
}

/* No device work runs here, so there is nothing to wait for; the call is logged so tests see its order. */
aclError aclrtSynchronizeDevice(void)
{
    NEED_CONTEXT("aclrtSynchronizeDevice");
    pthread_mutex_lock(&lock);
    log_call("aclrtSynchronizeDevice");
    pthread_mutex_unlock(&lock);
    return ACL_SUCCESS;
}

aclError aclrtUnmapMem(void *virPtr)
{
    NEED_CONTEXT("aclrtUnmapMem");
    uintptr_t base = (uintptr_t)virPtr;
    aclError err = ACL_SUCCESS;
    pthread_mutex_lock(&lock);
    log_call("aclrtUnmapMem");
    struct mapping **link = &mappings;
    while (*link && (*link)->base != base)
        link = &(*link)->next;
    struct mapping *m = *link;
    if (!m)
        err = fail(ACL_ERROR_RT_PARAM_INVALID, "aclrtUnmapMem: nothing is mapped at %p", virPtr);
    else if (reserve_again(base, m->size) != 0)
        err = fail(ACL_ERROR_RT_INTERNAL_ERROR, "aclrtUnmapMem: %s", strerror(errno));
    else {
        *link = m->next;
        m->handle->mapped_at = 0;
        free(m);
    }
    pthread_mutex_unlock(&lock);
    return err;
}
