"""Runtime errors, importable without importing Ray (the CLI catches them)."""


class JobAborted(RuntimeError):
    """The job cannot go on (e.g. every replica fails to load the model); committed work is kept."""
