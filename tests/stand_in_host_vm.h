/* Host virtual memory shared by the stand-in device libraries (tests/ascend_shim/acl_shim.c and
 * tests/cuda_stand_in/libcuda_stand_in.c): granule-aligned PROT_NONE reservations kept in a list, and
 * physical chunks as memfds. Each stand-in includes it once; what a device API calls its errors stays
 * in the stand-in.
 */
#ifndef EXPERTWEAVE_STAND_IN_HOST_VM_H
#define EXPERTWEAVE_STAND_IN_HOST_VM_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define GRANULE ((size_t)2 << 20)

struct reservation {
    uintptr_t base;
    size_t size;
    struct reservation *next;
};

/* The device APIs drop the GIL around each call, so Python threads can reach the lists at once. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct reservation *reservations;

static int aligned(size_t value) { return value % GRANULE == 0; }

/* The order of the calls that matter for device safety (synchronize, unmap, free), as one line of names
 * separated by spaces, so a test can check that memory is released only after the device was synchronized. */
static char call_log[1 << 16];

static void log_call(const char *name)
{
    size_t used = strlen(call_log), length = strlen(name);
    if (used + length + 2 < sizeof call_log) {
        memcpy(call_log + used, name, length);
        call_log[used + length] = ' ';
        call_log[used + length + 1] = '\0';
    }
}

__attribute__((visibility("default"))) const char *expertweave_stand_in_calls(void) { return call_log; }

__attribute__((visibility("default"))) void expertweave_stand_in_clear_calls(void) { call_log[0] = '\0'; }

static struct reservation *reservation_holding(uintptr_t base, size_t size)
{
    for (struct reservation *r = reservations; r; r = r->next)
        if (r->base <= base && base + size <= r->base + r->size)
            return r;
    return NULL;
}

/* Reserves size bytes (a granule multiple) starting on a granule boundary; 0 with errno set on failure. */
static uintptr_t reserve_range(size_t size)
{
    struct reservation *r = malloc(sizeof *r);
    if (!r) {
        errno = ENOMEM;
        return 0;
    }
    /* One granule more than asked, so the range can start on a granule boundary. */
    char *raw = mmap(NULL, size + GRANULE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) {
        free(r);
        return 0;
    }
    uintptr_t start = ((uintptr_t)raw + GRANULE - 1) / GRANULE * GRANULE;
    size_t head = start - (uintptr_t)raw;
    if (head)
        munmap(raw, head);
    munmap((void *)(start + size), GRANULE - head);
    r->base = start;
    r->size = size;
    pthread_mutex_lock(&lock);
    r->next = reservations;
    reservations = r;
    pthread_mutex_unlock(&lock);
    return start;
}

/* The link pointing at the reservation that starts at base (*link is NULL if there is none); under lock. */
static struct reservation **reservation_link(uintptr_t base)
{
    struct reservation **link = &reservations;
    while (*link && (*link)->base != base)
        link = &(*link)->next;
    return link;
}

/* Unmaps and forgets the reservation *link points at; under lock. */
static void release_reservation(struct reservation **link)
{
    struct reservation *r = *link;
    *link = r->next;
    munmap((void *)r->base, r->size);
    free(r);
}

/* Puts an inaccessible reservation back over [base, base + size), as unmapping a device range does. */
static int reserve_again(uintptr_t base, size_t size)
{
    return mmap((void *)base, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0)
                   == MAP_FAILED ? -1 : 0;
}

/* A memfd of size bytes, the physical memory of one handle; -1 with errno set on failure. */
static int new_memfd(const char *name, size_t size)
{
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd >= 0 && ftruncate(fd, (off_t)size) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

#endif
