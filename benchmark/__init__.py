"""A benchmark and evaluation harness for LLM-based sequential recommenders."""

__version__ = "0.1.0"
