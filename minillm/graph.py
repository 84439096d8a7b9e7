"""A learner's view of the computation graph: a text tree or Graphviz DOT.

    >>> x = mm.Tensor(np.ones((2, 3)), requires_grad=True, name="x")
    >>> print(mm.draw_graph((x * 2).sum()))
    Sum -> () float64
    └── Mul -> (2, 3) float64
        ├── x (2, 3) float64  [requires grad]
        └── const () float64

No graphviz dependency: paste the DOT text into any Graphviz viewer.
"""

from __future__ import annotations

from .tensor import Tensor


def _label(t: Tensor) -> str:
    shape = tuple(t.shape)
    if t._ctx is not None:
        return f"{t._ctx.name} -> {shape} {t.dtype}"
    name = t.name or ("leaf" if t.requires_grad else "const")
    flag = "  [requires grad]" if t.requires_grad else ""
    return f"{name} {shape} {t.dtype}{flag}"


def _text(root: Tensor) -> str:
    lines: list[str] = []
    seen: set[int] = set()
    stack = [(root, "", "")]  # tensor, prefix for this line, prefix for children
    while stack:
        t, prefix, child_prefix = stack.pop()
        key = id(t._ctx) if t._ctx is not None else id(t)
        if key in seen and t._ctx is not None:
            lines.append(f"{prefix}{_label(t)}  (shared, shown above)")
            continue
        seen.add(key)
        lines.append(prefix + _label(t))
        children = list(t._ctx.inputs) if t._ctx is not None else []
        for i in reversed(range(len(children))):
            last = i == len(children) - 1
            stack.append((children[i], child_prefix + ("└── " if last else "├── "),
                          child_prefix + ("    " if last else "│   ")))
    return "\n".join(lines)


def _dot(root: Tensor) -> str:
    lines = ["digraph minillm {", "  rankdir=BT;", '  node [fontname="monospace"];']
    ids: dict[int, str] = {}
    stack = [root]
    while stack:
        t = stack.pop()
        key = id(t._ctx) if t._ctx is not None else id(t)
        if key in ids:
            continue
        node = f"n{len(ids)}"
        ids[key] = node
        shape = "box" if t._ctx is not None else "ellipse"
        style = ', style=filled, fillcolor="#dde8ff"' if t.requires_grad and t._ctx is None else ""
        lines.append(f'  {node} [label="{_label(t)}", shape={shape}{style}];')
        if t._ctx is not None:
            stack.extend(t._ctx.inputs)
    stack = [root]
    done: set[int] = set()
    while stack:
        t = stack.pop()
        if t._ctx is None or id(t._ctx) in done:
            continue
        done.add(id(t._ctx))
        for parent in t._ctx.inputs:
            pkey = id(parent._ctx) if parent._ctx is not None else id(parent)
            lines.append(f"  {ids[pkey]} -> {ids[id(t._ctx)]};")
            stack.append(parent)
    lines.append("}")
    return "\n".join(lines)


def draw_graph(tensor: Tensor, format: str = "text") -> str:
    """The graph that produced ``tensor``: ``format="text"`` (a tree) or ``"dot"`` (Graphviz).

    Each op node shows its name and output shape/dtype; leaves show their name,
    shape and whether they require grad. Call it before ``backward()``, which
    frees the graph.
    """
    if format == "text":
        return _text(tensor)
    if format == "dot":
        return _dot(tensor)
    raise ValueError(f"draw_graph: format must be 'text' or 'dot', got {format!r}")
