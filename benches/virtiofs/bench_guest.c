/*
 * Guest half of bench_vs_virtiofsd: the guest's /init (PID 1 of an
 * initramfs, built with `gcc -static -O2` by the host half).
 *
 * Mounts the two devices under test (tags `bench0` and `bench1`, one per
 * daemon) on /b0 and /b1 and the Debian root (tag `root`, read-only) on
 * /debian. Every line runs in segments that alternate between the two
 * devices in ABBA order (0 1 1 0 0 1 ...), so a burst of host load hits
 * both daemons alike; each device's median segment is its figure. Output:
 * `BENCH <device> <name> <value> <unit>`, `BENCH-FAIL <what>` on errors
 * and `BENCH-DONE` at the end; then it reboots (QEMU runs with
 * -no-reboot, so it exits).
 *
 * Parameters come from the kernel command line as environment variables:
 * BENCH_SEQ_MIB (size of the sequential file, 1024), BENCH_RAND_OPS (random
 * 4 KiB operations per line, 20000), BENCH_FILES (files for the metadata
 * lines, 10000), BENCH_GIT_RUNS (warm `git status` runs, 5),
 * BENCH_GIT_COLD_RUNS (cold `git status` runs, 3), BENCH_SEGMENTS
 * (segments per line and device, 5). Every line alternates which device
 * goes first (ABBA), and the host swaps the devices' daemons on odd boots.
 *
 * Random offsets come from a fixed-seed xorshift per device, so both
 * daemons see the same requests.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024 * 1024)
#define BLOCK 4096
#define MAX_SEGMENTS 16
#define DEVS 2
#define READ_PASSES 4

static const char *const mnt[DEVS] = {"/b0", "/b1"};
static long segments = 5;
static int failures;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static long env_long(const char *name, long fallback)
{
	const char *v = getenv(name);
	long n = v ? strtol(v, NULL, 10) : 0;
	return n > 0 ? n : fallback;
}

static void fail(const char *what)
{
	printf("BENCH-FAIL %s: %s\n", what, strerror(errno));
	fflush(stdout);
	failures++;
}

#define FAIL_RETURN(what) \
	do { \
		fail(what); \
		return; \
	} while (0)

/* The device of the k-th run (k = 0, 1) of segment s: ABBA order. */
static int dev_at(long s, int k)
{
	return s % 2 ? DEVS - 1 - k : k;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double median(double *v, long n)
{
	qsort(v, n, sizeof(double), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Prints each device's median of its `n` values. */
static void results(const char *name, double v[DEVS][MAX_SEGMENTS], long n, const char *unit)
{
	for (int d = 0; d < DEVS; d++)
		printf("BENCH %d %s %.1f %s\n", d, name, median(v[d], n), unit);
	fflush(stdout);
}

static void drop_caches(void)
{
	sync();
	int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
	if (fd < 0 || write(fd, "3\n", 2) != 2)
		fail("drop_caches");
	if (fd >= 0)
		close(fd);
}

/* Opens `name` on every device with `flags`; false (and a failure) if one fails. */
static int open_all(int fd[DEVS], const char *name, int flags)
{
	char path[256];
	for (int d = 0; d < DEVS; d++) {
		snprintf(path, sizeof(path), "%s/%s", mnt[d], name);
		fd[d] = open(path, flags, 0644);
		if (fd[d] < 0) {
			fail(path);
			while (d-- > 0)
				close(fd[d]);
			return 0;
		}
	}
	return 1;
}

static void close_all(int fd[DEVS])
{
	for (int d = 0; d < DEVS; d++)
		close(fd[d]);
}

/* Sequential 1 MiB writes, then (cold) reads, of `mib` MiB per device. */
static void seq_io(long mib, int writing, char *buf)
{
	double rate[DEVS][MAX_SEGMENTS];
	long per = mib / segments;
	int fd[DEVS];
	if (!writing)
		drop_caches();
	if (!open_all(fd, "seq", writing ? O_WRONLY | O_CREAT | O_TRUNC : O_RDONLY))
		return;
	for (long s = 0; s < segments; s++) {
		for (int k = 0; k < DEVS; k++) {
			int d = dev_at(s, k);
			/* Reads are fast enough that one pass over a segment lasts a
			 * few guest clock ticks (4 ms): read it READ_PASSES times. */
			int passes = writing ? 1 : READ_PASSES;
			double t0 = now();
			for (int p = 0; p < passes; p++) {
				off_t start = (off_t)s * per * MIB;
				for (long i = 0; i < per; i++) {
					ssize_t n = writing ? write(fd[d], buf, MIB)
							    : pread(fd[d], buf, MIB, start + (off_t)i * MIB);
					if (n != MIB) {
						close_all(fd);
						FAIL_RETURN(writing ? "seq_write" : "seq_read");
					}
				}
			}
			rate[d][s] = (double)per * passes / (now() - t0);
		}
	}
	/* Untimed: how fast the host's disk flushes is not the daemon's doing. */
	for (int d = 0; writing && d < DEVS; d++)
		if (fsync(fd[d]) < 0)
			fail("seq_write fsync");
	close_all(fd);
	results(writing ? "seq_write_1MiB" : "seq_read_1MiB_cold", rate, segments, "MiB/s");
}

static uint64_t next_rand(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

/* `ops` random 4 KiB preads (cold) or pwrites per device in the seq file. */
static void rand_io(long mib, long ops, int writing, char *buf)
{
	double rate[DEVS][MAX_SEGMENTS];
	long per = ops / segments;
	uint64_t blocks = (uint64_t)mib * MIB / BLOCK;
	uint64_t rng[DEVS];
	int fd[DEVS];
	for (int d = 0; d < DEVS; d++)
		rng[d] = writing ? 0x2545f4914f6cdd1dull : 0x9e3779b97f4a7c15ull;
	if (!writing)
		drop_caches();
	if (!open_all(fd, "seq", writing ? O_WRONLY : O_RDONLY))
		return;
	for (long s = 0; s < segments; s++) {
		for (int k = 0; k < DEVS; k++) {
			int d = dev_at(s, k);
			double t0 = now();
			for (long i = 0; i < per; i++) {
				off_t off = (off_t)(next_rand(&rng[d]) % blocks) * BLOCK;
				ssize_t n = writing ? pwrite(fd[d], buf, BLOCK, off)
						    : pread(fd[d], buf, BLOCK, off);
				if (n != BLOCK) {
					close_all(fd);
					FAIL_RETURN(writing ? "rand_write" : "rand_read");
				}
			}
			rate[d][s] = (double)per / (now() - t0);
		}
	}
	for (int d = 0; writing && d < DEVS; d++)
		if (fsync(fd[d]) < 0)
			fail("rand_write fsync");
	close_all(fd);
	results(writing ? "rand_write_4KiB" : "rand_read_4KiB", rate, segments, "IOPS");
}

enum meta_op { CREATE, STAT, UNLINK };

/* One metadata line over files m/f0 .. m/f<files-1> of each device. */
static void meta_line(const char *name, long files, enum meta_op op)
{
	double rate[DEVS][MAX_SEGMENTS];
	long per = files / segments;
	char path[256];
	struct stat st;
	for (long s = 0; s < segments; s++) {
		for (int k = 0; k < DEVS; k++) {
			int d = dev_at(s, k);
			double t0 = now();
			for (long i = s * per; i < (s + 1) * per; i++) {
				snprintf(path, sizeof(path), "%s/m/f%ld", mnt[d], i);
				int fd, r = 0;
				switch (op) {
				case CREATE:
					fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
					r = fd < 0 ? -1 : close(fd);
					break;
				case STAT:
					r = stat(path, &st);
					break;
				case UNLINK:
					r = unlink(path);
					break;
				}
				if (r < 0)
					FAIL_RETURN(name);
			}
			rate[d][s] = (double)per / (now() - t0);
		}
	}
	results(name, rate, segments, "files/s");
}

static void metadata(long files)
{
	char path[256];
	for (int d = 0; d < DEVS; d++) {
		snprintf(path, sizeof(path), "%s/m", mnt[d]);
		if (mkdir(path, 0755) < 0)
			FAIL_RETURN("mkdir metadata dir");
	}
	meta_line("create_files", files, CREATE);
	drop_caches();
	meta_line("stat_files_cold", files, STAT);
	meta_line("unlink_files", files, UNLINK);
	for (int d = 0; d < DEVS; d++) {
		snprintf(path, sizeof(path), "%s/m", mnt[d]);
		if (rmdir(path) < 0)
			fail("rmdir metadata dir");
	}
}

/*
 * Runs /usr/bin/git with `args` in /mnt/<dev>/repo of the Debian root
 * (chroot); returns its wall time in seconds, or -1. The output goes to a
 * pipe; its size is stored in *out_bytes.
 */
static double run_git(int dev, char *const args[], long *out_bytes)
{
	char dir[64];
	int p[2];
	snprintf(dir, sizeof(dir), "/mnt/%d/repo", dev);
	if (pipe(p) < 0)
		return fail("pipe"), -1;
	double t0 = now();
	pid_t pid = fork();
	if (pid < 0)
		return fail("fork"), -1;
	if (pid == 0) {
		char *envp[] = {"HOME=/tmp", "PATH=/usr/bin:/bin", "LANG=C", "GIT_CONFIG_NOSYSTEM=1",
				NULL};
		dup2(p[1], 1);
		close(p[0]);
		close(p[1]);
		if (chroot("/debian") < 0 || chdir(dir) < 0)
			_exit(126);
		execve("/usr/bin/git", args, envp);
		_exit(127);
	}
	close(p[1]);
	char buf[4096];
	long bytes = 0;
	ssize_t n;
	while ((n = read(p[0], buf, sizeof(buf))) > 0)
		bytes += n;
	close(p[0]);
	int status = 0;
	waitpid(pid, &status, 0);
	double dt = now() - t0;
	if (out_bytes)
		*out_bytes = bytes;
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		printf("BENCH-FAIL git %s on device %d exited with status %d\n", args[1], dev, status);
		fflush(stdout);
		failures++;
		return -1;
	}
	return dt;
}

static void git_status(long runs, long cold_runs)
{
	char *version[] = {"git", "--version", NULL};
	char *status[] = {"git", "-c", "safe.directory=*", "status", NULL};
	char *porcelain[] = {"git", "-c", "safe.directory=*", "status", "--porcelain", NULL};
	char path[64];
	if (mount("tmpfs", "/debian/tmp", "tmpfs", 0, "size=64m") < 0 ||
	    mount("/dev", "/debian/dev", NULL, MS_BIND, NULL) < 0 ||
	    mount("proc", "/debian/proc", "proc", 0, NULL) < 0 ||
	    mount("tmpfs", "/debian/mnt", "tmpfs", 0, "size=1m") < 0)
		FAIL_RETURN("git chroot mounts");
	for (int d = 0; d < DEVS; d++) {
		snprintf(path, sizeof(path), "/debian/mnt/%d", d);
		if (mkdir(path, 0755) < 0 || mount(mnt[d], path, NULL, MS_BIND, NULL) < 0)
			FAIL_RETURN("git bind mount");
	}
	double cold[DEVS][MAX_SEGMENTS], warm[DEVS][MAX_SEGMENTS];
	if (cold_runs > MAX_SEGMENTS)
		cold_runs = MAX_SEGMENTS;
	/* ABBA like the other lines: which daemon goes first alternates (the
	 * host swaps the devices' daemons on odd boots too). */
	for (long i = 0; i < cold_runs; i++) {
		for (int k = 0; k < DEVS; k++) {
			int d = dev_at(i, k);
			drop_caches();
			/* Loads git and its libraries from the root device, not a device under test. */
			if (run_git(d, version, NULL) < 0 || (cold[d][i] = run_git(d, status, NULL)) < 0)
				return;
			cold[d][i] *= 1000;
		}
	}
	results("git_status_cold", cold, cold_runs, "ms");
	if (runs > MAX_SEGMENTS)
		runs = MAX_SEGMENTS;
	for (long i = 0; i < runs; i++) {
		for (int k = 0; k < DEVS; k++) {
			int d = dev_at(i, k);
			if ((warm[d][i] = run_git(d, status, NULL)) < 0)
				return;
			warm[d][i] *= 1000;
		}
	}
	results("git_status_warm", warm, runs, "ms");
	for (int d = 0; d < DEVS; d++) {
		long bytes = 0;
		if (run_git(d, porcelain, &bytes) >= 0 && bytes != 0) {
			printf("BENCH-FAIL git tree on device %d not clean (%ld bytes of porcelain status)\n",
			       d, bytes);
			failures++;
		}
	}
}

static int mount_all(void)
{
	char tag[16];
	if (mkdir("/debian", 0755) < 0 || mount("root", "/debian", "virtiofs", MS_RDONLY, NULL) < 0) {
		fail("mount root");
		return 0;
	}
	for (int d = 0; d < DEVS; d++) {
		snprintf(tag, sizeof(tag), "bench%d", d);
		if (mkdir(mnt[d], 0755) < 0 || mount(tag, mnt[d], "virtiofs", 0, NULL) < 0) {
			fail(tag);
			return 0;
		}
	}
	return 1;
}

int main(void)
{
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (mount_all()) {
		long mib = env_long("BENCH_SEQ_MIB", 1024);
		long ops = env_long("BENCH_RAND_OPS", 20000);
		long files = env_long("BENCH_FILES", 10000);
		segments = env_long("BENCH_SEGMENTS", 5);
		if (segments > MAX_SEGMENTS)
			segments = MAX_SEGMENTS;
		mib -= mib % segments;
		ops -= ops % segments;
		files -= files % segments;
		char *buf = aligned_alloc(4096, MIB);
		memset(buf, 0x5a, MIB);
		printf("BENCH-START\n");
		seq_io(mib, 1, buf);
		seq_io(mib, 0, buf);
		rand_io(mib, ops, 0, buf);
		rand_io(mib, ops, 1, buf);
		for (int d = 0; d < DEVS; d++) {
			char path[64];
			snprintf(path, sizeof(path), "%s/seq", mnt[d]);
			if (unlink(path) < 0)
				fail("unlink seq");
		}
		metadata(files);
		git_status(env_long("BENCH_GIT_RUNS", 5), env_long("BENCH_GIT_COLD_RUNS", 3));
		printf("BENCH-DONE failures=%d\n", failures);
	}
	fflush(stdout);
	sync();
	reboot(RB_AUTOBOOT);
	return 0;
}
