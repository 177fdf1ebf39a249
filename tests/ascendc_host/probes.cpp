// Two deliberately plain kernels that break, or just keep, one hardware rule each, so the tests can show
// the host model enforces the rule rather than assume it.
#include "kernel_operator.h"

// Copies count ids GM -> UB with a plain DataCopy, the mistake of copying a ragged tail without
// DataCopyPad: fine for a multiple of 8 ids (whole 32-byte blocks), wrong otherwise.
extern "C" __global__ __aicore__ void probe_copy_ids(GM_ADDR ids, uint32_t count)
{
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
    AscendC::TPipe pipe;
    AscendC::TQue<AscendC::TPosition::VECIN, 1> queue;
    AscendC::GlobalTensor<int32_t> idsGm;
    idsGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(ids), count);
    pipe.InitBuffer(queue, 1, count * sizeof(int32_t));
    AscendC::LocalTensor<int32_t> local = queue.AllocTensor<int32_t>();
    AscendC::DataCopy(local, idsGm, count);
    queue.EnQue(local);
    local = queue.DeQue<int32_t>();
    queue.FreeTensor(local);
}

// Reserves bytes of UB as one scratch buffer.
extern "C" __global__ __aicore__ void probe_reserve_ub(uint32_t bytes)
{
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
    AscendC::TPipe pipe;
    AscendC::TBuf<AscendC::TPosition::VECCALC> scratch;
    pipe.InitBuffer(scratch, bytes);
}

// Gathers count elements out of a source of sourceElements elements (every offset 0): CANN's Gather takes
// at most as many elements as its source holds.
extern "C" __global__ __aicore__ void probe_gather(uint32_t count, uint32_t sourceElements)
{
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
    AscendC::TPipe pipe;
    AscendC::TBuf<AscendC::TPosition::VECCALC> source, gathered, offsets;
    pipe.InitBuffer(source, sourceElements * sizeof(int32_t));
    pipe.InitBuffer(gathered, count * sizeof(int32_t));
    pipe.InitBuffer(offsets, count * sizeof(int32_t));
    AscendC::LocalTensor<int32_t> zero = offsets.Get<int32_t>();
    AscendC::Muls(zero, zero, 0, static_cast<int32_t>(count));
    AscendC::Gather(gathered.Get<int32_t>(), source.Get<int32_t>(), zero.ReinterpretCast<uint32_t>(), 0, count);
}
