"""Checks an ESFT adapter against the base model it will be served on: everything a load checks
(ExpertWeave.pack runs check_adapter, then reads every tensor as validate_adapter does), so an adapter
passes here exactly when a load takes it, and a refusal says the same in both."""

from pathlib import Path

from ..errors import AdapterError
from ..files import shown
from ..geometry import BaseGeometry
from .esft import CFG_NAME, EsftAdapter

# Fields of the adapter's config.json that must match the base for its experts to be interchangeable.
BASE_FIELDS = ("hidden_size", "moe_intermediate_size", "n_routed_experts")


def validate_adapter(path: str | Path, base: BaseGeometry) -> EsftAdapter:
    """check_adapter, then every tensor read and checked (finite values), in the order a load reads them."""
    adapter = check_adapter(path, base)
    with adapter.reading() as read:
        for layer, ids in adapter.experts.items():
            for expert in ids:
                read(layer, expert)
        for layer in adapter.shared_layers:
            read.shared(layer)
        read.non_expert()
    return adapter


def check_adapter(path: str | Path, base: BaseGeometry) -> EsftAdapter:
    """What the files' headers tell: names, shapes and dtypes fit the base. Reads no tensor data."""
    adapter = EsftAdapter.open(path)
    cfg_path = adapter.path / CFG_NAME
    if adapter.config is not None:
        base_values = {"hidden_size": base.hidden_size, "moe_intermediate_size": base.moe_intermediate_size,
                       "n_routed_experts": base.num_experts}
        for field in BASE_FIELDS:
            if field in adapter.config and adapter.config[field] != base_values[field]:
                raise AdapterError(adapter.path / "config.json",
                                   f"{field} is {adapter.config[field]} but the base has {base_values[field]}: "
                                   "the adapter was made for a different base model",
                                   f"{field} differs from the base's: the adapter was made for a different base model")
    check_selection(adapter.experts, base, cfg_path)
    for (layer, expert, proj), key in adapter.keys.items():
        info = adapter.checkpoint.tensors[key]
        expected = base.proj_shape(proj)
        if info.shape != expected:
            raise AdapterError(info.file, f"tensor {key} has shape {list(info.shape)}, expected {list(expected)} "
                               f"(base hidden_size {base.hidden_size}, moe_intermediate_size "
                               f"{base.moe_intermediate_size})", "an expert tensor's shape does not fit the base")
        if info.dtype != base.dtype:
            raise AdapterError(info.file, f"tensor {key} has dtype {info.dtype}, the base experts are {base.dtype}",
                               f"an expert tensor's dtype is not the base experts' {base.dtype}")
    check_shared(adapter, base)
    check_non_expert(adapter, base)
    return adapter


def check_non_expert(adapter: EsftAdapter, base: BaseGeometry) -> None:
    """Tuned non-expert tensors: each names a tensor of the base checkpoint, with its shape and dtype."""
    if not adapter.non_expert_keys:
        return
    if base.non_expert is None:
        raise AdapterError(adapter.path / CFG_NAME, '"non_expert_modules" is true: checking its tensors needs the '
                           "base checkpoint, not only its config", '"non_expert_modules" needs the base checkpoint')
    for key in adapter.non_expert_keys:
        info = adapter.checkpoint.tensors[key]
        if key not in base.non_expert:
            raise AdapterError(info.file, f"tensor {shown(key)} is not a tensor of the base model",
                               "holds a tensor the base model does not have")
        shape, dtype = base.non_expert[key]
        if info.shape != shape:
            raise AdapterError(info.file, f"tensor {shown(key)} has shape {list(info.shape)}, the base's has "
                               f"{list(shape)}",
                               "a non-expert tensor's shape is not the base's")
        if info.dtype != dtype:
            raise AdapterError(info.file, f"tensor {shown(key)} has dtype {info.dtype}, the base's is {dtype}",
                               "a non-expert tensor's dtype is not the base's")


def check_shared(adapter: EsftAdapter, base: BaseGeometry) -> None:
    """Tuned shared experts: only in MoE layers of a base that has shared experts, shaped and typed as its."""
    cfg_path = adapter.path / CFG_NAME
    if adapter.shared_keys and not base.shared_intermediate_size:
        raise AdapterError(cfg_path, '"shared_experts" is true but the base model has no shared experts',
                           '"shared_experts" is true but the base model has no shared experts')
    for (layer, proj), key in adapter.shared_keys.items():
        info = adapter.checkpoint.tensors[key]
        if layer not in base.moe_layers:
            raise AdapterError(info.file, f"tensor {key}: layer {layer} is not a MoE layer (MoE layers are "
                               f"{_ranges(base.moe_layers)})", "holds shared experts of a layer that is not a MoE layer")
        expected = base.shared_proj_shape(proj)
        if info.shape != expected:
            raise AdapterError(info.file, f"tensor {key} has shape {list(info.shape)}, expected {list(expected)} "
                               f"(base hidden_size {base.hidden_size}, shared experts' intermediate size "
                               f"{base.shared_intermediate_size})", "a shared-expert tensor's shape does not fit the base")
        if info.dtype != base.dtype:
            raise AdapterError(info.file, f"tensor {key} has dtype {info.dtype}, the base experts are {base.dtype}",
                               f"a shared-expert tensor's dtype is not the base experts' {base.dtype}")


def check_selection(experts: dict[int, tuple[int, ...]], base: BaseGeometry, cfg_path: str | Path) -> None:
    """Every listed layer exists and is MoE, every expert id is in range."""
    for layer, ids in experts.items():
        if not 0 <= layer < base.num_layers:
            raise AdapterError(cfg_path, f"layer {layer} does not exist (the base has layers 0..{base.num_layers - 1})",
                               "lists a layer the base does not have")
        if layer not in base.moe_layers and ids:
            raise AdapterError(cfg_path, f"layer {layer} is not a MoE layer (MoE layers are "
                               f"{_ranges(base.moe_layers)})", "lists experts in a layer that is not a MoE layer")
        for expert in ids:
            if not 0 <= expert < base.num_experts:
                raise AdapterError(cfg_path, f"layer {layer} lists expert {expert}, out of range: the base has "
                                   f"experts 0..{base.num_experts - 1}", "lists an expert id the base does not have")


def _ranges(values) -> str:
    values = sorted(values)
    if values and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))
