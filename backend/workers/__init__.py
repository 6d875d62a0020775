"""The worker runtime and the three Dragonfly workers."""
