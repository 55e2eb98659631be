/*
 * The dispatch-latency probe of `task-bench latency`: prints CLOCK_REALTIME in nanoseconds
 * (what `date +%s%N` prints) as its first action, with nothing run before it.
 *
 * Why not `date`: a dynamically linked glibc program runs the loader and glibc's start-up
 * before `main`, and on the build machines (KVM guests) that start-up alone costs about 1 ms
 * of CPU: glibc enumerates the CPU caches with `cpuid`, which the hypervisor traps, dozens of
 * times per exec (perf: `intel_check_word`, `handle_intel`). That is the task's own program
 * running, not the dispatch. This probe is static, has no libc and no start-up code: `_start`
 * reads the clock at once, so the stamp is the moment the task's program first runs, right
 * after its execve.
 *
 * Built by task-bench at run time with the system C compiler (`cc`, which Rust's linker needs
 * anyway): cc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -O2.
 * x86_64 and aarch64. With -DNOOP it only exits 0: `task-bench throughput --noop static`'s
 * no-op, a `true` without glibc's start-up.
 */

#if defined(__x86_64__)
#define SYS_write 1
#define SYS_exit 60
#define SYS_clock_gettime 228
static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}
#elif defined(__aarch64__)
#define SYS_write 64
#define SYS_exit 93
#define SYS_clock_gettime 113
static long sys3(long n, long a, long b, long c)
{
	register long x8 __asm__("x8") = n;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;
	__asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
	return x0;
}
#else
#error "stamp.c: only x86_64 and aarch64"
#endif

struct timespec_k {
	long sec;
	long nsec;
};

#if defined(__x86_64__)
__attribute__((force_align_arg_pointer))
#endif
void _start(void)
{
#ifdef NOOP
	for (;;)
		sys3(SYS_exit, 0, 0, 0);
#endif
	struct timespec_k ts;
	/* CLOCK_REALTIME is 0. */
	if (sys3(SYS_clock_gettime, 0, (long)&ts, 0) != 0)
		sys3(SYS_exit, 1, 0, 0);
	unsigned long ns = (unsigned long)ts.sec * 1000000000UL + (unsigned long)ts.nsec;
	char buf[24];
	int i = sizeof buf;
	buf[--i] = '\n';
	do {
		buf[--i] = (char)('0' + ns % 10);
		ns /= 10;
	} while (ns != 0);
	long want = (long)sizeof buf - i;
	long code = sys3(SYS_write, 1, (long)(buf + i), want) == want ? 0 : 2;
	for (;;)
		sys3(SYS_exit, code, 0, 0);
}
