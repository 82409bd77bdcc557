"""The generic saga kernel: the pure state machine, the engine that applies it, the sweeper."""
