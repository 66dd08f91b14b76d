"""Typed errors. Library code raises these; the CLI prints one line and exits 2."""


class BenchmarkError(Exception):
    """Base class: the message names the problem and the fix."""


class DataError(BenchmarkError):
    """A dataset is missing, malformed, or empty after preprocessing."""


class ConfigError(BenchmarkError):
    """An unknown method, dataset, protocol or hyperparameter, or a bad value."""


class StoreError(BenchmarkError):
    """The run store is missing something or holds inconsistent results."""


class ModelLoadError(BenchmarkError):
    """A language model or its tokenizer cannot be loaded."""


class MethodError(BenchmarkError):
    """A method returned an invalid ranking (duplicates, unseen users, items outside candidates)."""


class IntegrityError(StoreError):
    """A stored or published result fails a check: a value out of range, users missing, means that do not
    match the per-user values, or metrics that its rankings do not reproduce."""


class PublishConflict(StoreError):
    """Local results clash with a published leaderboard (same label, or another split or candidate set)."""
