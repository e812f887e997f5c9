"""Benchmarks (not tests): each writes JSON + markdown to benchmarks/results/ with the command that made it."""
