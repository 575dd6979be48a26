"""Migration between agents: protocol, phases, convergence policy, switchover hooks, statistics."""
