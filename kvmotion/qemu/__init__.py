"""VM spec to QEMU process: command line, accelerator choice, supervision, QMP, socket tuning."""
