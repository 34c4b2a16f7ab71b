"""The policy file: strict validation into frozen dataclasses; connection strings; units."""
