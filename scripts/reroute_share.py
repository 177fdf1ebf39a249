"""Reroute's share of one MoE layer's time on an Ascend NPU.

Times torch.ops.expertweave.reroute, with the Ascend C kernel loaded as the engine loads it, against
one routed-expert MoE layer built from the torch_npu operators vllm-ascend 0.23 runs without expert
parallelism (top-k gating, init routing, grouped matmul, SwiGLU, grouped matmul, unpermute), over an
expert tensor of M base + S adapter slots. Tokens are spread round robin over the base and the adapter
rows. Default shapes: DeepSeek-V2-Lite (hidden 2048, expert intermediate 1408, 64 experts, top-6), bf16.
The share is reroute / (MoE layer + reroute), per token count.

Needs torch_npu, an NPU and the built kernels library (ascendc_kernels/README.md). Every torch_npu
name used here is listed in tests/vllm_ascend_facts.py TORCH_NPU_OPS and checked against the pinned torch-npu.
"""

import argparse
import json
import sys
import time

import torch

from expertweave_ascend.integrations.ascend.kernels import load_kernels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reroute_share.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096], help="tokens per layer call")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=1408, help="one expert's intermediate size")
    p.add_argument("--experts", type=int, default=64, help="base experts M")
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--adapters", type=int, default=4, help="adapter rows in the table")
    p.add_argument("--tuned", type=int, default=8, help="experts each adapter tuned in this layer")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size: the expert's intermediate is split")
    p.add_argument("--device", type=int, default=0, help="NPU index (after ASCEND_RT_VISIBLE_DEVICES)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.tuned > args.experts or args.intermediate % args.tp:
        p.error("--tuned must be at most --experts, and --tp must divide --intermediate")
    return args


def timed(fn, iters: int, warmup: int) -> float:
    """Seconds per call, the NPU synchronised around the timed loop."""
    import torch_npu

    for _ in range(warmup):
        fn()
    torch_npu.npu.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch_npu.npu.synchronize()
    return (time.perf_counter() - start) / iters


def routing_table(experts: int, adapters: int, tuned: int, device: torch.device) -> torch.Tensor:
    """Row 0 the base; adapter a's tuned experts (a random choice) in its own run of slots above M."""
    generator = torch.Generator().manual_seed(0)
    table = torch.arange(experts, dtype=torch.int32).repeat(adapters + 1, 1)
    for a in range(1, adapters + 1):
        chosen = torch.randperm(experts, generator=generator)[:tuned]
        table[a, chosen] = experts + (a - 1) * tuned + torch.arange(tuned, dtype=torch.int32)
    return table.to(device)


def moe_layer(x, logits, w13, w2, top_k: int):
    """Routed experts of one layer as vllm-ascend's AllGather path computes them."""
    import torch_npu

    weights, ids, _ = torch_npu.npu_moe_gating_top_k_softmax(logits, k=top_k)
    slots = w13.shape[0]
    expanded, row_idx, counts, _ = torch_npu.npu_moe_init_routing_v2(
        x, ids, active_num=x.shape[0] * top_k, expert_num=slots, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, active_expert_range=[0, slots])
    hidden = torch_npu.npu_grouped_matmul(x=[expanded], weight=[w13], group_list=counts, split_item=2, group_type=0,
                                          group_list_type=1)[0]
    hidden = torch_npu.npu_swiglu(hidden)
    hidden = torch_npu.npu_grouped_matmul(x=[hidden], weight=[w2], group_list=counts, split_item=2, group_type=0,
                                          group_list_type=1)[0]
    return torch_npu.npu_moe_token_unpermute(permuted_tokens=hidden, sorted_indices=row_idx,
                                             probs=weights.to(x.dtype))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch_npu

    from expertweave_ascend.routing import reroute

    load_kernels()
    device = torch.device("npu", args.device)
    torch_npu.npu.set_device(device)
    inter = args.intermediate // args.tp
    slots = args.experts + args.adapters * args.tuned
    w13 = (torch.randn(slots, args.hidden, 2 * inter, dtype=torch.bfloat16) * 0.02).to(device)
    w2 = (torch.randn(slots, inter, args.hidden, dtype=torch.bfloat16) * 0.02).to(device)
    table = routing_table(args.experts, args.adapters, args.tuned, device)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, dtype=torch.bfloat16).to(device)
        logits = torch.randn(tokens, args.experts, dtype=torch.float32).to(device)
        token_adapter = (torch.arange(tokens, dtype=torch.int32) % (args.adapters + 1)).to(device)
        _, ids, _ = torch_npu.npu_moe_gating_top_k_softmax(logits, k=args.top_k)
        layer_s = timed(lambda: moe_layer(x, logits, w13, w2, args.top_k), args.iters, args.warmup)
        reroute_s = timed(lambda: reroute(ids, token_adapter, table), args.iters, args.warmup)
        rows.append({"tokens": tokens, "moe_layer_us": layer_s * 1e6, "reroute_us": reroute_s * 1e6,
                     "share": reroute_s / (layer_s + reroute_s)})
    report = {"device": torch_npu.npu.get_device_name(args.device), "hidden": args.hidden,
              "intermediate_per_rank": inter, "experts": args.experts, "slots": slots, "top_k": args.top_k,
              "adapters": args.adapters, "rows": rows}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['device']}: MoE layer of {slots} slots ({args.experts} base), hidden {args.hidden}, "
          f"expert intermediate {inter} per rank, top-{args.top_k}, {args.adapters} adapters")
    print(f"{'tokens':>8} {'MoE layer us':>13} {'reroute us':>11} {'share':>7}")
    for row in rows:
        print(f"{row['tokens']:>8} {row['moe_layer_us']:>13.1f} {row['reroute_us']:>11.1f} {row['share']:>7.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
