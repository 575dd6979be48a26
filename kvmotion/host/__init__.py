"""Host agent: HTTP API, the VMs of one host, its local resources."""
