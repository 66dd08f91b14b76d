"""Scoring: per-user metrics and significance statistics."""
