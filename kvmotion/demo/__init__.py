"""`kvmotion demo`: the whole vMotion story on one machine — a lab cluster, a VM with a service and
writers, a client probing it, a round of live migrations, a checked report and a picture."""
