"""Control plane: cluster CA, inventory, placement and balancing."""
