"""Labs: a cluster of network namespaces on one machine (kvmotion.net.lab) with kvmotion's services
running in them, for the demo, the benchmarks, the tests and `kvmotion lab up`."""
