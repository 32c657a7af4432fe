"""fedfull's Flower App: the ServerApp runs a script's round loop, the ClientApp its per-client function."""
