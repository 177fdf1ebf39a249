// Host-side launch plan for reroute_kernel (reroute.cpp): tile size, number of cores, and the check
// that one layer's table fits the unified buffer. Shared by the torch binding and the host-model tests,
// so the tests exercise the plan the NPU gets.
#ifndef EXPERTWEAVE_ASCENDC_REROUTE_TILING_H
#define EXPERTWEAVE_ASCENDC_REROUTE_TILING_H

#include <cstdint>
#include <string>

namespace expertweave {

// Unified buffer of one AIV core on dav-c220 (ascend910b*, ascend910_93*): CANN's TOTAL_UB_SIZE.
constexpr uint64_t kUbBytes = 192 * 1024;
constexpr uint64_t kUbBlockBytes = 32;
// int32 tokens per 32-byte block: tiles of a multiple of this keep every full tile's copies aligned.
constexpr uint64_t kTokenQuantum = 8;
// Past a few thousand ids a tile no longer shortens the launch, and smaller tiles leave UB to the table.
constexpr uint64_t kMaxTileIds = 4096;

struct ReroutePlan {
    uint32_t tileTokens = 0;
    uint32_t blockDim = 0;
};

inline uint64_t AlignUpBlock(uint64_t bytes) { return (bytes + kUbBlockBytes - 1) / kUbBlockBytes * kUbBlockBytes; }

inline uint64_t RoundUpQuantum(uint64_t tokens) { return (tokens + kTokenQuantum - 1) / kTokenQuantum * kTokenQuantum; }

// UB bytes reroute_kernel allocates, one term per InitBuffer call in reroute.cpp, in order: the staged
// table (at least a tile of ids long, as Gather requires of its source); two buffers each of top-k ids,
// adapter rows (a tile of ids long, for the same reason) and output; the expansion offsets; the offsets.
inline uint64_t RerouteUbBytes(uint64_t tileTokens, uint64_t topK, uint64_t tableEntries)
{
    const uint64_t tileIds = tileTokens * topK;
    const uint64_t ids = AlignUpBlock(tileIds * 4);
    return AlignUpBlock((tableEntries > tileIds ? tableEntries : tileIds) * 4) + 2 * ids + 2 * ids + 2 * ids + ids + ids;
}

// Largest table (entries = rows * experts) that fits beside the smallest tile.
inline uint64_t MaxTableEntries(uint64_t topK)
{
    const uint64_t tileBytes = RerouteUbBytes(kTokenQuantum, topK, 0) - AlignUpBlock(kTokenQuantum * topK * 4);
    return tileBytes >= kUbBytes ? 0 : (kUbBytes - tileBytes) / 4;
}

// Fills plan and returns "", or returns why the call cannot run. numTokens == 0 gives blockDim 0.
inline std::string PlanReroute(uint64_t numTokens, uint64_t topK, uint64_t rows, uint64_t experts,
                               uint64_t vectorCores, ReroutePlan* plan)
{
    if (topK == 0 || rows == 0 || experts == 0 || vectorCores == 0) {
        return "top-k, table rows, experts and vector cores must all be positive";
    }
    if (numTokens * topK > UINT32_MAX) {
        return std::to_string(numTokens) + " tokens x top-" + std::to_string(topK) + " ids exceed 2^32";
    }
    const uint64_t entries = rows * experts;
    if (entries > MaxTableEntries(topK)) {
        return "table [" + std::to_string(rows) + ", " + std::to_string(experts) + "] has " + std::to_string(entries) +
               " entries; with top-" + std::to_string(topK) + " at most " + std::to_string(MaxTableEntries(topK)) +
               " fit the " + std::to_string(kUbBytes) + "-byte unified buffer of a vector core";
    }
    *plan = ReroutePlan{};
    if (numTokens == 0) {
        return "";
    }
    const uint64_t capped = kMaxTileIds / topK / kTokenQuantum * kTokenQuantum;
    // Every core stages the whole table before its first block, so a core given fewer tokens than a
    // table's worth of id traffic (8k + 4 bytes a token) spends most of its time on the table: small
    // batches take fewer, fuller cores instead.
    const uint64_t worthACore = RoundUpQuantum((AlignUpBlock(entries * 4) + 8 * topK + 3) / (8 * topK + 4));
    const uint64_t evenShare = RoundUpQuantum((numTokens + vectorCores - 1) / vectorCores);
    uint64_t tile = evenShare > worthACore ? evenShare : worthACore;
    tile = capped != 0 && capped < tile ? capped : tile;
    // The largest whole-quantum tile that fits beside the table; the smallest always does (checked above).
    while (tile > kTokenQuantum && RerouteUbBytes(tile, topK, entries) > kUbBytes) {
        tile -= kTokenQuantum;
    }
    const uint64_t blocks = (numTokens + tile - 1) / tile;
    plan->tileTokens = static_cast<uint32_t>(tile);
    plan->blockDim = static_cast<uint32_t>(blocks < vectorCores ? blocks : vectorCores);
    return "";
}

}  // namespace expertweave

#endif
