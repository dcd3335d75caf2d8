/*
 * What the guest kernel costs: run inside a sandbox (`keystone agent exec --
 * ./probe`), prints one JSON object. Built static so that it needs nothing
 * from the guest image but the kernel.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static double spawn_true(int use_vfork)
{
	double t0 = now();
	pid_t c = use_vfork ? vfork() : fork();
	if (c == 0) {
		execl("/bin/true", "true", (char *)0);
		_exit(127);
	}
	if (c < 0)
		return -1;
	waitpid(c, 0, 0);
	return now() - t0;
}

int main(void)
{
	const unsigned long loops = 100000000UL;
	const int syscalls = 2000, forks = 5, execs = 3;
	const size_t pages = 1024;
	volatile unsigned long x = 0;
	double t0, user_loop, syscall_us, fault_us, fork_ms, exec_ms = 0, vexec_ms = 0;

	t0 = now();
	for (unsigned long i = 0; i < loops; i++)
		x += i;
	user_loop = now() - t0;

	t0 = now();
	for (int i = 0; i < syscalls; i++)
		syscall(SYS_getppid);
	syscall_us = (now() - t0) / syscalls * 1e6;

	char *p = mmap(0, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 1;
	t0 = now();
	for (size_t i = 0; i < pages; i++)
		p[i * 4096] = 1;
	fault_us = (now() - t0) / pages * 1e6;

	t0 = now();
	for (int i = 0; i < forks; i++) {
		pid_t c = fork();
		if (c == 0)
			_exit(0);
		waitpid(c, 0, 0);
	}
	fork_ms = (now() - t0) / forks * 1e3;

	for (int i = 0; i < execs; i++) {
		exec_ms += spawn_true(0) / execs * 1e3;
		vexec_ms += spawn_true(1) / execs * 1e3;
	}

	printf("{\"user_loop_1e8_s\": %.3f, \"syscall_us\": %.2f, \"page_fault_us\": %.2f, "
	       "\"fork_exit_wait_ms\": %.2f, \"fork_exec_true_ms\": %.2f, \"vfork_exec_true_ms\": %.2f}\n",
	       user_loop, syscall_us, fault_us, fork_ms, exec_ms, vexec_ms);
	return 0;
}
