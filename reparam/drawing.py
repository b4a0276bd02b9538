"""Drawings of a block's graph before and after fusion (``reparam inspect --graph``).

- :func:`find_branch_block` picks the first innermost submodule whose graph joins branches (add / cat).
- :func:`graph_to_dot` writes Graphviz source for several fx graphs side by side.
- :func:`draw_graphs` draws them into a ``.dot``, ``.svg``, ``.png`` or ``.pdf`` file (Graphviz's ``dot`` when it
  is on PATH, else matplotlib), written atomically; :func:`graph_renderer` says beforehand which renderer it will
  use, or raises :class:`~reparam.errors.GraphDrawingError` naming what to install.
"""

from __future__ import annotations

import operator
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from reparam.errors import GraphDrawingError
from reparam.io import atomic_write

__all__ = ["find_branch_block", "graph_to_dot", "draw_graphs", "graph_renderer"]


_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat, torch.stack}


def _is_merge(node: fx.Node) -> bool:
    """A node that joins several tensor branches (add / cat)."""
    joins = node.target in _ADD_TARGETS or (node.op == "call_method" and node.target in ("add", "add_"))
    if not joins:
        return False
    inputs = [a for a in tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]
    return len(inputs) >= 2


def _traced_branchy(module: torch.nn.Module) -> bool:
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001  tracing runs the module's own forward: whatever it raises, fx cannot trace
        return False  # it, so it is no block to draw (the user can name one with --block, which reports why)
    return any(_is_merge(n) for n in graph.nodes)


def find_branch_block(model: torch.nn.Module) -> str | None:
    """Qualified name of the first innermost submodule whose graph joins branches (add / cat), or None.

    Walks the module tree in definition order; a branchy module whose own children include a branchy one is
    descended into, so a stage yields its first block and a block its first branchy sub-block.
    """

    def search(module: torch.nn.Module, prefix: str) -> str | None:
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            if not any(True for _ in child.children()) or not _traced_branchy(child):
                continue
            return search(child, qualified + ".") or qualified
        return None

    return search(model, "")


def _node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"input {node.target}"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        label = type(module).__name__
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            kernel = "×".join(str(k) for k in module.kernel_size)
            label += f" {kernel} {module.in_channels}→{module.out_channels}"
            if module.stride != (1,) * len(module.stride):
                label += f" s{module.stride[0]}"
            if module.groups != 1:
                label += f" g{module.groups}"
        return label
    name = getattr(node.target, "__name__", str(node.target))
    return name


def _drawable_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes worth drawing: everything but constant fetches (``get_attr``)."""
    return [n for n in gm.graph.nodes if n.op != "get_attr"]


def _edges(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    keep = set(_drawable_nodes(gm))
    return [(a, n) for n in keep for a in n.all_input_nodes if a in keep]


def graph_to_dot(graphs: Mapping[str, fx.GraphModule]) -> str:
    """Graphviz source drawing each graph of ``graphs`` (title -> GraphModule) side by side, as clusters."""
    lines = [
        "digraph reparam {",
        '  rankdir=TB; node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];',
    ]
    for index, (title, gm) in enumerate(graphs.items()):
        ids = {n: f"g{index}_{i}" for i, n in enumerate(_drawable_nodes(gm))}
        lines.append(f'  subgraph cluster_{index} {{ label="{_escape(title)}"; fontname="Helvetica";')
        for node, ident in ids.items():
            lines.append(f'    {ident} [label="{_escape(_node_label(gm, node))}"];')
        for a, b in _edges(gm):
            lines.append(f"    {ids[a]} -> {ids[b]};")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


_RENDER_FORMATS = ("svg", "png", "pdf")


def draw_graphs(graphs: Mapping[str, fx.GraphModule], path: str | os.PathLike) -> str:
    """Draw ``graphs`` (title -> GraphModule) side by side into ``path``; returns the renderer used.

    ``.dot`` writes the Graphviz source (no dependency).  ``.svg`` / ``.png`` / ``.pdf`` use Graphviz's ``dot``
    when it is on PATH, else matplotlib when installed, else raise :class:`GraphDrawingError` saying what to
    install.  The file is written atomically.
    """
    path = Path(path)
    renderer = graph_renderer(path)
    fmt = path.suffix.lower().lstrip(".")
    if renderer == "graphviz source":
        atomic_write(path, lambda tmp: tmp.write_text(graph_to_dot(graphs)))
    elif renderer == "graphviz":
        source = graph_to_dot(graphs)
        atomic_write(path, lambda tmp: _run_dot(shutil.which("dot"), fmt, source, tmp))
    else:
        import matplotlib

        matplotlib.use("Agg", force=False)
        atomic_write(path, lambda tmp: _draw_matplotlib(graphs, tmp, fmt))
    return renderer


def graph_renderer(path: str | os.PathLike) -> str:
    """How :func:`draw_graphs` would draw into ``path``: ``"graphviz source"``, ``"graphviz"`` or ``"matplotlib"``.

    Raises :class:`GraphDrawingError` for an unknown file type or when no renderer is installed, so a caller can
    check before doing any work.
    """
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt == "dot":
        return "graphviz source"
    if fmt not in _RENDER_FORMATS:
        raise GraphDrawingError(
            f"cannot draw to {Path(path).name}: unknown file type. Use a .svg, .png, .pdf or .dot file name"
        )
    if shutil.which("dot") is not None:
        return "graphviz"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GraphDrawingError(
            "drawing a graph needs Graphviz or matplotlib, and neither is installed. "
            "Install one (`apt install graphviz` or `pip install matplotlib`), "
            "or write Graphviz source with --graph FILE.dot"
        ) from None
    return "matplotlib"


def _run_dot(dot: str, fmt: str, source: str, out: Path) -> None:
    result = subprocess.run(
        [dot, f"-T{fmt}", "-o", str(out)], input=source, text=True, capture_output=True, timeout=120
    )
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[0] if result.stderr.strip() else f"exit code {result.returncode}"
        raise GraphDrawingError(
            f"Graphviz failed ({reason}). Write the source with --graph FILE.dot and render it yourself"
        )


def _layout(gm: fx.GraphModule) -> dict[fx.Node, tuple[float, float]]:
    """Layered layout: a node's row is its longest distance from an input, columns spread each row."""
    nodes = _drawable_nodes(gm)
    depth: dict[fx.Node, int] = {}
    for node in nodes:  # graph order is topological
        parents = [depth[a] for a in node.all_input_nodes if a in depth]
        depth[node] = 1 + max(parents) if parents else 0
    rows: dict[int, list[fx.Node]] = {}
    for node in nodes:
        rows.setdefault(depth[node], []).append(node)
    return {node: (i - (len(row) - 1) / 2, -d) for d, row in rows.items() for i, node in enumerate(row)}


def _draw_matplotlib(graphs: Mapping[str, fx.GraphModule], out: Path, fmt: str) -> None:
    import matplotlib.pyplot as plt

    layouts = {title: _layout(gm) for title, gm in graphs.items()}
    points = [p for lay in layouts.values() for p in lay.values()] or [(0.0, 0.0)]
    lowest = min(y for _, y in points)
    widths = [1 + 2 * max((abs(x) for x, _ in lay.values()), default=0) for lay in layouts.values()]
    figsize = (max(4.0, 2.4 * sum(widths)), max(3.0, 0.8 * (1 - lowest)))
    fig, axes = plt.subplots(1, len(graphs), figsize=figsize, squeeze=False, gridspec_kw={"width_ratios": widths})
    for ax, width, (title, gm) in zip(axes[0], widths, graphs.items(), strict=True):
        positions = layouts[title]
        for a, b in _edges(gm):
            (x0, y0), (x1, y1) = positions[a], positions[b]
            ax.annotate(
                "", xy=(x1, y1 + 0.18), xytext=(x0, y0 - 0.18), arrowprops={"arrowstyle": "->", "color": "#555"}
            )
        for node, (x, y) in positions.items():
            ax.text(
                x,
                y,
                _node_label(gm, node),
                ha="center",
                va="center",
                fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "#eef3fb", "edgecolor": "#4a6fa5"},
            )
        ax.set_xlim(-width / 2 - 0.5, width / 2 + 0.5)
        ax.set_ylim(lowest - 0.6, 0.6)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, format=fmt)
    plt.close(fig)
