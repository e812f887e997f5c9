"""The op schemas of the torch-npu wheel, parsed and used to bind calls exactly as the NPU would.

torch-npu declares every custom op in ``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`` with a
native-functions schema string, e.g. ``npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor,
Tensor)``. The Python binding that torch-npu generates from it accepts positional arguments up to the ``*``,
keyword arguments by their schema name, fills defaults and checks types. :class:`OpSchema.bind` does the same on
the CPU, so a call from the kit with a wrong argument name, order, type or default fails in the emulation the way
it fails on the NPU.

The entries the kit uses are cached in ``ascend/data/torch_npu_schemas.yaml`` (with the wheel's name and sha256);
``python -m ascend.npu_schema refresh <torch_npu wheel>`` rewrites the cache from a downloaded wheel
(``pip download torch-npu==2.13.0 --no-deps -d /tmp/tnpu``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
import zipfile
from pathlib import Path

import torch

CACHE = Path(__file__).parent / "data" / "torch_npu_schemas.yaml"
YAML_IN_WHEEL = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
TORCH_NPU_VERSION = "2.13.0"

# The torch_npu functions the kit calls (kernels/npu.py) and the emulation provides (ascend/npu_emulation.py).
KIT_OPS = (
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_swiglu",
    "npu_prompt_flash_attention",
    "npu_incre_flash_attention",
    "npu_grouped_matmul",
    "npu_moe_gating_top_k_softmax",
    "npu_moe_init_routing_v2",
    "npu_moe_finalize_routing",
    "npu_format_cast",
    "get_npu_format",
    "npu_weight_quant_batchmatmul",
    "npu_convert_weight_to_int4pack",
)

_REQUIRED = object()


class SchemaBindError(TypeError):
    """A call does not match the op's schema (the NPU binding raises TypeError too)."""


@dataclasses.dataclass(frozen=True)
class Arg:
    name: str
    type: str  # as written in the schema: "Tensor?", "int[]?", "SymInt[]?", "int[2]", "str", ...
    default: object  # the Python value of the default, or _REQUIRED
    kwarg_only: bool

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclasses.dataclass(frozen=True)
class OpSchema:
    name: str
    overload: str
    args: tuple[Arg, ...]
    returns: str
    text: str

    @property
    def positional(self) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if not a.kwarg_only)

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """Match a call against the schema -> {name: value} for every argument (defaults filled in).

        Raises SchemaBindError for: too many positional arguments (including passing a keyword-only argument
        positionally), unknown or duplicate keyword names, missing required arguments, wrong types.
        """
        pos = self.positional
        if len(args) > len(pos):
            raise SchemaBindError(
                f"{self.name}() takes at most {len(pos)} positional argument(s) ({len(args)} given); arguments "
                f"after '*' are keyword-only: {self.signature()}")
        bound = {a.name: v for a, v in zip(pos, args)}
        names = {a.name for a in self.args}
        for key, value in kwargs.items():
            if key not in names:
                raise SchemaBindError(f"{self.name}() got an unexpected keyword argument '{key}'; "
                                      f"schema: {self.signature()}")
            if key in bound:
                raise SchemaBindError(f"{self.name}() got multiple values for argument '{key}'")
            bound[key] = value
        out = {}
        for a in self.args:
            if a.name in bound:
                value = bound[a.name]
                check_type(self.name, a, value)
            elif a.required:
                raise SchemaBindError(f"{self.name}() missing required argument '{a.name}' ({a.type}); "
                                      f"schema: {self.signature()}")
            else:
                value = list(a.default) if isinstance(a.default, list) else a.default
            out[a.name] = value
        return out

    def signature(self) -> str:
        return self.text


# --------------------------------------------------------------------------------------------------- parsing
_FUNC = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(?:\.(?P<overload>[A-Za-z0-9_]+))?\((?P<args>.*)\)\s*->\s*(?P<ret>.+)$")


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _parse_default(text: str, type_: str):
    t = text.strip()
    if t == "None":
        return None
    if t in ("True", "False"):
        return t == "True"
    if t.startswith(("'", '"')):
        return t[1:-1]
    if t.startswith("["):
        inner = t[1:-1].strip()
        return [int(x) for x in inner.split(",")] if inner else []
    base = type_.rstrip("?")
    if base == "float":
        return float(t)
    if base in ("int", "SymInt"):
        return int(t)
    if base.endswith("]"):  # "int[2] x=1" style scalar broadcast defaults
        return [int(t)]
    try:
        return int(t)
    except ValueError:
        return float(t)


def parse_schema(text: str) -> OpSchema:
    """Parse one native-functions schema string (torchgen's grammar, the subset torch-npu uses)."""
    text = text.strip()
    m = _FUNC.match(text)
    if m is None:
        raise ValueError(f"not a schema: {text!r}")
    args, kwarg_only = [], False
    for part in _split_top_level(m.group("args")):
        if part == "*":
            kwarg_only = True
            continue
        decl, _, default = part.partition("=")
        type_, name = decl.strip().rsplit(" ", 1)
        type_ = re.sub(r"\([a-z]!?\)", "", type_)  # alias annotations: Tensor(a!) -> Tensor
        args.append(Arg(name, type_, _parse_default(default, type_) if default else _REQUIRED, kwarg_only))
    return OpSchema(m.group("name"), m.group("overload") or "", tuple(args), m.group("ret").strip(), text)


# --------------------------------------------------------------------------------------------------- types
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_type(op: str, arg: Arg, value) -> None:
    t = arg.type
    optional = t.endswith("?")
    base = t.rstrip("?")
    if value is None:
        if optional:
            return
        raise SchemaBindError(f"{op}(): argument '{arg.name}' ({t}) must not be None")
    ok: bool
    if base == "Tensor":
        ok = isinstance(value, torch.Tensor)
    elif base == "Tensor[]":
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value)
    elif base in ("int", "SymInt"):
        ok = _is_int(value)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif base == "bool":
        ok = isinstance(value, bool)
    elif base == "str":
        ok = isinstance(value, str)
    elif base == "ScalarType":
        ok = isinstance(value, torch.dtype)
    elif re.fullmatch(r"(int|SymInt)\[\d*\]", base):
        size = re.search(r"\[(\d*)\]", base).group(1)
        ok = isinstance(value, (list, tuple, torch.Size)) and all(_is_int(v) for v in value)
        # int[2] with an empty default list ([]) is how torch-npu writes "not given": allow 0 or N elements.
        if ok and size and len(value) not in (0, int(size)):
            ok = False
    else:
        raise SchemaBindError(f"{op}(): argument type {t!r} is not understood by the emulation")
    if not ok:
        raise SchemaBindError(f"{op}(): argument '{arg.name}' must be {t}, not {type(value).__name__}")


# --------------------------------------------------------------------------------------------------- the yaml
_FUNC_LINE = re.compile(r"^\s*(?:-\s+)?func:\s*(.+?)\s*$")


def schemas_from_yaml_text(text: str) -> dict[str, list[str]]:
    """{"name" or "name.overload": [schema strings in file order]} from the wheel's yaml (no yaml parser needed:
    every entry has a single-line ``func:`` key)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _FUNC_LINE.match(line)
        if m:
            schema = m.group(1)
            key = schema.split("(", 1)[0]
            out.setdefault(key, []).append(schema)
    return out


def read_wheel_yaml(wheel: str | Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(YAML_IN_WHEEL).decode("utf-8")


def read_cache(path: Path = CACHE) -> tuple[dict[str, str], dict[str, str]]:
    """-> (schemas {key: schema string}, source {wheel, sha256, entry})."""
    text = path.read_text(encoding="utf-8")
    source = dict(re.findall(r"^#\s*(wheel|sha256|entry|torch_npu):\s*(\S+)", text, flags=re.M))
    schemas = {k: v[0] for k, v in schemas_from_yaml_text(text).items()}
    return schemas, source


_SCHEMAS: dict[str, OpSchema] | None = None


def kit_schemas() -> dict[str, OpSchema]:
    """The parsed cached schema of every op in KIT_OPS (keyed by op name, default overload)."""
    global _SCHEMAS
    if _SCHEMAS is None:
        raw, _ = read_cache()
        missing = [op for op in KIT_OPS if op not in raw]
        if missing:
            raise RuntimeError(f"{CACHE} has no schema for {missing}; refresh it from the torch-npu wheel")
        _SCHEMAS = {op: parse_schema(raw[op]) for op in KIT_OPS}
    return _SCHEMAS


def write_cache(wheel: str | Path, path: Path = CACHE) -> Path:
    """Copy the KIT_OPS entries of a torch-npu wheel's yaml into the cache, with the wheel's name and sha256."""
    wheel = Path(wheel)
    all_schemas = schemas_from_yaml_text(read_wheel_yaml(wheel))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lines = [
        "# Op schemas copied verbatim from the torch-npu wheel (only the ops moevl-ascend calls).",
        "# Regenerate: pip download torch-npu==2.13.0 --no-deps -d /tmp/tnpu && "
        "python -m ascend.npu_schema refresh /tmp/tnpu/<wheel>",
        f"# torch_npu: {TORCH_NPU_VERSION}",
        f"# wheel: {wheel.name}",
        f"# sha256: {sha}",
        f"# entry: {YAML_IN_WHEEL}",
    ]
    for op in KIT_OPS:
        if op not in all_schemas:
            raise RuntimeError(f"{wheel.name} declares no {op}")
        lines.append(f"- func: {all_schemas[op][0]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "refresh":
        sys.exit("usage: python -m ascend.npu_schema refresh <torch_npu-2.13.0-...whl>")
    print(write_cache(sys.argv[2]))
