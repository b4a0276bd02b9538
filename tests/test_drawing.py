"""reparam.drawing: a block's graph drawn before and after fusion (Graphviz source, Graphviz, matplotlib)."""

import os
import sys

import pytest
import torch
import torch.nn as nn

import reparam
import reparam.models as zoo
from reparam import drawing, errors


@pytest.fixture(scope="module")
def digits():
    """A tiny zoo model."""
    torch.manual_seed(0)
    return zoo.create("repvgg_digits").eval()


@pytest.fixture(scope="module")
def block_graphs(digits):
    block = digits.get_submodule("stage1.1")
    x = torch.randn(1, 32, 4, 4)
    return {"before": torch.fx.symbolic_trace(block), "after": reparam.fuse(block, (x,))}


def test_find_branch_block(digits):
    assert drawing.find_branch_block(digits) == "stage0"
    assert drawing.find_branch_block(nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()))) is None


def test_graph_to_dot(block_graphs):
    dot = drawing.graph_to_dot(block_graphs)
    assert dot.startswith("digraph") and dot.count("subgraph cluster_") == 2
    assert 'label="before"' in dot and 'label="after"' in dot
    assert "Conv2d 3×3 32→32" in dot and "BatchNorm2d" in dot and "add" in dot
    before, after = dot.split("subgraph cluster_1")
    assert "BatchNorm2d" not in after and after.count("Conv2d") == 1


def test_draw_graphs_dot_source(tmp_path, block_graphs):
    assert drawing.draw_graphs(block_graphs, tmp_path / "g.dot") == "graphviz source"
    assert (tmp_path / "g.dot").read_text() == drawing.graph_to_dot(block_graphs)


def test_draw_graphs_with_graphviz(tmp_path, block_graphs, monkeypatch):
    """A stand-in `dot` on PATH receives the source and the format, and writes the -o file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dot"
    fake.write_text('#!/bin/sh\n# usage: dot -Tfmt -o out\ncat > "$3"\necho "$1" >> "$3"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert drawing.draw_graphs(block_graphs, tmp_path / "g.svg") == "graphviz"
    text = (tmp_path / "g.svg").read_text()
    assert text.startswith("digraph") and text.rstrip().endswith("-Tsvg")


def test_draw_graphs_with_matplotlib(tmp_path, block_graphs, monkeypatch):
    """matplotlib is in the test extra: this runs (it fails, not skips, without it)."""
    import matplotlib.image

    monkeypatch.setattr(drawing.shutil, "which", lambda name: None)
    assert drawing.draw_graphs(block_graphs, tmp_path / "g.png") == "matplotlib"
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
    pixels = matplotlib.image.imread(tmp_path / "g.png")
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels[..., :3].std() > 0.01  # something is drawn


def test_draw_graphs_without_a_renderer(tmp_path, block_graphs, monkeypatch):
    monkeypatch.setattr(drawing.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        errors.GraphDrawingError, match="pip install matplotlib.*graphviz|graphviz.*pip install matplotlib"
    ):
        drawing.draw_graphs(block_graphs, tmp_path / "g.svg")
    with pytest.raises(errors.GraphDrawingError, match="unknown file type"):
        drawing.draw_graphs(block_graphs, tmp_path / "g.txt")
    assert list(tmp_path.iterdir()) == []
