"""Reading the pinned releases' sources with ast, never importing them: where a name is defined, its
parameters, and what a function's body calls, reads, writes or returns (tests/pinned.py fetches them)."""

import ast
import zipfile
from dataclasses import dataclass
from functools import cache

import pinned


@dataclass(frozen=True)
class Hook:
    """A vllm-ascend callable or class ExpertWeave wraps, calls or looks up: `target` is
    "module:qualname" where the plugin finds it, `source` the file defining it, `params` its leading
    parameter names in order (for a class, its __init__'s)."""
    target: str
    params: tuple[str, ...]
    source: str = ""

    @property
    def module(self) -> str:
        return self.target.split(":")[0]

    @property
    def qualname(self) -> str:
        return self.target.split(":")[1]

    @property
    def file(self) -> str:
        return self.source or self.module.replace(".", "/") + ".py"


@dataclass(frozen=True)
class Fact:
    """What ExpertWeave assumes of a vllm-ascend function's or class's body: it `calls` a (dotted)
    name (with these keywords), `reads` or `writes` an attribute chain (writes: with this value, in
    source form), or `returns` these names."""
    file: str
    qualname: str
    kind: str
    name: str
    keywords: tuple[str, ...] = ()
    value: str | None = None


@dataclass(frozen=True)
class NpuOp:
    """A torch_npu name, as its path under torch_npu ("npu_swiglu", "npu.synchronize"): `params` the
    parameter names its callers pass, in the signature's order (callers pass most by keyword);
    `schema` says where torch-npu declares it: "meta" (op_plugin/meta/_meta_registrations.py),
    "native" (csrc/aten/npu_native_functions.yaml), "python:<file in the wheel>" or "binding" (a method of
    torch_npu._C its C++ library registers by name; no parameters to check)."""
    name: str
    params: tuple[str, ...]
    schema: str
    used_by: str


DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@cache
def pinned_tree(file: str) -> ast.Module:
    """A file of the pinned vllm-ascend source release (vllm_ascend/...)."""
    return ast.parse((pinned.vllm_ascend_sources() / file).read_text(), file)


@cache
def torch_npu_bytes(member: str) -> bytes:
    with zipfile.ZipFile(pinned.torch_npu_wheel()) as wheel:
        return wheel.read(member)


def torch_npu_text(member: str) -> str:
    return torch_npu_bytes(member).decode()


def find(tree: ast.Module, qualname: str) -> ast.ClassDef | ast.FunctionDef | None:
    """The first class or function called qualname's first part anywhere in the file (module level or
    under an `if`), then each further part among the previous one's direct members."""
    first, *rest = qualname.split(".")
    node = next((n for n in ast.walk(tree) if isinstance(n, DEFINITIONS) and n.name == first),
                None)
    for part in rest:
        if node is None:
            return None
        node = next((n for n in node.body if isinstance(n, DEFINITIONS) and n.name == part), None)
    return node


def parameters(node: ast.ClassDef | ast.FunctionDef) -> list[str]:
    if isinstance(node, ast.ClassDef):
        init = find(ast.Module(body=node.body, type_ignores=[]), "__init__")
        return parameters(init) if init is not None else []
    args = node.args
    return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def imports(tree: ast.Module, module: str, name: str) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == module and any(a.name == name for a in n.names)
               for n in ast.walk(tree))


def hook_problem(hook: Hook) -> str | None:
    """None if the hook exists in the pinned vllm-ascend with its leading parameters, else what differs."""
    node = find(pinned_tree(hook.file), hook.qualname)
    if node is None:
        return f"{hook.file}: no {hook.qualname}"
    found = parameters(node)
    if found[: len(hook.params)] != list(hook.params):
        return f"{hook.file}: {hook.qualname}{tuple(found)} does not start with {hook.params}"
    module_file = hook.module.replace(".", "/") + ".py"
    source_module = hook.file.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    if source_module == hook.module:
        return None
    if not imports(pinned_tree(module_file), source_module, hook.qualname.split(".")[0]):
        return f"{module_file} does not import {hook.qualname.split('.')[0]} from {source_module}"
    return None


def written(target: ast.AST) -> list[str]:
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in written(element)]
    if isinstance(target, ast.Subscript):
        target = target.value
    name = dotted(target)
    return [] if name is None else [name]


def fact_holds(fact: Fact, tree=None) -> bool:
    """Whether fact holds in its file; tree(file) reads the file (default: the pinned releases)."""
    node = find((tree or pinned_tree)(fact.file), fact.qualname)
    if node is None:
        return False
    nodes = list(ast.walk(node))
    if fact.kind == "calls":
        return any(isinstance(n, ast.Call) and dotted(n.func) == fact.name
                   and set(fact.keywords) <= {k.arg for k in n.keywords} for n in nodes)
    if fact.kind == "reads":
        return any(isinstance(n, ast.Attribute) and dotted(n) == fact.name for n in nodes)
    if fact.kind == "writes":
        for n in nodes:
            if isinstance(n, ast.Assign):
                targets, value = n.targets, n.value
            elif isinstance(n, (ast.AnnAssign, ast.AugAssign)) and n.value is not None:
                targets, value = [n.target], n.value
            else:
                continue
            if any(fact.name in written(t) for t in targets) and fact.value in (None, ast.unparse(value)):
                return True
        return False
    if fact.kind == "returns":
        want = fact.name.split(", ")
        return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple)
                   and [ast.unparse(e) for e in n.value.elts] == want for n in nodes)
    raise AssertionError(f"unknown fact kind {fact.kind!r}")


