"""convc: a compiler and runtime for recurrent convolutional networks.

Write a model in a `.cell` file, compile it to a readable Python module with
a generated backward pass through time, and train it on NumPy or CuPy.

    >>> import convc
    >>> m = convc.load("examples/seed.cell")       # doctest: +SKIP
    >>> params = m.init_params(seed=0)             # doctest: +SKIP
    >>> result = m.train(steps=100, out="runs/seed")   # doctest: +SKIP
"""

__version__ = "0.1.0"

# ConvLSTM weights to and from other implementations' layouts (docs/weights.md)
_LAYOUTS = ("from_keras_convlstm2d", "to_keras_convlstm2d", "from_torch_convlstm",
            "to_torch_convlstm", "from_peer", "to_peer")

__all__ = ["__version__", "load", "import_generated", "save_params", "load_params",
           *_LAYOUTS]


def __getattr__(name: str):
    # Lazy, so that `import convc` (and `convc --help`) does not import the
    # compiler, lark, networkx and NumPy before they are needed.
    if name in ("load", "import_generated", "save_params", "load_params"):
        from convc import api

        return getattr(api, name)
    if name in _LAYOUTS:
        from convc.runtime import layouts

        return getattr(layouts, name)
    raise AttributeError(f"module 'convc' has no attribute {name!r}")
