/*
 * The bare loops of `task-bench throughput --systems bare,bare-cgroup,bare-sandbox`: what this
 * machine allows for a no-op task when nothing schedules, logs or streams it — only the work a
 * system must do per attempt to run it the way the issue asks. Its rate is a ceiling for any
 * such system here, drover and HyperQueue alike.
 *
 *   bare_noop LEVEL COUNT PROGRAM
 *
 * runs PROGRAM (looked up in PATH; no arguments, the caller's environment) COUNT times, one
 * after another, and prints one JSON line: {"level":..., "tasks":COUNT, "seconds":wall time}.
 * task-bench runs several at once so every core is busy. LEVEL:
 *
 * - `plain`: fork, execve, waitpid. Nothing else.
 * - `cgroup`: plus the attempt's own cgroup, as drover gives every attempt, in each v1
 *   hierarchy mounted of memory, pids and freezer: the pids limit written (512, the task spec's
 *   default; the bench's tasks have no memory limit, so none is written), the child moves itself
 *   in before its exec, and after its end the OOM counter and the peak are read and the cgroup
 *   reset as drover's worker resets a warm cgroup to reuse it (reset_v1). Each loop makes its
 *   cgroup once. Cgroup v1 only (these machines'; on v2 drover works in a delegated subtree,
 *   which this program does not set up).
 * - `sandbox`: plus, in the child after the move, new pid, mount, uts, ipc, cgroup and network
 *   namespaces (`network = "none"`, the default); the child forks the task as the namespace's
 *   first process and waits for it; the task makes the mounts private, mounts a tmpfs on /tmp,
 *   sets no_new_privs and execs. Less than drover's sandbox does (no init besides the task, no
 *   read-only view of the host, no workspace bind, nothing hidden, no /dev/shm), so its rate
 *   is a generous ceiling.
 *
 * Also generous, at both levels: no kill pass (drover's worker reads `cgroup.procs` of each
 * hierarchy to see the cgroup empty) and no thread made per attempt (drover's warm thread).
 *
 * `cgroup` and `sandbox` need root (as drover's worker does). Any failure exits 1 naming the
 * step; the program's own failure removes the cgroup, any other leaves its directories (named
 * bare-noop-PID-0) for an rmdir by hand.
 *
 * Built by task-bench at run time: cc -O2 -o bare_noop bare_noop.c.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

enum level { PLAIN, CGROUP, SANDBOX };

/* One v1 hierarchy an attempt's cgroup is made in, and what is written and read there. */
struct hier {
	char base[1024];
	int is_memory, is_pids, is_freezer;
};

static struct hier hiers[3];
static int nhier;

static void die(const char *what, const char *path)
{
	fprintf(stderr, "bare_noop: %s %s: %s\n", what, path ? path : "", strerror(errno));
	exit(1);
}

static void write_file(const char *path, const char *value)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, value, strlen(value)) < 0)
		die("writing", path);
	close(fd);
}

static void read_file(const char *path)
{
	char buf[4096];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || read(fd, buf, sizeof buf) < 0)
		die("reading", path);
	close(fd);
}

/* This process's cgroup path in the hierarchy of `controller` (v1), or in the unified one
 * (controller ""), from /proc/self/cgroup; 0 if it has none. */
static int own_path(const char *controller, char *out, size_t len)
{
	FILE *f = fopen("/proc/self/cgroup", "re");
	char line[1024];
	int found = 0;
	if (!f)
		die("opening", "/proc/self/cgroup");
	while (!found && fgets(line, sizeof line, f)) {
		char *names = strchr(line, ':'), *path;
		if (!names || !(path = strchr(names + 1, ':')))
			continue;
		*path++ = 0;
		path[strcspn(path, "\n")] = 0;
		names++;
		if (*controller == 0) {
			found = *names == 0;
		} else {
			for (char *tok = strtok(names, ","); tok && !found; tok = strtok(NULL, ","))
				found = strcmp(tok, controller) == 0;
		}
		if (found)
			snprintf(out, len, "%s", strcmp(path, "/") == 0 ? "" : path);
	}
	fclose(f);
	return found;
}

static void add_v1(const char *controller)
{
	char path[512], mount[256];
	struct stat st;
	snprintf(mount, sizeof mount, "/sys/fs/cgroup/%s", controller);
	if (stat(mount, &st) != 0 || !own_path(controller, path, sizeof path))
		return;
	struct hier *h = &hiers[nhier++];
	snprintf(h->base, sizeof h->base, "%s%s", mount, path);
	h->is_memory = strcmp(controller, "memory") == 0;
	h->is_pids = strcmp(controller, "pids") == 0;
	h->is_freezer = strcmp(controller, "freezer") == 0;
}

static void detect(void)
{
	add_v1("memory");
	if (nhier == 0) {
		fprintf(stderr, "bare_noop: no cgroup v1 memory hierarchy here; the cgroup and "
				"sandbox levels need one (leave bare-cgroup and bare-sandbox out)\n");
		exit(1);
	}
	add_v1("pids");
	add_v1("freezer");
}

static void run_child(enum level level, char dirs[][1100], const char *program)
{
	char path[1200];
	for (int k = 0; level >= CGROUP && k < nhier; k++) {
		snprintf(path, sizeof path, "%s/cgroup.procs", dirs[k]);
		write_file(path, "0");
	}
	if (level == SANDBOX) {
		int flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC |
			    CLONE_NEWCGROUP | CLONE_NEWNET;
		if (unshare(flags) != 0)
			die("unshare", NULL);
		pid_t init = fork();
		if (init < 0)
			die("fork", "(the pid namespace's first process)");
		if (init > 0) {
			int status;
			if (waitpid(init, &status, 0) < 0)
				die("waitpid", NULL);
			_exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128);
		}
		if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
			die("making the mounts private", "/");
		if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m") != 0)
			die("mounting a tmpfs on", "/tmp");
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
			die("setting no_new_privs", NULL);
	}
	char *argv[] = {(char *)program, NULL};
	execvpe(program, argv, environ);
	die("execvpe", program);
}

/* What drover's worker does to an emptied v1 cgroup before another attempt reuses it
 * (`v1::Group::reset_for_reuse`): looks at its OOM counter, charge, freezer state and children,
 * then lifts its limits and zeroes its peak and fail counters. */
static void reset_v1(char dirs[][1100])
{
	char path[1200];
	static const char *const writes[][2] = {
		{"memory.memsw.limit_in_bytes", "-1"}, {"memory.limit_in_bytes", "-1"},
		{"memory.max_usage_in_bytes", "0"},	  {"memory.failcnt", "0"},
		{"memory.memsw.max_usage_in_bytes", "0"}, {"memory.memsw.failcnt", "0"},
	};
	for (int k = 0; k < nhier; k++) {
		const char *reads[3] = {NULL, NULL, NULL};
		if (hiers[k].is_memory) {
			reads[0] = "memory.oom_control";
			reads[1] = "memory.usage_in_bytes";
			reads[2] = "memory.stat";
		} else if (hiers[k].is_pids) {
			reads[0] = "pids.current";
		} else if (hiers[k].is_freezer) {
			reads[0] = "freezer.state";
		}
		for (int r = 0; r < 3 && reads[r]; r++) {
			snprintf(path, sizeof path, "%s/%s", dirs[k], reads[r]);
			read_file(path);
		}
		DIR *dir = opendir(dirs[k]);
		if (!dir)
			die("listing", dirs[k]);
		while (readdir(dir))
			;
		closedir(dir);
	}
	for (int k = 0; k < nhier; k++) {
		if (hiers[k].is_memory) {
			for (size_t w = 0; w < sizeof writes / sizeof *writes; w++) {
				snprintf(path, sizeof path, "%s/%s", dirs[k], writes[w][0]);
				if (access(path, F_OK) == 0) /* memsw: only with swap accounting */
					write_file(path, writes[w][1]);
			}
		}
		if (hiers[k].is_pids) {
			snprintf(path, sizeof path, "%s/pids.max", dirs[k]);
			write_file(path, "max");
		}
	}
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: bare_noop plain|cgroup|sandbox COUNT PROGRAM\n");
		return 2;
	}
	enum level level;
	if (strcmp(argv[1], "plain") == 0)
		level = PLAIN;
	else if (strcmp(argv[1], "cgroup") == 0)
		level = CGROUP;
	else if (strcmp(argv[1], "sandbox") == 0)
		level = SANDBOX;
	else {
		fprintf(stderr, "bare_noop: unknown level %s (plain, cgroup or sandbox)\n", argv[1]);
		return 2;
	}
	long count = atol(argv[2]);
	const char *program = argv[3];
	if (count < 1) {
		fprintf(stderr, "bare_noop: COUNT must be at least 1, not %s\n", argv[2]);
		return 2;
	}
	if (level >= CGROUP)
		detect();

	/* One cgroup per loop, made once and reset after every attempt, as drover's worker
	 * reuses its warm cgroups. */
	char dirs[3][1100], path[1200];
	for (int k = 0; level >= CGROUP && k < nhier; k++) {
		snprintf(dirs[k], sizeof dirs[k], "%s/bare-noop-%d-0", hiers[k].base, getpid());
		if (mkdir(dirs[k], 0755) != 0)
			die("making the cgroup", dirs[k]);
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < count; i++) {
		for (int k = 0; level >= CGROUP && k < nhier; k++) {
			if (hiers[k].is_pids) {
				snprintf(path, sizeof path, "%s/pids.max", dirs[k]);
				write_file(path, "512");
			}
		}
		pid_t pid = fork();
		if (pid < 0)
			die("fork", NULL);
		if (pid == 0)
			run_child(level, dirs, program);
		int status;
		if (waitpid(pid, &status, 0) < 0)
			die("waitpid", NULL);
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			if (WIFEXITED(status))
				fprintf(stderr, "bare_noop: %s exited with code %d\n", program,
					WEXITSTATUS(status));
			else
				fprintf(stderr, "bare_noop: %s was killed by signal %d\n", program,
					WTERMSIG(status));
			for (int k = 0; level >= CGROUP && k < nhier; k++)
				rmdir(dirs[k]);
			return 1;
		}
		/* The attempt's counters, as the worker reads them at its end. */
		for (int k = 0; level >= CGROUP && k < nhier; k++) {
			if (!hiers[k].is_memory)
				continue;
			snprintf(path, sizeof path, "%s/memory.oom_control", dirs[k]);
			read_file(path);
			snprintf(path, sizeof path, "%s/memory.max_usage_in_bytes", dirs[k]);
			read_file(path);
		}
		if (level >= CGROUP)
			reset_v1(dirs);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	for (int k = 0; level >= CGROUP && k < nhier; k++)
		if (rmdir(dirs[k]) != 0)
			die("removing the cgroup", dirs[k]);
	double seconds = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	printf("{\"level\":\"%s\",\"tasks\":%ld,\"seconds\":%.6f}\n", argv[1], count, seconds);
	return 0;
}
