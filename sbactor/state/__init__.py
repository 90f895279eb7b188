"""Shared state across workers and instances (``state.backend: redis``)."""
