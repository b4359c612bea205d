"""shardmove: the core (no Beam), configuration, graph construction and the CLI."""
