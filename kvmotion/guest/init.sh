#!/bin/sh
# /init of kvmotion's test guest (busybox sh, PID 1).
# Mounts the basics, loads the virtio drivers, configures the NICs and starts the workloads named on
# the kernel command line (see kvmotion/guest/cmdline.py), prints "KVMOTION READY <workloads>" once
# they all run, then hands over to busybox init, which keeps a shell on the serial console.
export PATH=/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp

failed=""
fail() { # what, reason
	echo "KVMOTION FAILED $1 $2"
	failed="$failed $1"
}

# Drivers, in dependency order (written by the image builder).
while read -r mod; do
	insmod "/lib/modules/$mod.ko" || fail "module" "$mod: insmod failed"
done </etc/kvmotion-modules

workloads=idle
mem_wss=268435456
mem_rate=100000000
mem_stride=1
echo_port=7000
nics=""
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	kvmotion.hostname=*) hostname "${arg#*=}" ;;
	kvmotion.workloads=*) workloads="${arg#*=}" ;;
	kvmotion.mem_wss=*) mem_wss="${arg#*=}" ;;
	kvmotion.mem_rate=*) mem_rate="${arg#*=}" ;;
	kvmotion.mem_stride=*) mem_stride="${arg#*=}" ;;
	kvmotion.echo_port=*) echo_port="${arg#*=}" ;;
	kvmotion.nic[0-9]*=*) nics="$nics ${arg#*=}" ;;
	esac
done

ip link set lo up
for nic in $nics; do
	mac="${nic%%,*}"
	addr="${nic#*,}"
	dev=""
	# virtio_net registers its interfaces while insmod runs; the retry only guards a slow probe.
	for try in 1 2 3 4 5 6 7 8 9 10; do
		for path in /sys/class/net/*; do
			[ "$(cat "$path/address")" = "$mac" ] && dev="${path##*/}"
		done
		[ -n "$dev" ] && break
		sleep 0.2
	done
	if [ -z "$dev" ]; then
		fail "nic" "no interface has MAC $mac"
		continue
	fi
	[ -n "$addr" ] && { ip addr add "$addr" dev "$dev" || fail "nic" "$dev: cannot add $addr"; }
	ip link set "$dev" up || fail "nic" "$dev: cannot bring it up"
done

# Each program returns once it is set up (-b), and runs on in the background.
for w in $(echo "$workloads" | tr ',' ' '); do
	case "$w" in
	idle) ;;
	mem) kvm-mem -b -s "$mem_stride" "$mem_wss" "$mem_rate" || failed="$failed mem" ;;
	echo) kvm-echo -b "$echo_port" || failed="$failed echo" ;;
	disk) kvm-disk -b /dev/vda || failed="$failed disk" ;;
	cpu) kvm-cpu -b || failed="$failed cpu" ;;
	*) fail "$w" "unknown workload" ;;
	esac
done

if [ -z "$failed" ]; then
	echo "KVMOTION READY $workloads"
else
	echo "kvmotion: not ready, failed:$failed (the console has a shell)"
fi
exec /bin/busybox init
