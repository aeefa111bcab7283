"""Cost of a compiled XLA program with loop trip counts: matmul FLOPs, memory traffic, collectives.

XLA's own ``cost_analysis()`` counts each while-loop body once, so for a step built of scanned
layers and GradCache chunks it sees a fraction of the work. This module walks the optimized HLO
text (``compiled.as_text()``), multiplies each computation by how often it runs (trip counts
read from the loop conditions), and prices every top-level instruction with a roofline:
``max(matmul FLOPs / peak, bytes touched / HBM bandwidth)``, plus collectives over the
interconnect. It is an estimate of the program XLA really built, not a measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
               "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
# Instructions that move no data of their own (bookkeeping, or priced via their computations).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
        "conditional", "after-all", "partition-id", "replica-id", "iota", "all-gather-done",
        "all-reduce-done", "collective-permute-done", "copy-done", "async-done", "opt-barrier",
        "add-dependency", "send-done", "recv-done"}
COLLECTIVES = {"all-gather", "all-gather-start", "reduce-scatter", "all-reduce", "all-reduce-start",
               "all-to-all", "collective-permute", "collective-permute-start"}
SLICING = {"dynamic-slice", "slice", "gather"}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result type text, layouts included
    opcode: str
    operands: list[str]
    attrs: str


@dataclasses.dataclass
class Computation:
    name: str
    params: dict[str, str]  # parameter name -> type text (from the header)
    instrs: dict[str, Instr]
    root: str | None


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at separators outside (), [], {}."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _balanced(text: str, start: int) -> int:
    """Index one past the bracket that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO line: {text[:200]}")


def _parse_instr(line: str) -> tuple[Instr, bool]:
    is_root = line.startswith("ROOT ")
    if is_root:
        line = line[5:]
    name, rest = line.split(" = ", 1)
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.index("(")
    opcode = rest[:paren]
    close = _balanced(rest, paren)
    operands = [re.sub(r"/\*.*?\*/", "", o).split()[-1].lstrip("%")  # drop /*index=5*/
                for o in _split_top(rest[paren + 1:close - 1])]
    return Instr(name.lstrip("%"), shape, opcode, operands, rest[close:]), is_root


def _logical_lines(text: str):
    """HLO text lines with multi-line instructions (kernel metadata in frontend_attributes,
    e.g. splash attention's JSON block sizes) joined into one: a line continues while its
    brackets, counted outside double-quoted strings, are open."""
    buf, depth = [], 0
    for raw in text.splitlines():
        buf.append(raw.strip())
        in_str = escaped = False
        for ch in raw:
            if in_str:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
        # A computation header ends with an open "{": its body follows on its own lines.
        if depth <= 0 or (len(buf) == 1 and _HEADER.match(buf[0])) or buf[0] == "}":
            yield " ".join(buf)
            buf, depth = [], 0
    if buf:
        yield " ".join(buf)


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """HLO module text -> ({computation name: Computation}, entry computation name)."""
    comps, entry, cur = {}, None, None
    for raw in _logical_lines(text):
        line = raw.strip()
        if cur is None:
            m = _HEADER.match(line)
            if m:
                params = {}
                for p in _split_top(m.group(3)):
                    pname, ptype = p.split(":", 1)
                    params[pname.strip().lstrip("%")] = ptype.strip()
                cur = Computation(m.group(2), params, {}, None)
                if m.group(1):
                    entry = cur.name
            continue
        if line == "}" or line.startswith("},"):  # "}, execution_thread=..." (v5p SparseCore)
            comps[cur.name] = cur
            cur = None
            continue
        if not line or line.startswith("//"):
            continue
        instr, is_root = _parse_instr(line)
        cur.instrs[instr.name] = instr
        if is_root:
            cur.root = instr.name
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Array shapes in a type (tuples flattened): [(dtype, dims), ...]."""
    return [(d, tuple(int(x) for x in dims.split(",") if x))
            for d, dims in _SHAPE.findall(re.sub(r"\{[^{}]*\}", "", type_text))
            if d in DTYPE_BYTES]


def nbytes(type_text: str) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in shapes(type_text))


def _operand_type(comp: Computation, name: str) -> str:
    if name in comp.instrs:
        return comp.instrs[name].shape
    return comp.params.get(name, "")


def _dims(comp: Computation, name: str, user: Instr) -> tuple[int, ...]:
    found = shapes(_operand_type(comp, name))
    if not found:
        raise ValueError(f"HLO {comp.name}/{user.name}: no array type for operand {name!r}")
    return found[0][1]


def _called(instr: Instr, key: str) -> list[str]:
    """Computation names an attribute refers to: ``key=%c`` or ``key={%a, %b}``."""
    m = re.search(r"(?:^|[\s,])" + key + r"=(\{[^}]*\}|[^,\s]+)", instr.attrs)
    if not m:
        return []
    return [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",") if c.strip()]


def dot_flops(instr: Instr, comp: Computation) -> float:
    """2 x output elements x contracted size of a dot."""
    out = shapes(instr.shape)[0][1]
    lhs = _dims(comp, instr.operands[0], instr)
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
    contracted = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m else 1
    return 2.0 * math.prod(out) * contracted


_KERNEL_COST = re.compile(r'"cost_estimate":\s*\{([^}]*)\}')
# grit_jax.attention names each splash call's scope after its mask, e.g. splash[causal,window=9].
_SPLASH_MASK = re.compile(r"splash\[(causal|bidirectional)(?:,window=(\d+))?\]")
# Multiply-adds per (query, key) pair and head dimension of each splash phase: forward q k^T and
# p v; dq recomputes q k^T, then dO v^T and dS k; dkv recomputes q k^T, then p^T dO, dO v^T and
# dS^T q.
SPLASH_PASSES = {"fwd": 2, "dq": 3, "dkv": 4}


def kernel_cost(instr: Instr, comp: Computation) -> tuple[float, float | None, str] | None:
    """(FLOPs, bytes or None, source) of a TPU kernel custom call, None for other custom calls.

    Sources: ``cost_estimate`` (the kernel's own, e.g. Pallas megablox), ``analytic_attention``
    (splash attention, which carries none: 2 FLOPs per multiply-add over the key blocks its mask
    leaves, see splash_flops), ``grouped_matmul`` (XLA's ragged dot: 2 x M x N x K, counting
    every row, an upper bound when the groups leave rows uncovered)."""
    m = _KERNEL_COST.search(instr.attrs)
    if m:
        fields = dict(re.findall(r'"(\w+)":\s*"?([\d.eE+-]+)"?', m.group(1)))
        moved = fields.get("bytes_accessed")
        return (float(fields.get("flops", 0.0)), None if moved is None else float(moved),
                "cost_estimate")
    if "splash_" in instr.name or "/splash_m" in instr.attrs:
        return splash_flops(instr, comp), None, "analytic_attention"
    if "ragged_dot_tiling" in instr.attrs:
        return ragged_dot_flops(instr, comp), None, "grouped_matmul"
    return None


def visible_blocks(t: int, s: int, bq: int, bkv: int, mode: str, window: int | None) -> int:
    """(query block, key block) pairs with at least one allowed pair: what splash computes."""
    nq, nk = -(-t // bq), -(-s // bkv)
    if mode == "bidirectional":
        return nq * nk
    total = 0
    for i in range(nq):
        first, last = i * bq, min(t, (i + 1) * bq) - 1
        lo = 0 if window is None else max(0, first - window + 1)
        total += min(last, s - 1) // bkv - lo // bkv + 1
    return total


def splash_flops(instr: Instr, comp: Computation) -> float:
    """FLOPs of one splash kernel call from its q ([B,] H, T, D) and k ([B,] G, S, D) operands, the
    block sizes in its metadata and the mask named in its scope (bidirectional if none is
    named)."""
    kernel = re.search(r"splash_m[hq]a_(fwd|dq|dkv)", instr.name) or re.search(
        r"op_name=\"[^\"]*splash_m[hq]a_(fwd|dq|dkv)", instr.attrs)
    phase = kernel.group(1) if kernel else "fwd"
    arrays = [_dims(comp, o, instr) for o in instr.operands if _operand_type(comp, o)]
    floats = [d for o, d in zip(instr.operands, arrays)
              if len(d) >= 3 and shapes(_operand_type(comp, o))[0][0] in ("f32", "bf16", "f16")]
    if len(floats) < 2:
        return 0.0
    # q (..., H, T, D), k (..., G, S, D); leading dims: a batch vmapped into the kernel's grid.
    (h, t, d), s = floats[0][-3:], floats[1][-2]
    batch = math.prod(floats[0][:-3])
    text = instr.attrs.replace('\\"', '"')
    sizes = dict(re.findall(r'"(block_\w+)":\s*(\d+)', text))
    key = {"fwd": ("block_q", "block_kv"), "dq": ("block_q_dq", "block_kv_dq"),
           "dkv": ("block_q_dkv", "block_kv_dkv")}[phase]
    bq, bkv = (int(sizes.get(k, 128)) for k in key)
    m = _SPLASH_MASK.search(instr.attrs)
    mode, window = (m.group(1), int(m.group(2)) if m.group(2) else None) if m else (
        "bidirectional", None)
    blocks = visible_blocks(t, s, bq, bkv, mode, window)
    return 2.0 * SPLASH_PASSES[phase] * batch * h * blocks * bq * bkv * d


def ragged_dot_flops(instr: Instr, comp: Computation) -> float:
    """2 x M x N x K of XLA's TPU grouped matmul (lhs (M, K), result (M, N))."""
    out = shapes(instr.shape)[0][1]
    if len(out) != 2:
        return 0.0
    for o in instr.operands:
        dims = _dims(comp, o, instr)
        if len(dims) == 2 and dims[0] == out[0] and dims != out:
            return 2.0 * out[0] * out[1] * dims[1]
    return 0.0


@functools.lru_cache(maxsize=4096)
def _valid_taps(size: int, out: int, window: int, stride: int, lo: int, lhs_dil: int,
                rhs_dil: int) -> int:
    """(output position, window tap) pairs of one spatial dimension that read real input."""
    pos = (np.arange(out)[:, None] * stride + np.arange(window)[None, :] * rhs_dil - lo)
    dilated = (size - 1) * lhs_dil + 1
    return int(((pos >= 0) & (pos < dilated) & (pos % lhs_dil == 0)).sum())


def _window(attrs: str, key: str, dims: int, default: int) -> list[int]:
    m = re.search(r"\b" + key + r"=([\dx_\-]+)", attrs)
    if not m:
        return [default] * dims
    return [int(v) for v in m.group(1).split("x")]


def conv_flops(instr: Instr, comp: Computation) -> float:
    """2 x output batch x output features x input features x valid window taps (padding and
    dilation holes excluded, as XLA's own cost analysis counts them)."""
    out = shapes(instr.shape)[0][1]
    lhs, rhs = _dims(comp, instr.operands[0], instr), _dims(comp, instr.operands[1], instr)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    lhs_l, rhs_l, out_l = labels.groups()
    spatial = [c for c in out_l if c.isdigit()]
    w = re.search(r"window=\{([^}]*)\}", instr.attrs)
    attrs = w.group(1) if w else ""
    n = len(spatial)
    pads = re.search(r"\bpad=([\d_x\-]+)", attrs)
    lows = [int(p.split("_")[0]) for p in pads.group(1).split("x")] if pads else [0] * n
    strides, lhs_dil = _window(attrs, "stride", n, 1), _window(attrs, "lhs_dilate", n, 1)
    rhs_dil = _window(attrs, "rhs_dilate", n, 1)
    taps = 1
    for j, d in enumerate(sorted(spatial)):
        taps *= _valid_taps(lhs[lhs_l.index(d)], out[out_l.index(d)], rhs[rhs_l.index(d)],
                            strides[j], lows[j], lhs_dil[j], rhs_dil[j])
    return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps


def replica_groups(instr: Instr, devices: int) -> np.ndarray:
    """The device groups of a collective as an (groups, group size) array of logical device ids
    (positions in the program's device assignment). Three spellings: explicit
    ``{{0,1},{2,3}}``, iota ``[G,S]<=[dims]T(perm)``, and mesh
    ``mesh['a'=2,'b'=4] {'b'}`` (the groups vary over the listed axes)."""
    ids = np.arange(devices)
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", instr.attrs)
    if mesh:
        axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        chosen = [names.index(a) for a in re.findall(r"'([^']+)'", mesh.group(2))]
        if math.prod(sizes) != devices:
            return ids[None]
        rest = [i for i in range(len(names)) if i not in chosen]
        grid = ids.reshape(sizes).transpose(rest + chosen)
        return grid.reshape(-1, math.prod(sizes[i] for i in chosen) if chosen else 1)
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?",
                     instr.attrs)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        dims = [int(x) for x in iota.group(2).split(",")]
        grid = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(3):
            grid = grid.transpose([int(x) for x in iota.group(3).split(",")])
        return grid.reshape(-1, shape[-1])
    listed = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", instr.attrs)
    if listed:
        groups = [[int(x) for x in g.split(",") if x.strip()]
                  for g in re.findall(r"\{([\d, ]*)\}", listed.group(1))]
        groups = [g for g in groups if g]
        if groups and len({len(g) for g in groups}) == 1:
            return np.asarray(groups)
    return ids[None]  # no groups given: every device


def _group_size(instr: Instr, default: int) -> int:
    return replica_groups(instr, default).shape[1]


def crosses_slices(instr: Instr, devices: int, slice_of) -> bool:
    """Whether any group of the collective holds devices of different slices (its traffic
    crosses the data-centre network). ``slice_of``: slice index per logical device id."""
    if slice_of is None:
        return False
    if instr.opcode.startswith("collective-permute"):
        pairs = re.search(r"source_target_pairs=\{(.*?)\}\s*(?:,|$)", instr.attrs)
        found = re.findall(r"\{(\d+),(\d+)\}", pairs.group(0)) if pairs else []
        return any(slice_of[int(a)] != slice_of[int(b)] for a, b in found)
    groups = replica_groups(instr, devices)
    return bool((np.asarray(slice_of)[groups] != np.asarray(slice_of)[groups[:, :1]]).any())


def collective_bytes(instr: Instr, comp: Computation, devices: int) -> float:
    """Bytes one device sends for a collective (ring algorithms)."""
    g = _group_size(instr, devices)
    if g <= 1 and not instr.opcode.startswith("collective-permute"):
        return 0.0
    frac = (g - 1) / g
    op = instr.opcode.replace("-start", "")
    if op == "all-gather":
        return nbytes(_async_output(instr.shape) if "start" in instr.opcode else instr.shape) * frac
    operands = sum(nbytes(_operand_type(comp, o)) for o in instr.operands)
    if op == "reduce-scatter" or op == "all-to-all":
        return operands * frac
    if op == "all-reduce":
        return 2 * operands * frac
    return operands  # collective-permute


_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def megascale_bytes(instr: Instr, comp: Computation, slices: int) -> float | None:
    """Bytes one device sends over the data-centre network for a cross-slice transfer, None for
    other instructions. The TPU compiler lowers collectives across slices (multislice) to host
    ``send``s tagged ``_xla_megascale_transfer_type`` (ALL_REDUCE, ALL_GATHER, ...), priced like
    ring collectives over the slices."""
    m = _MEGASCALE.search(instr.attrs) if instr.opcode == "send" else None
    if m is None:
        return None
    data = nbytes(_operand_type(comp, instr.operands[0]))
    frac = (slices - 1) / max(slices, 1)
    kind = m.group(1)
    if kind == "ALL_REDUCE":
        return 2 * data * frac
    if kind == "ALL_GATHER":
        return data * (slices - 1)
    return data * frac  # REDUCE_SCATTER, ALL_TO_ALL, point-to-point


def _async_output(type_text: str) -> str:
    """The output half of an async start's (operands, outputs) tuple type."""
    parts = _split_top(type_text.strip()[1:-1]) if type_text.startswith("(") else [type_text]
    return parts[-1]


class Module:
    """A parsed HLO module with per-computation costs and execution counts."""

    def __init__(self, text: str, devices: int = 1):
        self.comps, self.entry = parse_module(text)
        self.devices = devices
        self.unresolved_loops: list[str] = []
        self.loops: list[tuple[str, int]] = []
        self._flops_cache: dict[str, float] = {}

    # --- loops ---------------------------------------------------------------------------
    def _int_constants(self, comp_name: str, seen=None) -> list[int]:
        seen = seen or set()
        if comp_name in seen or comp_name not in self.comps:
            return []
        seen.add(comp_name)
        out = []
        for ins in self.comps[comp_name].instrs.values():
            if ins.opcode == "constant" and re.match(r"^[su]\d+\[\]", ins.shape):
                out.append(int(ins.operands[0]))
            for c in _called(ins, "calls"):
                out.extend(self._int_constants(c, seen))
        return out

    def _constant(self, comp: Computation, name: str, depth: int = 0) -> int | None:
        """The integer a scalar operand holds when it is a constant (through copies/converts)."""
        ins = comp.instrs.get(name)
        if ins is None or depth > 8:
            return None
        if ins.opcode == "constant" and re.match(r"^[su]\d+\[\]", ins.shape):
            return int(ins.operands[0])
        if ins.opcode in ("copy", "convert", "bitcast") and ins.operands:
            return self._constant(comp, ins.operands[0], depth + 1)
        return None

    def _unwrap(self, comp: Computation, name: str):
        """(opcode, operand names, attrs) of an instruction, seen through a fusion that only
        wraps one operation of its parameters (XLA:CPU wraps a loop's compare and add so)."""
        ins = comp.instrs.get(name)
        if ins is None:
            return None, [], ""
        if ins.opcode == "fusion":
            called = self.comps.get((_called(ins, "calls") or [""])[0])
            root = called.instrs.get(called.root) if called is not None else None
            params = [called.instrs.get(o) for o in root.operands] if root is not None else []
            if root is not None and params and all(p is not None and p.opcode == "parameter"
                                                   for p in params):
                return root.opcode, [ins.operands[int(p.operands[0])] for p in params], root.attrs
        return ins.opcode, ins.operands, ins.attrs

    def _induction(self, instr: Instr, comp: Computation):
        """(start, step, bound, inclusive) of a loop whose condition compares one tuple element
        with a constant and whose body adds a constant to it; None when not of that form."""
        cond = self.comps[_called(instr, "condition")[0]]
        body = self.comps[_called(instr, "body")[0]]
        opcode, operands, attrs = self._unwrap(cond, cond.root)
        if opcode != "compare" or len(operands) != 2:
            return None
        direction = re.search(r"direction=(\w+)", attrs)
        a = cond.instrs.get(operands[0])
        bound = self._constant(cond, operands[1])
        if a is None or a.opcode != "get-tuple-element" or bound is None or direction is None \
                or direction.group(1) not in ("LT", "LE"):
            return None
        index = int(re.search(r"index=(\d+)", a.attrs).group(1))
        init = comp.instrs.get(instr.operands[0])
        start = (self._constant(comp, init.operands[index])
                 if init is not None and init.opcode == "tuple" else None)
        root = body.instrs.get(body.root)
        if root is None or root.opcode != "tuple":
            return None
        opcode, operands, _ = self._unwrap(body, root.operands[index])
        if opcode != "add":
            return None
        steps = [self._constant(body, o) for o in operands]
        reads = [body.instrs.get(o) for o in operands]
        step = next((s for s in steps if s is not None), None)
        if step is None or step <= 0 or not any(
                r is not None and r.opcode == "get-tuple-element"
                and re.search(rf"index={index}\b", r.attrs) for r in reads):
            return None
        return start, step, bound, direction.group(1) == "LE"

    def trip_count(self, instr: Instr, comp: Computation) -> int:
        """Iterations of a while loop: XLA's known_trip_count, else its induction variable
        (start, constant step, bound: XLA's windowed einsum loops step by 2), else the bound."""
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
        if known:
            return int(known.group(1))
        induction = self._induction(instr, comp)
        if induction is not None:
            start, step, bound, inclusive = induction
            # A start that is not a constant (a copied loop state) is taken as 0.
            span = bound - (start or 0) + (1 if inclusive else 0)
            return max(0, -(-span // step))
        cond = _called(instr, "condition")[0]
        bounds = set(self._int_constants(cond))
        start = 0
        init = comp.instrs.get(instr.operands[0])
        if init is not None and init.opcode == "tuple":
            first = comp.instrs.get(init.operands[0])
            if first is not None and first.opcode == "constant":
                start = int(first.operands[0])
        if len(bounds) != 1:
            self.unresolved_loops.append(instr.name)
            return 1
        cond_text = " ".join(i.attrs for c in [cond] for i in self.comps[c].instrs.values())
        extra = 1 if "direction=LE" in cond_text else 0
        return max(0, bounds.pop() - start + extra)

    def matmul_flops(self, comp_name: str) -> float:
        """Dot and convolution FLOPs of a computation and everything it fuses (not loops)."""
        if comp_name in self._flops_cache:
            return self._flops_cache[comp_name]
        comp, total = self.comps[comp_name], 0.0
        for ins in comp.instrs.values():
            if ins.opcode == "dot":
                total += dot_flops(ins, comp)
            elif ins.opcode == "convolution":
                total += conv_flops(ins, comp)
            elif ins.opcode == "fusion":
                total += sum(self.matmul_flops(c) for c in _called(ins, "calls"))
        self._flops_cache[comp_name] = total
        return total

    def _fusion_bytes(self, ins: Instr, comp: Computation) -> float:
        """Bytes a fusion reads and writes; sliced parameters count only the slice."""
        fused = self.comps[_called(ins, "calls")[0]]
        read = 0.0
        params = list(fused.params)
        for i, operand in enumerate(ins.operands):
            pname = params[i] if i < len(params) else None
            users = [u for u in fused.instrs.values() if pname and pname in u.operands]
            if users and all(u.opcode in SLICING for u in users):
                read += sum(nbytes(u.shape) for u in users)
            elif users and all(u.opcode == "dynamic-update-slice" and u.operands[0] == pname
                               for u in users):
                continue  # updated in place: only the update is written (counted below)
            else:
                read += nbytes(_operand_type(comp, operand))
        root = fused.instrs.get(fused.root)
        if root is not None and root.opcode == "dynamic-update-slice":
            written = nbytes(_operand_type(fused, root.operands[1]))
        else:
            written = nbytes(ins.shape)
        return read + written

    def instr_bytes(self, ins: Instr, comp: Computation) -> float:
        if ins.opcode in FREE or ins.opcode in COLLECTIVES:
            return 0.0
        if ins.opcode == "fusion":
            return self._fusion_bytes(ins, comp)
        if ins.opcode in SLICING:
            return 2 * nbytes(ins.shape)
        if ins.opcode == "dynamic-update-slice":
            return 2 * nbytes(_operand_type(comp, ins.operands[1]))
        return nbytes(ins.shape) + sum(nbytes(_operand_type(comp, o)) for o in ins.operands)

    def analyze(self, peak_flops: float, hbm_bw: float, ici_bw: float,
                dcn_bw: float | None = None, slice_of=None) -> dict:
        """Totals per device over one execution of the entry computation. With ``slice_of``
        (slice index per logical device), collectives whose groups span slices are counted as
        data-centre network traffic (``dcn_*``), each with how often it runs per step."""
        slices = len(set(slice_of)) if slice_of is not None else 1
        totals = dict(flops=0.0, bytes=0.0, collective_bytes=0.0, compute_s=0.0, memory_s=0.0,
                      roofline_s=0.0, collective_s=0.0, kernel_flops=0.0,
                      kernel_flops_by_source={}, dcn_bytes=0.0, dcn_s=0.0 if dcn_bw else None,
                      dcn_collectives=[])
        self.loops, self.unresolved_loops = [], []

        def walk(name: str, times: float):
            comp = self.comps[name]
            for ins in comp.instrs.values():
                if ins.opcode == "while":
                    trips = self.trip_count(ins, comp)
                    self.loops.append((ins.name, trips))
                    walk(_called(ins, "body")[0], times * trips)
                    walk(_called(ins, "condition")[0], times * (trips + 1))
                    continue
                if ins.opcode in ("call", "async-start"):
                    for c in _called(ins, "to_apply") + _called(ins, "calls"):
                        walk(c, times)
                    continue
                if ins.opcode == "conditional":  # one branch runs; price the costliest
                    branches = (_called(ins, "branch_computations")
                                + _called(ins, "true_computation")
                                + _called(ins, "false_computation"))
                    costs = [(self.matmul_flops(b), b) for b in branches if b in self.comps]
                    if costs:
                        walk(max(costs)[1], times)
                    continue
                flops = 0.0
                if ins.opcode == "fusion":
                    flops = sum(self.matmul_flops(c) for c in _called(ins, "calls"))
                elif ins.opcode == "dot":
                    flops = dot_flops(ins, comp)
                elif ins.opcode == "convolution":
                    flops = conv_flops(ins, comp)
                moved = self.instr_bytes(ins, comp)
                cost = kernel_cost(ins, comp) if ins.opcode == "custom-call" else None
                if cost is not None:
                    flops, moved = cost[0], moved if cost[1] is None else cost[1]
                    totals["kernel_flops"] += times * flops
                    by_source = totals["kernel_flops_by_source"]
                    by_source[cost[2]] = by_source.get(cost[2], 0.0) + times * flops
                totals["flops"] += times * flops
                totals["bytes"] += times * moved
                totals["compute_s"] += times * flops / peak_flops
                totals["memory_s"] += times * moved / hbm_bw
                totals["roofline_s"] += times * max(flops / peak_flops, moved / hbm_bw)
                dcn = megascale_bytes(ins, comp, slices) if slices > 1 else None
                if dcn is not None:
                    totals["dcn_bytes"] += times * dcn
                    if dcn_bw:
                        totals["dcn_s"] += times * dcn / dcn_bw
                    totals["dcn_collectives"].append(
                        {"op": _MEGASCALE.search(ins.attrs).group(1).lower(), "bytes": dcn,
                         "runs_per_step": times})
                if ins.opcode in COLLECTIVES:
                    sent = collective_bytes(ins, comp, self.devices)
                    if crosses_slices(ins, self.devices, slice_of):
                        totals["dcn_bytes"] += times * sent
                        if dcn_bw:
                            totals["dcn_s"] += times * sent / dcn_bw
                        totals["dcn_collectives"].append(
                            {"op": ins.opcode, "bytes": sent, "runs_per_step": times})
                    else:
                        totals["collective_bytes"] += times * sent
                        totals["collective_s"] += times * sent / ici_bw

        walk(self.entry, 1.0)
        return totals


def analyze(text: str, *, devices: int = 1, peak_flops: float = 1.0, hbm_bw: float = 1.0,
            ici_bw: float = 1.0, dcn_bw: float | None = None, slice_of=None) -> dict:
    """Cost per device of one run of the module: FLOPs, bytes, times and the loops found."""
    mod = Module(text, devices)
    out = mod.analyze(peak_flops, hbm_bw, ici_bw, dcn_bw, slice_of)
    out["loops"] = len(mod.loops)
    out["loop_trips"] = sorted({t for _, t in mod.loops})
    out["unresolved_loops"] = len(mod.unresolved_loops)
    return out
