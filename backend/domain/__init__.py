"""Dragonfly's business logic, apart from the queue plumbing."""
