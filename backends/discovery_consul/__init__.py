"""The Consul backend (being built)."""
