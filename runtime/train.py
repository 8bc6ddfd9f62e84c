"""Training loop (placeholder until the full loop lands)."""


def train(mod, params=None, **options):
    raise NotImplementedError
