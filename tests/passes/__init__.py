"""Unit tests of the graph rewrite passes (one module per pass of ``reparam/passes``).

A package, so that ``tests/passes/test_equalize.py`` and ``tests/test_equalize.py`` do not collide as one module.
"""
