"""The request pipeline: auth → parse → guardrails → budget → policy → route → dispatch → event."""
