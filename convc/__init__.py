"""convc: a compiler and runtime for recurrent convolutional networks.

Write a model in a `.cell` file, compile it to a readable Python module with
a generated backward pass through time, and train it on NumPy or CuPy.

    >>> import convc
    >>> m = convc.load("examples/seed.cell")       # doctest: +SKIP
    >>> params = m.init_params(seed=0)             # doctest: +SKIP
"""

__version__ = "0.1.0"
