"""`expertweave` command line. Errors users can fix print one line, `error: <file>: <problem>`, exit 2."""

import argparse
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

from .errors import ExpertWeaveError
from .files import directory, os_problem
from .residency import POLICIES


@contextmanager
def _stdout_to_stderr(active: bool):
    """While active, file descriptor 1 is stderr: vLLM's engines (in this process and the ones it starts)
    log to stdout, and a --json command's stdout must be its one JSON document, printed afterwards."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextmanager
def _writing(out: str):
    """A command writing under out: the system refusing a write (a name too long, no space) is one error line."""
    try:
        yield
    except OSError as e:
        raise ExpertWeaveError(f"{e.filename or out}: cannot be written ({os_problem(e)})") from None


# Every flag's value is checked by its type below, so a bad one is argparse's one `error:` line (exit 2).
SIZE = re.compile(r"([0-9]{1,16}(?:\.[0-9]{1,16})?) ?(?:([kmgt])i?)?b?")
SIZE_UNITS = {None: 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
SIZE_LIMIT = 256 * 2**40  # far beyond any host's or device's memory, and an int64 everywhere
SECONDS_LIMIT = 86400.0  # a day: longer than any client waits for an answer
PATH_MAX = 4096  # Linux's, in bytes, counting the terminating NUL


def _shown(text: str) -> str:
    """A value as an error line quotes it: escaped, and an over-long one cut short."""
    return repr(text) if len(text) <= 80 else f"{text[:40]!r}... ({len(text)} characters)"


def _size(least: int):
    """A size flag's type: bytes, or a number with k, m, g or t (powers of 1024: 512m, 12GiB, 1.5GB)."""
    def size(text: str) -> int:
        match = SIZE.fullmatch(text.strip().lower())
        if match:
            value = int(Fraction(match[1]) * SIZE_UNITS[match[2]])
            if least <= value <= SIZE_LIMIT:
                return value
        raise argparse.ArgumentTypeError(f"{_shown(text)}: expected a size from {least} bytes to 256TiB, "
                                         "such as 512MiB or 12GiB")
    return size


def _count(least: int, most: int):
    """A whole-number flag's type: decimal digits, from least to most."""
    def count(text: str) -> int:
        if re.fullmatch(r"[0-9]{1,20}", text) and least <= int(text) <= most:
            return int(text)
        raise argparse.ArgumentTypeError(f"{_shown(text)}: expected a whole number from {least} to {most}")
    return count


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _seconds(text: str) -> float:
    value = _finite(text)
    if value is None or not 0 < value <= SECONDS_LIMIT:
        raise argparse.ArgumentTypeError(f"{_shown(text)}: expected a number of seconds above 0 "
                                         f"and at most {SECONDS_LIMIT:g}")
    return value


def _nonnegative(text: str) -> float:
    value = _finite(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{_shown(text)}: expected a number >= 0")
    return value


def _is_path(text: str) -> bool:
    """Not empty, no NUL, shorter than the system allows a whole path; a single name too long is left to the
    system, whose own words the commands report."""
    raw = os.fsencode(text)
    return bool(raw) and b"\0" not in raw and len(raw) < PATH_MAX


PATH_RULES = f"(not empty, no NUL, under {PATH_MAX} bytes)"


def _path(text: str) -> str:
    if not _is_path(text):
        raise argparse.ArgumentTypeError(f"{_shown(text)}: expected a path {PATH_RULES}")
    return text


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not (sep and name and _is_path(path)):
        raise argparse.ArgumentTypeError(f"{_shown(text)}: expected NAME=PATH, with a path {PATH_RULES}")
    return name, path


CONSOLIDATE_HELP = ("serve an adapter expert whose relative L2 distance to the base's expert (or a loaded "
                    "adapter's, at the same layer and id) is at most X by that expert: saves memory, changes "
                    "outputs (verify reports by how much); default off: outputs equal the merged models")


def _spread(text: str) -> tuple[float, float]:
    parts = [_finite(part) for part in text.split(":")]
    if len(parts) != 2 or None in parts:
        raise argparse.ArgumentTypeError(f"{_shown(text)}: expected LO:HI, two relative sizes such as 0.001:1")
    lo, hi = parts
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"{_shown(text)}: expected 0 < LO <= HI")
    return lo, hi


def _named_paths(pairs: list[tuple[str, str]] | None, adapters_dir: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if adapters_dir:
        out.update({p.name: str(p) for p in directory(Path(adapters_dir)) if os.path.isdir(p)})
    for name, path in pairs or []:
        if name in out:
            raise ExpertWeaveError(f"--adapter {name}={path}: adapter name {name!r} given twice")
        out[name] = path
    return out


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny

    with _writing(args.out):
        paths = make_tiny(args.out, adapters=args.adapters, seed=args.seed, decisive=args.decisive,
                          delta_spread=args.delta_spread)
    print(f"base model: {Path(args.out) / 'base'}")
    for name, path in paths.items():
        print(f"adapter {name}: {path}")
    return 0


def cmd_adapter_inspect(args) -> int:
    from .adapters import EsftAdapter

    adapter = EsftAdapter.open(args.path)
    info = {
        "name": adapter.name,
        "path": str(adapter.path),
        "experts": {str(layer): list(ids) for layer, ids in adapter.experts.items()},
        "num_experts": adapter.num_experts,
        "bytes": adapter.nbytes,
        "dtype": sorted(adapter.dtypes),
        "shared_experts": adapter.shared_experts,
        "non_expert_modules": adapter.non_expert_modules,
        "shared_expert_layers": list(adapter.shared_layers),
        "non_expert_tensors": list(adapter.non_expert_keys),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter {adapter.name} ({adapter.path})")
    print(f"  {adapter.num_experts} experts, {adapter.nbytes / 2**20:.2f} MiB, dtype {', '.join(info['dtype']) or '-'}")
    print(f"  shared_experts={str(adapter.shared_experts).lower()} "
          f"non_expert_modules={str(adapter.non_expert_modules).lower()}")
    for layer, ids in adapter.experts.items():
        print(f"  layer {layer:>3}: {len(ids):>3} experts {list(ids)}")
    if adapter.shared_layers:
        print(f"  shared experts tuned in layers {list(adapter.shared_layers)}")
    if adapter.non_expert_keys:
        print(f"  {len(adapter.non_expert_keys)} non-expert tensors: {', '.join(adapter.non_expert_keys)}")
    return 0


def cmd_adapter_validate(args) -> int:
    from .adapters import validate_adapter
    from .geometry import BaseGeometry

    adapter = validate_adapter(args.path, BaseGeometry.from_checkpoint(args.base))
    layers = sum(1 for ids in adapter.experts.values() if ids)
    print(f"ok {adapter.path}: {adapter.num_experts} experts in {layers} layers, "
          f"{adapter.nbytes / 2**20:.2f} MiB, fits base {args.base}")
    return 0


def cmd_adapter_extract(args) -> int:
    from .adapters import extract_adapter

    with _writing(args.out):
        tuned = extract_adapter(args.base, args.finetuned, args.out, atol=args.atol, name=args.name)
    total = sum(map(len, tuned.values()))
    print(f"wrote {args.out}: adapter {args.name or Path(args.out).name}, {total} tuned experts in {len(tuned)} layers")
    return 0


def cmd_verify(args) -> int:
    from .reports import format_verify

    adapters = _named_paths(args.adapter, args.adapters_dir)
    if not adapters:
        raise ExpertWeaveError("verify: give at least one --adapter NAME=PATH or --adapters-dir DIR")
    if args.engine == "vllm" and args.device != "cpu":
        raise ExpertWeaveError("verify: --device is for --engine hf; vLLM runs on its platform's device")
    with _stdout_to_stderr(args.json):
        report = _verify(args, adapters)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_verify(report))
    return 0 if report.ok or report.consolidated_only else 1


def _verify(args, adapters: dict[str, str]):
    from .verify import DEFAULT_PROMPTS, verify_hf

    if args.engine == "vllm":
        from .integrations.vllm.verify import verify_vllm

        return verify_vllm(args.base, adapters, DEFAULT_PROMPTS, args.max_new_tokens, dtype=args.dtype or "auto",
                           enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                           kv_cache_memory_bytes=args.kv_cache_memory, granularity=args.granularity,
                           consolidate_rel_l2=args.consolidate_rel_l2)
    import torch

    return verify_hf(args.base, adapters, max_new_tokens=args.max_new_tokens,
                     dtype=getattr(torch, args.dtype or "float32"), granularity=args.granularity, device=args.device,
                     consolidate_rel_l2=args.consolidate_rel_l2)


def cmd_memory_plan(args) -> int:
    from .adapters import read_expert_cfg
    from .capacity import PRESETS, model_nbytes_from_config, plan_memory
    from .files import read_json
    from .geometry import BaseGeometry
    from .reports import format_plan

    cfgs = _named_paths(args.expert_cfg, None)
    if not cfgs:
        raise ExpertWeaveError("memory-plan: give at least one --expert-cfg NAME=expert_cfg.json")
    if args.base:
        geometry = BaseGeometry.from_checkpoint(args.base)
        config = read_json(Path(args.base) / "config.json")
    else:
        config = PRESETS[args.preset]
        geometry = BaseGeometry.from_config(config, "BF16", args.preset)
    selections = {name: read_expert_cfg(path) for name, path in cfgs.items()}
    from .adapters.validate import check_selection

    for name, experts in selections.items():
        check_selection(experts, geometry, cfgs[name])
    plan = plan_memory(geometry, selections, args.granularity, model_nbytes_from_config(config))
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_demo(args) -> int:
    from .integrations.vllm.verify import verify_vllm
    from .tiny import make_tiny
    from .reports import format_verify
    from .verify import DEFAULT_PROMPTS

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expertweave" / f"tiny-seed{args.seed}"
    if not (cache / "adapters").is_dir() or len(list((cache / "adapters").iterdir())) != 3:
        print(f"building the tiny model and 3 adapters in {cache}", file=sys.stderr)
        make_tiny(cache, adapters=3, seed=args.seed)
    adapters = {p.name: str(p) for p in sorted((cache / "adapters").iterdir())}
    with _stdout_to_stderr(args.json):
        report = verify_vllm(cache / "base", adapters, DEFAULT_PROMPTS, args.max_new_tokens,
                             granularity=64 << 10, enforce_eager=args.enforce_eager, max_model_len=512,
                             kv_cache_memory_bytes=64 << 20)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_verify(report))
    return 0 if report.ok else 1


def cmd_serve(args) -> int:
    from .adapters import validate_adapter
    from .geometry import BaseGeometry
    from .integrations.vllm.launch import ServerOptions, serve

    named = _named_paths(args.adapter, args.adapters_dir)
    root = None
    if args.adapter_root is not None:
        root = Path(args.adapter_root).resolve()
        if not os.path.isdir(root):  # False too when the system cannot tell (a name too long, no permission)
            raise ExpertWeaveError(f"serve: --adapter-root {args.adapter_root}: not a directory")
    geometry = BaseGeometry.from_checkpoint(args.base)
    shared_experts = args.shared_experts
    for path in list(named.values())[args.max_adapters:]:  # the first ones are checked as they are loaded
        shared_experts |= bool(validate_adapter(path, geometry).shared_layers)
    options = ServerOptions(args.allow_runtime_loading, None if root is None else str(root),
                            {name: str(Path(path).resolve()) for name, path in named.items()}, args.max_adapters,
                            args.eviction_policy, args.adapter_wait, args.host_adapter_bytes, args.warm_host_tier,
                            args.consolidate_rel_l2, shared_experts)
    preload = dict(list(named.items())[:args.max_adapters])
    code = serve(args.base, preload, args.host, args.port, args.vllm_args,
                 max_adapters=args.max_adapters, adapter_slots=args.adapter_slots, base_name=args.base_name,
                 options=options, debug=args.debug)
    return code if code == 2 else int(code > 0)  # 2: the server refused to start, in one line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertweave", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("make-tiny", help="write the embedded tiny DeepSeek-V2 model and ESFT adapters")
    t.add_argument("out", type=_path)
    t.add_argument("--adapters", type=_count(1, 1000), default=3)
    t.add_argument("--seed", type=_count(0, 2**32 - 1), default=0)
    t.add_argument("--delta-spread", type=_spread, metavar="LO:HI",
                   help="tuned expert = base expert + a delta of relative size drawn log-uniformly from LO..HI "
                        "(e.g. 0.001:1, for consolidation experiments); default: a strong fine-tune")
    t.add_argument("--decisive", action="store_true",
                   help="the next token depends on the current one and the adapter only, with a wide top-1 lead: "
                        "greedy outputs do not change with how requests are batched")
    t.set_defaults(func=cmd_make_tiny)

    a = sub.add_parser("adapter", help="inspect, validate or extract ESFT adapters")
    asub = a.add_subparsers(dest="adapter_command", required=True)
    i = asub.add_parser("inspect", help="experts per layer, bytes, dtype, flags")
    i.add_argument("path", type=_path)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_adapter_inspect)
    v = asub.add_parser("validate", help="check an adapter fits a base model")
    v.add_argument("path", type=_path)
    v.add_argument("--base", type=_path, required=True)
    v.set_defaults(func=cmd_adapter_validate)
    x = asub.add_parser("extract", help="write the ESFT adapter of a fully fine-tuned checkpoint")
    x.add_argument("--base", type=_path, required=True)
    x.add_argument("--finetuned", type=_path, required=True)
    x.add_argument("--out", type=_path, required=True)
    x.add_argument("--name", help="name recorded in the adapter (default: the --out directory's name)")
    x.add_argument("--atol", type=_nonnegative, default=0.0, help="largest |difference| still counted as unchanged")
    x.set_defaults(func=cmd_adapter_extract)

    f = sub.add_parser("verify", help="prove ExpertWeave's outputs equal the merged models'")
    f.add_argument("--base", type=_path, required=True)
    f.add_argument("--adapter", type=_named_path, action="append", metavar="NAME=PATH")
    f.add_argument("--adapters-dir", type=_path, help="load every subdirectory as an adapter named after it")
    f.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    f.add_argument("--max-new-tokens", type=_count(1, 1 << 20), default=16)
    f.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 with hf, the checkpoint's dtype with vllm")
    f.add_argument("--enforce-eager", action="store_true", help="vllm: no torch.compile")
    f.add_argument("--max-model-len", type=_count(1, 1 << 24), default=1024, help="vllm")
    f.add_argument("--kv-cache-memory", type=_size(1), default=256 << 20, help="vllm: KV cache size, e.g. 256MiB")
    f.add_argument("--granularity", type=_size(1), help="VMM granule, e.g. 64KiB (default 2MiB, as on devices)")
    f.add_argument("--device", default="cpu", help="hf: cpu or cuda[:N] (CUDA virtual memory, Triton reroute)")
    f.add_argument("--consolidate-rel-l2", type=_nonnegative, metavar="X", help=CONSOLIDATE_HELP)
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo", help="serve the tiny model's base and 3 adapters in one vLLM engine, "
                                     "check each against its merged model")
    d.add_argument("--json", action="store_true")
    d.add_argument("--seed", type=_count(0, 2**32 - 1), default=0)
    d.add_argument("--max-new-tokens", type=_count(1, 1 << 20), default=32)
    d.add_argument("--enforce-eager", action="store_true")
    d.set_defaults(func=cmd_demo)

    sv = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with ESFT adapters as models",
                        epilog="Arguments after -- go to vLLM's server unchanged, e.g. -- --enforce-eager")
    sv.add_argument("base", type=_path)
    sv.add_argument("--adapter", type=_named_path, action="append", metavar="NAME=PATH",
                    help="an adapter served by name; the first --max-adapters are loaded at start, the rest on demand")
    sv.add_argument("--adapters-dir", type=_path, help="as --adapter, for every subdirectory (named after it)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_count(1, 65535), default=8000)
    sv.add_argument("--base-name", help='the base model\'s "model" name (default: BASE\'s directory name)')
    sv.add_argument("--max-adapters", type=_count(1, 4096), default=8,
                    help="adapters on the device at once; a request for another evicts an idle one")
    sv.add_argument("--adapter-slots", type=_count(1, 1 << 20), help="expert slots per MoE layer for adapters")
    sv.add_argument("--allow-runtime-loading", action="store_true",
                    help="add POST /v1/load_esft_adapter and /v1/unload_esft_adapter (guarded by vLLM's --api-key)")
    sv.add_argument("--debug", action="store_true", help="show the server's tracebacks as they happen")
    sv.add_argument("--adapter-root", type=_path, metavar="DIR",
                    help="every subdirectory is an adapter served by its name, loaded when a request names it; "
                         "runtime loads may read only inside DIR")
    sv.add_argument("--host-adapter-bytes", type=_size(0), default=2 << 30, metavar="SIZE",
                    help="host tier: packed adapters kept in host memory (pinned on GPU/NPU) for fast reloads "
                         "and prefetch (default 2GiB; 0: none)")
    sv.add_argument("--warm-host-tier", action="store_true",
                    help="at start, pack catalogued adapters into the host tier in the background while it has room")
    sv.add_argument("--eviction-policy", choices=list(POLICIES), default="lru",
                    help="which idle adapter leaves the device for another: lru, or demand (recent request rate)")
    sv.add_argument("--consolidate-rel-l2", type=_nonnegative, metavar="X", help=CONSOLIDATE_HELP)
    sv.add_argument("--shared-experts", action="store_true",
                    help="serve adapters that tune shared experts (expert_cfg.json \"shared_experts\": true) even "
                         "when none is named at start; off, such an adapter is refused at load, and the base and "
                         "routed-only adapters match plain vLLM bit for bit")
    sv.add_argument("--adapter-wait", type=_seconds, default=60.0, metavar="SECONDS",
                    help="how long a request may wait for its adapter to be loaded before a 503")
    sv.set_defaults(func=cmd_serve, vllm_args=[])

    mp = sub.add_parser("memory-plan", help="bytes mapped for a set of adapter geometries, by the real allocator")
    mp.add_argument("--expert-cfg", type=_named_path, action="append", metavar="NAME=PATH",
                    help="an adapter's expert_cfg.json")
    src = mp.add_mutually_exclusive_group()
    src.add_argument("--base", type=_path, help="base checkpoint directory (config.json + safetensors)")
    src.add_argument("--preset", default="deepseek-v2-lite", choices=["deepseek-v2-lite"])
    mp.add_argument("--granularity", type=_size(1), default=2 << 20)
    mp.add_argument("--json", action="store_true")
    mp.set_defaults(func=cmd_memory_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if passthrough:
        if args.command != "serve":
            print("error: arguments after -- are passed to vLLM and only `serve` takes them", file=sys.stderr)
            return 2
        args.vllm_args = passthrough
    try:
        return args.func(args)
    except ExpertWeaveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
