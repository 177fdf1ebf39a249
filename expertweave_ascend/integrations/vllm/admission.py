"""A request's ExpertWeave arguments: what a front-end sets (request_fields), and the engine's check of them
where vLLM's engine client admits the request itself (install, check_request).

Every request an engine client (AsyncLLM in the server, LLMEngine offline) accepts is registered in its
output processor, synchronously and just before it is sent to the engine core; from then on it is one of
the live requests an unload waits for (lifetime.py). install() puts check_request in front of that
registration on the engine client the front-end drives (its own object: another engine in the process is
not checked), so every request, whatever route or API it came by, is checked against what the front-end
knows at the moment it becomes live: either it is refused, or an unload sees it.

The check is the engine's own defence, not the front-end's parse: every `esft_*` extra argument and the
prefix-cache salt must be exactly what a front-end would have set for the adapter named, which must be
admissible now. Anything else is refused with one error for that request (400 over HTTP), so a forged
or malformed argument never reaches the scheduler or the workers, where it would stop the engine.
"""

from typing import Callable

from ...contrastive import Contrastive
from ...residency import Content
from . import patching
from .contrastive import CONTRASTIVE_ARGS, PAIR_ARG, PROCESSOR as CONTRASTIVE_PROCESSOR, contrastive_args, \
    params_problem, request_contrastive, variant_refusal
from .engine import ADAPTER_ARG, SALT_HASH_CHARS, SALT_MARKER, adapter_cache_salt, client_salt_problem
from .variants import VARIANT_ARG

PROCESSORS = (CONTRASTIVE_PROCESSOR,)  # ExpertWeave's logits processors (module:class)
ARGS = (ADAPTER_ARG, VARIANT_ARG, *CONTRASTIVE_ARGS)  # the extra_args a front-end sets
PREFIX = "esft_"  # every ExpertWeave extra argument starts so; PAIR_ARG is the scheduler's own

# adapter name -> what a load put on the device (its content hash and kind), or ValueError saying why its
# requests may not start now
Admit = Callable[[str], Content]


def client_args_problem(extra, where: str, instead: str) -> str | None:
    """Why a client's own extra arguments (`where` names them as the client sent them) cannot be sent on;
    `instead` says how that client names an adapter and contrastive decoding."""
    if extra is not None and not isinstance(extra, dict):
        return f"{where} must be an object"
    for key in extra or ():
        if isinstance(key, str) and key.startswith(PREFIX):
            return f"{where}.{key} is set by {instead}"
    return None


def request_fields(name: str, content: Content, option: Contrastive | None, extra: dict | None,
                   client_salt) -> tuple[dict, str]:
    """The extra_args and cache_salt of a request for a loaded adapter: the client's own extra arguments
    (checked by client_args_problem) with the adapter's, and the client's salt with the adapter's after it
    (ValueError for a client salt that cannot take it)."""
    return ({**(extra or {}), ADAPTER_ARG: name, **({VARIANT_ARG: name} if content.variant else {}),
             **(contrastive_args(option) if option is not None else {})},
            adapter_cache_salt(content.sha256, client_salt))


def check_request(request, admit: Admit) -> None:
    """Raises ValueError, in one line, unless the request's ExpertWeave arguments and salt are those a
    front-end sets for an admissible adapter (or for the base)."""
    params = request.sampling_params
    extra = (params.extra_args if params is not None else None) or {}
    ours = {key: value for key, value in extra.items() if isinstance(key, str) and key.startswith(PREFIX)}
    for key in ours:
        if key not in ARGS:
            what = "is set by ExpertWeave's scheduler" if key == PAIR_ARG else "is not an ExpertWeave argument"
            raise ValueError(f"extra_args[{key!r}] {what}")
    name = ours.get(ADAPTER_ARG)
    if name is None:
        if ours:
            raise ValueError(f"extra_args[{sorted(ours)[0]!r}] needs extra_args[{ADAPTER_ARG!r}]: name an adapter")
        problem = client_salt_problem(request.cache_salt)
        if problem is not None:
            raise ValueError(problem)
        return
    if not isinstance(name, str):
        raise ValueError(f"extra_args[{ADAPTER_ARG!r}]: expected an adapter name, got {type(name).__name__}")
    adapter = admit(name)
    suffix = SALT_MARKER + adapter.sha256[:SALT_HASH_CHARS]
    salt = request.cache_salt
    if not isinstance(salt, str) or not salt.endswith(suffix) or SALT_MARKER in salt[:-len(suffix)]:
        raise ValueError(f"cache_salt of a request for adapter {name!r} is set by its front-end: name the adapter "
                         "in \"model\" (or adapter= offline)")
    if ours.get(VARIANT_ARG) != (name if adapter.variant else None):
        raise ValueError(f"extra_args[{VARIANT_ARG!r}] must be the adapter's own name exactly when the adapter "
                         "tunes non-expert modules")
    option = request_contrastive(params)
    if option is None:
        return
    if adapter.variant:
        raise ValueError(variant_refusal(name))
    problem = params_problem(params)
    if problem is not None:
        raise ValueError(problem)


def install(engine_client, admit: Admit) -> None:
    """Checks every request this engine client (vLLM's AsyncLLM or LLMEngine) registers, before it does. A
    refusal is vLLM's own VLLMValidationError, which AsyncLLM passes to the API server as a client error (400;
    any other exception there is a 500), and which is the ValueError offline callers catch on vLLM 0.23."""
    from vllm.exceptions import VLLMValidationError

    def checked(register):
        def add_request(request, *args, **kwargs):
            try:
                check_request(request, admit)
            except ValueError as e:
                raise VLLMValidationError(str(e)) from None
            return register(request, *args, **kwargs)
        return add_request

    patching.replace_attribute(engine_client.output_processor,
                               "vllm.v1.engine.output_processor:OutputProcessor.add_request", checked)


def with_processors(processors: list | None) -> list:
    """The engine's logits_processors with ExpertWeave's (contrastive decoding) added once."""
    processors = list(processors or [])
    return processors + [p for p in PROCESSORS if p not in processors]


def with_processors_args(vllm_args: list[str]) -> list[str]:
    """vllm serve arguments with ExpertWeave's processors among --logits-processors (the flag's last use
    wins)."""
    flag = "--logits-processors"
    args = list(vllm_args)
    for i in reversed(range(len(args))):
        if args[i] == flag:
            return args[: i + 1] + list(PROCESSORS) + args[i + 1:]
        if args[i].startswith(flag + "="):
            return args[:i] + [flag, args[i].partition("=")[2], *PROCESSORS] + args[i + 1:]
    return args + [flag, *PROCESSORS]
