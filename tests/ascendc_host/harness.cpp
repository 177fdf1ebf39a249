// The launcher, for kernels compiled against the host functional model (kernel_operator.h here): runs a
// kernel once per block index, as blockDim AIV cores would, and returns a model violation as an error
// string instead of a crash. Built with the kernel sources into one shared library that
// tests/test_ascendc_kernels.py drives through ctypes.
#include <cstdio>
#include <string>

#include "kernel_operator.h"
#include "reroute_tiling.h"

extern "C" __global__ __aicore__ void reroute_kernel(GM_ADDR topk, GM_ADDR tokenAdapter, GM_ADDR table, GM_ADDR out,
                                                     uint32_t numTokens, uint32_t topK, uint32_t tableRows,
                                                     uint32_t numExperts, uint32_t tileTokens);
extern "C" __global__ __aicore__ void probe_copy_ids(GM_ADDR ids, uint32_t count);
extern "C" __global__ __aicore__ void probe_reserve_ub(uint32_t bytes);
extern "C" __global__ __aicore__ void probe_gather(uint32_t count, uint32_t sourceElements);

namespace {

int Report(const std::string& message, char* error, size_t errorSize)
{
    std::snprintf(error, errorSize, "%s", message.c_str());
    return 1;
}

GM_ADDR Gm(const void* p) { return reinterpret_cast<GM_ADDR>(const_cast<void*>(p)); }

}  // namespace

extern "C" int ew_plan_reroute(uint64_t numTokens, uint64_t topK, uint64_t rows, uint64_t experts,
                               uint64_t vectorCores, uint32_t* tileTokens, uint32_t* blockDim, char* error,
                               size_t errorSize)
{
    expertweave::ReroutePlan plan;
    const std::string problem = expertweave::PlanReroute(numTokens, topK, rows, experts, vectorCores, &plan);
    if (!problem.empty()) {
        return Report(problem, error, errorSize);
    }
    *tileTokens = plan.tileTokens;
    *blockDim = plan.blockDim;
    return 0;
}

extern "C" uint64_t ew_reroute_ub_bytes(uint64_t tileTokens, uint64_t topK, uint64_t tableEntries)
{
    return expertweave::RerouteUbBytes(tileTokens, topK, tableEntries);
}

extern "C" uint64_t ew_max_table_entries(uint64_t topK) { return expertweave::MaxTableEntries(topK); }

// gmBytes receives {read, written}.
extern "C" int ew_run_reroute(const int32_t* topk, const int32_t* tokenAdapter, const int32_t* table, int32_t* out,
                              uint32_t numTokens, uint32_t topK, uint32_t tableRows, uint32_t numExperts,
                              uint32_t tileTokens, uint32_t blockDim, uint64_t* gmBytes, char* error,
                              size_t errorSize)
{
    try {
        ascendc_host::ResetDevice();
        const uint64_t ids = uint64_t(numTokens) * topK * sizeof(int32_t);
        ascendc_host::RegisterGm(topk, ids);
        ascendc_host::RegisterGm(tokenAdapter, uint64_t(numTokens) * sizeof(int32_t));
        ascendc_host::RegisterGm(table, uint64_t(tableRows) * numExperts * sizeof(int32_t));
        ascendc_host::RegisterGm(out, ids);
        for (uint32_t core = 0; core < blockDim; ++core) {
            ascendc_host::RunCore(core, blockDim, [&] {
                reroute_kernel(Gm(topk), Gm(tokenAdapter), Gm(table), Gm(out), numTokens, topK, tableRows, numExperts,
                               tileTokens);
            });
        }
        gmBytes[0] = ascendc_host::device().gmBytesRead;
        gmBytes[1] = ascendc_host::device().gmBytesWritten;
        return 0;
    } catch (const ascendc_host::Violation& violation) {
        return Report(violation.what(), error, errorSize);
    }
}

extern "C" int ew_probe_copy_ids(const int32_t* ids, uint32_t count, char* error, size_t errorSize)
{
    try {
        ascendc_host::ResetDevice();
        ascendc_host::RegisterGm(ids, uint64_t(count) * sizeof(int32_t));
        ascendc_host::RunCore(0, 1, [&] { probe_copy_ids(Gm(ids), count); });
        return 0;
    } catch (const ascendc_host::Violation& violation) {
        return Report(violation.what(), error, errorSize);
    }
}

extern "C" int ew_probe_gather(uint32_t count, uint32_t sourceElements, char* error, size_t errorSize)
{
    try {
        ascendc_host::ResetDevice();
        ascendc_host::RunCore(0, 1, [&] { probe_gather(count, sourceElements); });
        return 0;
    } catch (const ascendc_host::Violation& violation) {
        return Report(violation.what(), error, errorSize);
    }
}

extern "C" int ew_probe_reserve_ub(uint32_t bytes, char* error, size_t errorSize)
{
    try {
        ascendc_host::ResetDevice();
        ascendc_host::RunCore(0, 1, [&] { probe_reserve_ub(bytes); });
        return 0;
    } catch (const ascendc_host::Violation& violation) {
        return Report(violation.what(), error, errorSize);
    }
}
