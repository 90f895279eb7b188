"""Usage events and the sinks that receive them."""
