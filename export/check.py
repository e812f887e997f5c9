"""``moevl export check <dir>``: every op type of every graph against the ops ATC supports.

The table (export/data/atc_onnx_ops.json) is CANN's "supported ONNX operators" list with its source. A graph fails
on an op outside it, on an op we forbid (NonZero, ScatterND, If, Loop: data-dependent shapes or control flow that
ATC's static graphs and our gears cannot take; Einsum: slow in hot paths), on TopK with a non-constant K, on ops of
a non-standard domain (ONNX Runtime contrib ops) and on an opset above the table's maximum.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

TABLE = Path(__file__).parent / "data" / "atc_onnx_ops.json"


def load_table() -> dict:
    return json.loads(TABLE.read_text())


@dataclasses.dataclass
class GraphReport:
    name: str
    file: str
    opset: int
    ops: dict[str, int]          # op type -> count
    problems: list[str]


@dataclasses.dataclass
class CheckReport:
    folder: str
    graphs: list[GraphReport]
    table_source: str

    @property
    def ok(self) -> bool:
        return not any(g.problems for g in self.graphs)

    @property
    def problems(self) -> list[str]:
        return [f"{g.name}: {p}" for g in self.graphs for p in g.problems]

    def to_dict(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "table_source": self.table_source,
                "graphs": [dataclasses.asdict(g) for g in self.graphs]}

    def render(self) -> str:
        lines = [f"ATC op check of {self.folder} (table: {self.table_source})"]
        for g in self.graphs:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(g.ops.items()))
            lines.append(f"  {g.name} ({g.file}, opset {g.opset}, {len(g.ops)} op types): {ops}")
            lines += [f"    FAIL {p}" for p in g.problems]
        lines.append("OK: every op type is in ATC's list" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def check_graph(path: Path, name: str, table: dict | None = None) -> GraphReport:
    import onnx

    table = table or load_table()
    supported, forbidden = set(table["ops"]), table["forbidden"]
    from moevl.export.graph import ExportFolderError

    if not Path(path).is_file():
        raise ExportFolderError(f"{path} is missing: the export folder is incomplete; re-export it")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ExportFolderError(f"{path} is not a readable ONNX file ({type(e).__name__}); it is corrupt or "
                                "truncated: re-export it") from e
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    problems = []
    if opset > table["max_opset"]:
        problems.append(f"opset {opset} > {table['max_opset']}, the highest ATC lists")
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    counts = collections.Counter()
    for node in _all_nodes(model.graph):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[op] += 1
        if node.op_type == "TopK" and (len(node.input) < 2 or node.input[1] not in constants):
            problems.append(f"TopK {node.name!r} has a non-constant K")
    for op in sorted(counts):
        if op in forbidden:
            problems.append(f"{op} (x{counts[op]}) is forbidden: {forbidden[op]}")
        elif op not in supported:
            problems.append(f"{op} (x{counts[op]}) is not in ATC's ONNX operator list")
    return GraphReport(name, path.name, opset, dict(sorted(counts.items())), problems)


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # subgraphs of If/Loop/Scan
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(g)


def check_onnx_dir(folder) -> CheckReport:
    """Check every graph of an export folder (the contract's graphs; any *.onnx without a contract)."""
    from moevl.export.graph import CONTRACT, read_contract

    folder = Path(folder)
    table = load_table()
    if (folder / CONTRACT).is_file():
        graphs = [(name, folder / g["file"]) for name, g in read_contract(folder)["graphs"].items()]
    else:
        graphs = [(p.stem, p) for p in sorted(folder.glob("*.onnx"))]
    if not graphs:
        raise FileNotFoundError(f"{folder} has no ONNX graphs")
    return CheckReport(str(folder), [check_graph(p, n, table) for n, p in graphs], table["source"]["url"])
