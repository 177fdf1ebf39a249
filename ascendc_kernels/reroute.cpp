// expertweave::reroute on the AIV vector cores: out[t, j] = table[adapter[t], topk[t, j]], int32 ids.
//
// The table is one MoE layer's [rows, M] slice, a few KiB to tens of KiB, so each core stages all of it
// in its unified buffer once and every lookup is a UB Gather rather than a scattered GM read. Token
// blocks of tileTokens are dealt round-robin to the cores; per block the core copies the block's ids
// and adapter rows in, turns them into byte offsets into the staged table, gathers, and copies out.
// GM sees each id read and its slot written once, each adapter row read once, the table once a core.
//
// The host side (reroute_tiling.h) picks tileTokens, a multiple of 8 so full blocks copy in whole
// 32-byte units, and checks the table fits; RerouteUbBytes there mirrors the InitBuffer calls below.
// Dependent vector instructions rely on the PIPE_V synchronisation the compiler inserts by default.
#include "kernel_operator.h"

namespace {

constexpr int32_t kBufferNum = 2;  // block b + 1 copies in while block b computes
constexpr uint32_t kIdBytes = sizeof(int32_t);
constexpr uint32_t kBlockBytes = 32;

// DataCopy moves whole 32-byte blocks only; the last block of a launch and the table need not be.
__aicore__ inline void CopyIn(const AscendC::LocalTensor<int32_t>& dst, const AscendC::GlobalTensor<int32_t>& src,
                              uint32_t count)
{
    if (count * kIdBytes % kBlockBytes == 0) {
        AscendC::DataCopy(dst, src, count);
    } else {
        AscendC::DataCopyExtParams params(1, count * kIdBytes, 0, 0, 0);
        AscendC::DataCopyPadExtParams<int32_t> padding(false, 0, 0, 0);
        AscendC::DataCopyPad(dst, src, params, padding);
    }
}

__aicore__ inline void CopyOut(const AscendC::GlobalTensor<int32_t>& dst, const AscendC::LocalTensor<int32_t>& src,
                               uint32_t count)
{
    if (count * kIdBytes % kBlockBytes == 0) {
        AscendC::DataCopy(dst, src, count);
    } else {
        AscendC::DataCopyExtParams params(1, count * kIdBytes, 0, 0, 0);
        AscendC::DataCopyPad(dst, src, params);
    }
}

class Reroute {
public:
    __aicore__ inline Reroute() {}

    __aicore__ inline void Init(AscendC::TPipe* pipe, GM_ADDR topk, GM_ADDR tokenAdapter, GM_ADDR table, GM_ADDR out,
                                uint32_t numTokens, uint32_t topK, uint32_t tableRows, uint32_t numExperts,
                                uint32_t tileTokens)
    {
        numTokens_ = numTokens;
        topK_ = topK;
        numExperts_ = numExperts;
        tableEntries_ = tableRows * numExperts;
        tileTokens_ = tileTokens;
        topkGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(topk), uint64_t(numTokens) * topK);
        adapterGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(tokenAdapter), numTokens);
        tableGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(table), tableEntries_);
        outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(out), uint64_t(numTokens) * topK);

        // Gather reads at most as many elements as its source tensor holds (CANN's rule), and both Gathers
        // produce a tile of ids: the rows and the staged table are sized for at least that many.
        const uint32_t tileIds = tileTokens * topK;
        const uint32_t tileIdBytes = tileIds * kIdBytes;
        pipe->InitBuffer(tableQueue_, 1, (tableEntries_ > tileIds ? tableEntries_ : tileIds) * kIdBytes);
        pipe->InitBuffer(idsQueue_, kBufferNum, tileIdBytes);
        pipe->InitBuffer(rowsQueue_, kBufferNum, tileIdBytes);
        pipe->InitBuffer(outQueue_, kBufferNum, tileIdBytes);
        pipe->InitBuffer(expansionBuf_, tileIdBytes);
        pipe->InitBuffer(offsetsBuf_, tileIdBytes);

        AscendC::LocalTensor<int32_t> staged = tableQueue_.AllocTensor<int32_t>();
        CopyIn(staged, tableGm_, tableEntries_);
        tableQueue_.EnQue(staged);
        table_ = tableQueue_.DeQue<int32_t>();
        BuildExpansion();
    }

    __aicore__ inline void Process()
    {
        const uint32_t blocks = (numTokens_ + tileTokens_ - 1) / tileTokens_;
        const uint32_t cores = static_cast<uint32_t>(AscendC::GetBlockNum());
        for (uint32_t block = static_cast<uint32_t>(AscendC::GetBlockIdx()); block < blocks; block += cores) {
            const uint32_t first = block * tileTokens_;
            const uint32_t tokens = numTokens_ - first < tileTokens_ ? numTokens_ - first : tileTokens_;
            LoadBlock(first, tokens);
            Lookup(tokens);
            StoreBlock(first, tokens);
        }
        tableQueue_.FreeTensor(table_);
    }

private:
    // Ids are token-major, k to a token, so id i takes the adapter row of token i / k. Gather does that
    // spreading given byte offsets 4 * floor(i / k), built once here. There is no vector integer
    // division: floor((i + 0.5) / k) in float is exact, because (i + 0.5) / k lies at least 0.5 / k from
    // any integer while the two float roundings move it by under (i + 0.5) / k * 2^-23, which is smaller
    // for every i below 2^22; a tile holds at most a few thousand ids.
    __aicore__ inline void BuildExpansion()
    {
        const uint32_t tileIds = tileTokens_ * topK_;
        AscendC::LocalTensor<float> position = offsetsBuf_.Get<float>();
        AscendC::LocalTensor<int32_t> expansion = expansionBuf_.Get<int32_t>();
        AscendC::CreateVecIndex(position, 0.5f, tileIds);
        AscendC::Muls(position, position, 1.0f / static_cast<float>(topK_), tileIds);
        AscendC::Cast(expansion, position, AscendC::RoundMode::CAST_FLOOR, tileIds);
        AscendC::Muls(expansion, expansion, static_cast<int32_t>(kIdBytes), tileIds);
        expansion_ = expansion.ReinterpretCast<uint32_t>();
    }

    __aicore__ inline void LoadBlock(uint32_t first, uint32_t tokens)
    {
        AscendC::LocalTensor<int32_t> ids = idsQueue_.AllocTensor<int32_t>();
        AscendC::LocalTensor<int32_t> rows = rowsQueue_.AllocTensor<int32_t>();
        CopyIn(ids, topkGm_[uint64_t(first) * topK_], tokens * topK_);
        CopyIn(rows, adapterGm_[first], tokens);
        idsQueue_.EnQue(ids);
        rowsQueue_.EnQue(rows);
    }

    __aicore__ inline void Lookup(uint32_t tokens)
    {
        AscendC::LocalTensor<int32_t> ids = idsQueue_.DeQue<int32_t>();
        AscendC::LocalTensor<int32_t> rows = rowsQueue_.DeQue<int32_t>();
        AscendC::LocalTensor<int32_t> slots = outQueue_.AllocTensor<int32_t>();
        AscendC::LocalTensor<int32_t> offsets = offsetsBuf_.Get<int32_t>();
        const int32_t count = static_cast<int32_t>(tokens * topK_);

        // Byte offset of table[row, id] is 4 * row * M + 4 * id. Scaling the rows before spreading them
        // costs k times fewer lanes than scaling after.
        AscendC::Muls(rows, rows, static_cast<int32_t>(numExperts_ * kIdBytes), static_cast<int32_t>(tokens));
        AscendC::Gather(offsets, rows, expansion_, 0, static_cast<uint32_t>(count));
        AscendC::Muls(ids, ids, static_cast<int32_t>(kIdBytes), count);
        AscendC::Add(offsets, offsets, ids, count);
        // A bad id or row would send Gather outside the staged table, into stale UB or past its end. Clamped,
        // it gets some slot of the table instead (the torch op raises IndexError; a kernel cannot).
        AscendC::Maxs(offsets, offsets, 0, count);
        AscendC::Mins(offsets, offsets, static_cast<int32_t>((tableEntries_ - 1) * kIdBytes), count);
        AscendC::Gather(slots, table_, offsets.ReinterpretCast<uint32_t>(), 0, static_cast<uint32_t>(count));

        outQueue_.EnQue(slots);
        idsQueue_.FreeTensor(ids);
        rowsQueue_.FreeTensor(rows);
    }

    __aicore__ inline void StoreBlock(uint32_t first, uint32_t tokens)
    {
        AscendC::LocalTensor<int32_t> slots = outQueue_.DeQue<int32_t>();
        CopyOut(outGm_[uint64_t(first) * topK_], slots, tokens * topK_);
        outQueue_.FreeTensor(slots);
    }

    AscendC::TQue<AscendC::TPosition::VECIN, 1> tableQueue_;
    AscendC::TQue<AscendC::TPosition::VECIN, 1> idsQueue_;
    AscendC::TQue<AscendC::TPosition::VECIN, 1> rowsQueue_;
    AscendC::TQue<AscendC::TPosition::VECOUT, 1> outQueue_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> expansionBuf_;
    AscendC::TBuf<AscendC::TPosition::VECCALC> offsetsBuf_;
    AscendC::GlobalTensor<int32_t> topkGm_;
    AscendC::GlobalTensor<int32_t> adapterGm_;
    AscendC::GlobalTensor<int32_t> tableGm_;
    AscendC::GlobalTensor<int32_t> outGm_;
    AscendC::LocalTensor<int32_t> table_;
    AscendC::LocalTensor<uint32_t> expansion_;
    uint32_t numTokens_ = 0;
    uint32_t topK_ = 0;
    uint32_t numExperts_ = 0;
    uint32_t tableEntries_ = 0;
    uint32_t tileTokens_ = 0;
};

}  // namespace

// topk, out: [numTokens, topK] int32; tokenAdapter: [numTokens] int32; table: [tableRows, numExperts] int32.
// One block index per AIV core; a core with no block (more cores than blocks) returns before touching UB.
extern "C" __global__ __aicore__ void reroute_kernel(GM_ADDR topk, GM_ADDR tokenAdapter, GM_ADDR table, GM_ADDR out,
                                                     uint32_t numTokens, uint32_t topK, uint32_t tableRows,
                                                     uint32_t numExperts, uint32_t tileTokens)
{
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
    if (AscendC::GetBlockIdx() * tileTokens >= numTokens) {
        return;
    }
    AscendC::TPipe pipe;
    Reroute op;
    op.Init(&pipe, topk, tokenAdapter, table, out, numTokens, topK, tableRows, numExperts, tileTokens);
    op.Process();
}
