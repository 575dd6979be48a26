"""Guest image: Debian kernel plus an initramfs of busybox and kvmotion's own static workload programs."""
