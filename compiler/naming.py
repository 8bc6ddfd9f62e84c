"""Every name in a generated module, decided here by fixed patterns (as Tangent does).

The graph's node ids stay what lowering, the passes and autodiff made them (the IR
dumps, the schedule and the summary key on them); codegen asks `Names` for the
variable of each node and for the names of the buffers it allocates:

- a value the spec names keeps the spec's name and its cell instance: `h_enc1`,
  `i_enc1`, a parameter `enc1_W_x`, a state read `h_enc1_prev`;
- an unnamed intermediate is named for what it computes and from what, inside its
  instance: `conv_x_enc1` (conv of x in enc1), `add_z_o_enc1`, `tanh_c_enc1`; its
  operands' names are written without the instance they share with it, and its
  parameters are left out where it has other operands (`add_z_o_enc1` adds b_o);
- the cotangent of a value `v` is `dv` (`dh_enc1`, `dadd_z_o_enc1`), a part of a
  cotangent that is summed into it is `dv_via_<op>` (`dc_enc1_via_tanh`: what
  flows to c through its tanh), any other backward value is named as above after
  its op and operands (`mul_dh_o_enc1`);
- a constant is `const_<value>` (`const_1_0`, `const_neg0_5`, `const_1em05`): never
  `c`, which is a ConvLSTM's state;
- a work buffer of one time step is `work_<value>` after the first value the spec
  names that it holds (`work_f_enc1`), else after the first value it holds;
- a state's (T+1, N, ...) buffer, a stored value's (T, N, ...) buffer and a
  cotangent's carried buffer add `_buf`, `_seq`, `_win`, `_ckpt`, `_zero` to the
  value's name, a suffix no value name ends with.

A name is a valid identifier, not a Python keyword or builtin, not one of the
generated code's own names (`t`, `T_x`, `xp`, `rt`, `B`, `params`, `grads`,
`state`, `bptt`, ...: see ir.reserved), and unique in the module; where a pattern
gives a name already taken the later node adds `_2`, `_3`, ... Names are given in
the graph's deterministic order: the same spec always gives the same names.
"""
from __future__ import annotations

import re

from .ir import Graph, reserved as _code_reserved
from .ops import float_source

# the generated code's derived names end in these (h_enc1_buf, dz_enc1_seq, ...)
_DERIVED = re.compile(r"\w+_(?:buf|seq|win|ckpt|final|steps|zero)|work_\w*|const_\w*")
_SOURCES = ("input", "param", "state", "carry", "carry_out")
# the forward op a backward rule's op stands for, where the two differ
_RULE_WORDS = {"slice": "concat", "pad_channels": "slice", "kernel_pad": "kernel_slice",
               "kernel_slice": "kernel_concat", "sum_to": "add", "neg": "sub"}
_MAX_CORE = 24  # longer descriptions keep only their first operand, then only its op


def reserved(name: str) -> bool:
    """A name no value may take: the generated code's own names and patterns."""
    return _code_reserved(name) or _DERIVED.fullmatch(name) is not None


def number_name(value: float) -> str:
    """`const_1_0` for 1.0, `const_neg0_5` for -0.5, `const_1em05` for 1e-05."""
    text = float_source(float(value)).replace("float('", "").replace("')", "")
    text = text.replace("e-", "em").replace("e+", "ep").replace("-", "neg")
    return "const_" + re.sub(r"\W", "_", text.replace(".", "_"))


_COUNTER: re.Pattern | None = None


def _is_counter(nid: str) -> bool:
    """An id made of op names and numbers alone (add_3, dadd_29, d_conv_grad_input_2)."""
    global _COUNTER
    if _COUNTER is None:
        from .ops import OPS
        alt = "|".join(sorted(map(re.escape, OPS), key=len, reverse=True))
        _COUNTER = re.compile(rf"(?:d_?)?(?:{alt})(?:_(?:{alt}|\d+))*")
    return _COUNTER.fullmatch(nid) is not None


class Names:
    """The variable of every node of a graph, and fresh names for buffers."""

    def __init__(self, g: Graph, loc_owner: dict | None = None, cells=()):
        self.g = g
        self.loc_owner = loc_owner or {}
        self.cells = set(cells)
        self.used: set[str] = set()
        self.of: dict[str, str] = {}
        self.core: dict[str, str] = {}  # a described node's name without its instance
        self.inst: dict[str, str | None] = {}
        self.buffers: set[str] = set()
        order = g.order()
        for n in order:
            self.inst[n] = self._instance(n)
        described = []
        for n in order:  # first the names the spec and the compiler chose
            if self._kept(n):
                self.of[n] = self.fresh(n)
            else:
                described.append(n)
        forward = [n for n in described if not g.node(n).grad]
        for n in forward + [n for n in described if g.node(n).grad]:
            self.of[n] = self.fresh(self._describe(n), pattern=g.node(n).op == "const")

    def __getitem__(self, nid: str) -> str:
        return self.of[nid]

    def fresh(self, base: str, pattern: bool = False) -> str:
        """`base`, made a valid identifier not reserved, with `_2`, `_3` ... if taken.

        pattern: base is of one of the patterns the values may not take (const_1_0).
        """
        def bad(name):
            return _code_reserved(name) if pattern else reserved(name)

        base = re.sub(r"\W", "_", base) or "v"
        if base[0].isdigit():
            base = "v_" + base
        if bad(base):
            base += "_v"  # a spec's value named xp, w0 or h_buf
            if bad(base):
                base = "v_" + base  # ... or T_x, loop_h, work_h
        name, k = base, 1
        while name in self.used or bad(name):
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    # ------------------------------------------------------------ which instance
    def _instance(self, n: str) -> str | None:
        """The cell instance a node is computed in (None: the model's own statements)."""
        node = self.g.node(n)
        inst = node.attrs.get("_instance")
        if inst:
            return inst
        if node.op == "param":
            head = node.attrs.get("name", "").split(".")[0]
            return head if head in self.cells and "." in node.attrs.get("name", "") else None
        if node.op in ("carry", "carry_out"):
            return self.inst.get(node.attrs.get("read"))
        if node.loc not in self.loc_owner:
            return None  # a model-level statement
        ins = [self.inst.get(i) for i in node.inputs]
        params = [x for i, x in zip(node.inputs, ins) if x and self.g.node(i).op == "param"]
        if params:
            return params[0]
        found = [x for x in ins if x]
        if found:
            return max(dict.fromkeys(found), key=found.count)
        return self.loc_owner.get(node.loc)

    # ------------------------------------------------------------ the patterns
    def _kept(self, n: str) -> bool:
        """Is the node's id already its name (the spec's, or a role's: h_enc1_prev)?"""
        node = self.g.node(n)
        if node.op in _SOURCES:
            return True
        if node.grad or node.op == "const":
            return False
        if node.attrs.get("_named"):
            return True
        return node.seg is None and not _is_counter(n)  # a weight's slice W_out_0_8

    def short(self, i: str, inst: str | None) -> str:
        """An operand's name as a description inside `inst` writes it."""
        name = self.core.get(i) or self.of[i]
        if inst and self.inst.get(i) == inst:
            m = re.fullmatch(rf"(\w+?)_{re.escape(inst)}((?:_prev|_next|_init)?)", name)
            if m:
                return m.group(1) + m.group(2)
            if name.startswith(inst + "_"):
                return name[len(inst) + 1:]
        return name

    def _describe(self, n: str) -> str:
        node = self.g.node(n)
        if node.op == "const":
            return number_name(node.attrs["value"])
        inst = self.inst[n]
        if node.grad:
            named = self._cotangent(n)
            if named:
                return named
        # the weights (parameters, their slices, constants) go unsaid where data is read
        static = [self.g.node(i).seg is None and not self.g.node(i).grad for i in node.inputs]
        args = [i for i, s in zip(node.inputs, static) if not s] or \
            [i for i in node.inputs if self.g.node(i).op != "const"]
        shorts = [self.short(i, inst) for i in dict.fromkeys(args)]
        word = node.op
        core = "_".join([word] + shorts[:2])
        if len(core) > _MAX_CORE:
            core = "_".join([word] + shorts[:1])
        if len(core) > _MAX_CORE + 4 and args:
            core = f"{word}_{self.g.node(args[0]).op}"
        self.core[n] = core
        return f"{core}_{inst}" if inst else core

    def _cotangent(self, n: str) -> str | None:
        """dv for the cotangent of v; dv_via_<op> for a part of it; None otherwise."""
        fwd = self._differentiates(n)
        if fwd is not None:
            return "d" + self.of[fwd]
        users = self.g.consumers(n)
        if len(users) == 1:
            target = self._differentiates(users[0])
            if target is not None:
                op = self.g.node(n).op
                word = re.sub(r"_grad(_input|_weight)?$", "", op)
                return f"d{self.of[target]}_via_{_RULE_WORDS.get(op, word)}"
        return None

    def _differentiates(self, n: str) -> str | None:
        """The forward value whose cotangent node n is (autodiff names it d<id>)."""
        node = self.g.node(n)
        if not node.grad or node.op in _SOURCES or not n.startswith("d"):
            return None
        fwd = n[1:]
        if fwd in self.g and not self.g.node(fwd).grad and fwd in self.of:
            return fwd
        return None

    # ------------------------------------------------------------ a function's buffers
    def begin_function(self) -> None:
        """Buffer names are unique within one generated function."""
        self.buffers: set[str] = set()

    def work_buffer(self, held: list[str]) -> str:
        """`work_<value>` for a work buffer holding `held` (node ids, in order): after
        the first value the spec names, else the first value."""
        named = [n for n in held if self.g.node(n).attrs.get("_named")]
        base = "work_" + self.of[(named or held)[0]]
        name, k = base, 1
        while name in self.buffers or name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.buffers.add(name)
        return name
