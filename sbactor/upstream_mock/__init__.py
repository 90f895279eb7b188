"""The mock upstream: scenario rules (pure) and the standalone ``sbactor mock-upstream`` server."""
