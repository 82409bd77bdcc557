"""Saga orchestration: the state machine, the engine, the outbox relay and the CLI."""
