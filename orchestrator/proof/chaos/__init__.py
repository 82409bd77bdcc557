"""``sagactl chaos``: the system under load, faults and kills, then every invariant."""
