"""shardmove Beam transforms (PTransforms and DoFns wrapping the core)."""
