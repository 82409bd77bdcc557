"""Operating the system: the CLI, settings, logs, health, metrics, processes, audit."""
