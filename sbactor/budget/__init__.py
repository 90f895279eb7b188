"""Predictive budgets: the pure core (windows, scopes, reservations, soft landing, forecast).

Everything here is sync and I/O-free; ``sbactor.actors.budget_tracker`` is the async shell.
"""
