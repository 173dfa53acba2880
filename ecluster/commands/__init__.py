"""CLI command areas: one module per area, each with ``register(app)``.

:mod:`ecluster.cli` imports every module of this package (except ``common``) and calls
its ``register``, so a new area is a new file here, not an edit elsewhere.
"""
