#!/bin/busybox sh
# Guest /init of bench_vs_virtiofsd: measures /bench (the vhost-user-fs
# device under test) with busybox and prints `BENCH <name> <value> <unit>`.
# Times come from /proc/uptime (10 ms steps): busybox date has no %N.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo 1 > /proc/sys/kernel/printk
$B mkdir -p /bench
$B mount -t virtiofs bench /bench || { echo "BENCH-FAIL mount"; $B reboot -f; }
D=/bench
FILES=@FILES@
RAND_OPS=@RAND_OPS@
now() { read -r up _ < /proc/uptime; echo $(( ${up%.*} * 100 + 1${up#*.} - 100 )); }
# net <name> <count> <elapsed cs> <baseline cs> <unit>: the rate without
# the fork+exec baseline, or a note when the difference is below noise.
net() {
  d=$(( $3 - $4 ))
  if [ $d -gt 0 ]; then echo "BENCH $1 $(( $2 * 100 / d )) $5"; else echo "BENCH-NOTE $1 below timer noise (${3}cs vs baseline ${4}cs)"; fi
}
# rate <count> <start cs> <end cs> -> count per second
rate() { d=$(( $3 - $2 )); [ $d -le 0 ] && d=1; echo $(( $1 * 100 / d )); }
ms() { echo $(( ($2 - $1) * 10 )); }
drop() { $B sync; echo 3 > /proc/sys/vm/drop_caches; }
echo BENCH-START

drop; t0=$(now)
$B dd if=/dev/zero of=$D/seq bs=1M count=64 conv=fsync 2>/dev/null || echo "BENCH-FAIL seq_write"
t1=$(now)
echo "BENCH seq_write_64MiB_fsync $(rate 65536 $t0 $t1) KiB/s"
drop; t0=$(now)
$B dd if=$D/seq of=/dev/null bs=1M 2>/dev/null || echo "BENCH-FAIL seq_read"
t1=$(now)
echo "BENCH seq_read_64MiB_cold $(rate 65536 $t0 $t1) KiB/s"

# Random 4 KiB: one dd per operation (O_DIRECT), minus the cost of the
# same dd loop on /dev/zero (fork+exec under TCG dominates).
i=0; t0=$(now)
while [ $i -lt $RAND_OPS ]; do $B dd if=/dev/zero of=/dev/null bs=4k count=1 2>/dev/null; i=$((i+1)); done
t1=$(now); base=$(( t1 - t0 ))
echo "BENCH dd_exec_baseline_per_op $(( base * 10000 / RAND_OPS )) us"
drop; i=0; t0=$(now)
while [ $i -lt $RAND_OPS ]; do
  $B dd if=$D/seq of=/dev/null bs=4k count=1 skip=$((RANDOM % 16384)) iflag=direct 2>/dev/null || echo "BENCH-FAIL rand_read"
  i=$((i+1))
done
t1=$(now)
echo "BENCH rand_read_4k_per_op $(( (t1 - t0) * 10000 / RAND_OPS )) us"
net rand_read_4k_net $RAND_OPS $(( t1 - t0 )) $base IOPS
i=0; t0=$(now)
while [ $i -lt $RAND_OPS ]; do
  $B dd if=/dev/zero of=$D/seq bs=4k count=1 seek=$((RANDOM % 16384)) conv=notrunc,fsync oflag=direct 2>/dev/null || echo "BENCH-FAIL rand_write"
  i=$((i+1))
done
t1=$(now)
echo "BENCH rand_write_4k_fsync_per_op $(( (t1 - t0) * 10000 / RAND_OPS )) us"
net rand_write_4k_fsync_net $RAND_OPS $(( t1 - t0 )) $base IOPS
$B rm -f $D/seq

# Metadata: create, stat (cold dentry cache) and unlink of $FILES files;
# the loops are shell builtins (no fork), unlink is one `rm -rf`.
$B mkdir $D/m
i=0; t0=$(now)
while [ $i -lt $FILES ]; do : > $D/m/f$i; i=$((i+1)); done
t1=$(now)
echo "BENCH create_files $(rate $FILES $t0 $t1) files/s"
drop; i=0; t0=$(now)
while [ $i -lt $FILES ]; do [ -e $D/m/f$i ] || echo "BENCH-FAIL stat f$i"; i=$((i+1)); done
t1=$(now)
echo "BENCH stat_files_cold $(rate $FILES $t0 $t1) files/s"
t0=$(now)
$B rm -rf $D/m
t1=$(now)
echo "BENCH unlink_files $(rate $FILES $t0 $t1) files/s"
echo BENCH-DONE
$B sync
$B umount /bench
$B reboot -f
