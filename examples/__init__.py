"""The example `.cell` files shipped with convc, importable by path."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """Path of a shipped example, e.g. ``path("seed")`` -> .../seed.cell."""
    if not name.endswith(".cell"):
        name += ".cell"
    return HERE / name
