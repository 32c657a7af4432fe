"""A hostile node for tests: fedfull's ClientApp, with replies corrupted on the node of partition 1."""
