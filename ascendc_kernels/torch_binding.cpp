// NPU (PrivateUse1) kernel of expertweave::reroute, whose schema expertweave_ascend/routing/reroute.py
// defines: checks the arguments, plans the launch (reroute_tiling.h) and queues reroute_kernel on the
// current NPU stream through torch_npu's OpCommand, as vllm-ascend queues its own Ascend C kernels, so
// it runs in stream order with every other NPU op. Loading this library registers the kernel.
#include <cstdint>
#include <string>

#include <ATen/ATen.h>
#include <acl/acl.h>
#include <torch/library.h>
#include <torch_npu/csrc/core/npu/NPUStream.h>
#include <torch_npu/csrc/framework/OpCommand.h>

#include "aclrtlaunch_reroute_kernel.h"
#include "reroute_tiling.h"

namespace expertweave {
namespace {

// All devices of a server are the same SoC, so the first device asked answers for every one.
uint32_t VectorCoreCount(int32_t device)
{
    static const uint32_t count = [device] {
        int64_t cores = 0;
        const aclError status = aclGetDeviceCapability(static_cast<uint32_t>(device), ACL_DEVICE_INFO_VECTOR_CORE_NUM,
                                                       &cores);
        TORCH_CHECK(status == ACL_SUCCESS && cores > 0, "reroute: aclGetDeviceCapability(vector cores) failed with ",
                    status);
        return static_cast<uint32_t>(cores);
    }();
    return count;
}

at::Tensor RerouteNpu(const at::Tensor& topkIds, const at::Tensor& tokenAdapter, const at::Tensor& table)
{
    TORCH_CHECK(topkIds.dim() == 2 && tokenAdapter.dim() == 1 && table.dim() == 2,
                "reroute: expects topk_ids [T, k], token_adapter [T], table [rows, M]");
    TORCH_CHECK_VALUE(tokenAdapter.size(0) == topkIds.size(0), "reroute: ", tokenAdapter.size(0),
                      " adapter rows for ", topkIds.size(0), " tokens");
    TORCH_CHECK(topkIds.scalar_type() == at::kInt && tokenAdapter.scalar_type() == at::kInt &&
                    table.scalar_type() == at::kInt,
                "reroute on NPU takes int32 topk_ids, token_adapter and table, got ", topkIds.scalar_type(), ", ",
                tokenAdapter.scalar_type(), ", ", table.scalar_type());
    TORCH_CHECK(tokenAdapter.device() == topkIds.device() && table.device() == topkIds.device(),
                "reroute: topk_ids, token_adapter and table must be on one NPU");

    const at::Tensor ids = topkIds.contiguous();
    const at::Tensor rows = tokenAdapter.contiguous();
    const at::Tensor slots = table.contiguous();
    at::Tensor out = at::empty_like(ids);
    if (ids.numel() == 0) {
        return out;
    }
    ReroutePlan plan;
    const std::string problem = PlanReroute(ids.size(0), ids.size(1), slots.size(0), slots.size(1),
                                            VectorCoreCount(ids.device().index()), &plan);
    TORCH_CHECK(problem.empty(), "reroute on NPU: ", problem);

    const auto numTokens = static_cast<uint32_t>(ids.size(0));
    const auto topK = static_cast<uint32_t>(ids.size(1));
    const auto tableRows = static_cast<uint32_t>(slots.size(0));
    const auto numExperts = static_cast<uint32_t>(slots.size(1));
    aclrtStream stream = c10_npu::getCurrentNPUStream().stream();
    at_npu::native::OpCommand cmd;
    cmd.Name("expertweave_reroute");
    // The handler runs later, from torch_npu's task queue; holding the tensors keeps their memory ours
    // until the launch is on the stream, after which the caching allocator reuses it in stream order.
    cmd.SetCustomHandler([ids, rows, slots, out, plan, stream, numTokens, topK, tableRows, numExperts]() -> int {
        return static_cast<int>(ACLRT_LAUNCH_KERNEL(reroute_kernel)(
            plan.blockDim, stream, ids.data_ptr(), rows.data_ptr(), slots.data_ptr(), out.data_ptr(), numTokens,
            topK, tableRows, numExperts, plan.tileTokens));
    });
    cmd.Run();
    return out;
}

}  // namespace
}  // namespace expertweave

TORCH_LIBRARY_IMPL(expertweave, PrivateUse1, m) { m.impl("reroute", &expertweave::RerouteNpu); }
