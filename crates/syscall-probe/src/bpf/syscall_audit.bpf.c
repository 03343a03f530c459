// SPDX-License-Identifier: GPL-2.0
// clawos monitor: syscall exit events of watched processes, filtered in the kernel.
//
// A process is watched when its thread group id is in `watched_tgids`, or its cgroup
// id is in `watched_cgroups`. Children of watched processes are added at fork, and
// removed when their thread group leader exits. Each event goes through one ring
// buffer; wake-ups are batched (the consumer also polls on a timer), and reservations
// that fail are counted in `drops` instead of blocking the traced process.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

// Only the fields we read; CO-RE relocates their offsets against the running
// kernel's BTF, so no vmlinux.h is needed at build time.
struct pt_regs {
	unsigned long di;
	unsigned long si;
	unsigned long dx;
	unsigned long r10;
	unsigned long r8;
	unsigned long r9;
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
} __attribute__((preserve_access_index));

#define PATH_LEN 96
#define COMM_LEN 16

// One event; mirrored by `RawEvent` in src/record.rs (keep them in step). Syscalls
// without a path argument get only the head (96 bytes instead of 192): less memory
// traffic per event.
struct event_head {
	__u64 ts_ns;
	__u32 tgid;
	__u32 tid;
	__u32 tag;
	__s32 nr;
	__s64 ret;
	__u64 args[6];
	char comm[COMM_LEN];
};

struct event {
	struct event_head h;
	char path[PATH_LEN];
};

// Wake the consumer once per this many events of a CPU (a power of two; user space
// sets it to about a quarter of the ring). It polls on a timer anyway.
const volatile __u64 wake_every = 512;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);   // tgid
	__type(value, __u32); // tag (index of the agent/VM label in user space)
} watched_tgids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);   // cgroup v2 id
	__type(value, __u32); // tag
} watched_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

// Events emitted per CPU (paces the wake-ups).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} emitted SEC(".maps");

// A pre-filter in front of the hash lookup, which is most of the cost for processes
// that are not watched: one bit per tgid modulo 65536, set for every watched tgid.
// Array lookups are inlined by the verifier, so an unwatched process costs two loads.
// User space owns `user_bits` (it sets a bit before adding a watch); the fork handler
// owns `fork_bits` (atomic OR), so neither overwrites the other's bits. Bits are never
// cleared: a stale or colliding bit only means a hash lookup.
#define BIT_WORDS 1024
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BIT_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} user_bits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BIT_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} fork_bits SEC(".maps");

// Number of cgroup watches (user space keeps it): zero skips the cgroup lookup.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} cgroup_watches SEC(".maps");

// Syscalls whose path argument is copied into the event: (nr, argument index).
static __always_inline int path_arg(int nr)
{
	switch (nr) {
	case 2:   // open
	case 4:   // stat
	case 6:   // lstat
	case 21:  // access
	case 59:  // execve (read fails after a successful exec: the old mm is gone)
	case 82:  // rename
	case 83:  // mkdir
	case 84:  // rmdir
	case 87:  // unlink
	case 90:  // chmod
	case 161: // chroot
	case 165: // mount (source)
		return 0;
	case 257: // openat
	case 258: // mkdirat
	case 262: // newfstatat
	case 263: // unlinkat
	case 268: // fchmodat
	case 269: // faccessat
	case 322: // execveat
	case 437: // openat2
	case 439: // faccessat2
		return 1;
	default:
		return -1;
	}
}

static __always_inline int maybe_watched(__u32 tgid)
{
	__u32 idx = (tgid >> 6) & (BIT_WORDS - 1);
	__u64 bit = 1ULL << (tgid & 63);
	__u64 *u = bpf_map_lookup_elem(&user_bits, &idx);
	if (u && (*u & bit))
		return 1;
	__u64 *f = bpf_map_lookup_elem(&fork_bits, &idx);
	return f && (*f & bit);
}

static __always_inline __u32 *watched(__u32 tgid)
{
	if (maybe_watched(tgid)) {
		__u32 *tag = bpf_map_lookup_elem(&watched_tgids, &tgid);
		if (tag)
			return tag;
	}
	__u32 zero = 0;
	__u32 *n = bpf_map_lookup_elem(&cgroup_watches, &zero);
	if (!n || !*n)
		return 0;
	__u64 cg = bpf_get_current_cgroup_id();
	return bpf_map_lookup_elem(&watched_cgroups, &cg);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(on_sys_exit, struct pt_regs *regs, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	__u32 *tag = watched(tgid);
	if (!tag)
		return 0;

	int nr = (int)regs->orig_ax;
	int pa = path_arg(nr);
	struct event *e;
	if (pa >= 0)
		e = bpf_ringbuf_reserve(&events, sizeof(struct event), 0);
	else
		e = bpf_ringbuf_reserve(&events, sizeof(struct event_head), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&drops, &zero);
		if (n)
			*n += 1;
		return 0;
	}
	struct event_head *h = &e->h;
	h->ts_ns = bpf_ktime_get_boot_ns();
	h->tgid = tgid;
	h->tid = (__u32)id;
	h->tag = *tag;
	h->nr = nr;
	h->ret = ret;
	// tp_btf arguments are typed pointers: direct (CO-RE relocated) loads, no helper
	// calls.
	h->args[0] = regs->di;
	h->args[1] = regs->si;
	h->args[2] = regs->dx;
	h->args[3] = regs->r10;
	h->args[4] = regs->r8;
	h->args[5] = regs->r9;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
	if (pa >= 0 && pa < 6) {
		const char *p = (const char *)h->args[pa];
		if (bpf_probe_read_user_str(e->path, sizeof(e->path), p) < 0)
			e->path[0] = 0;
	}
	// Batched wake-ups without touching the consumer's cache lines: each CPU wakes the
	// consumer once per `wake_every` of its own events. The consumer also polls every
	// few milliseconds, so a quiet trickle is not delayed.
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&emitted, &zero);
	__u64 n = count ? ++*count : 0;
	bpf_ringbuf_submit(e, (n & (wake_every - 1)) == 0 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(on_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = parent->tgid;
	__u32 *tag = bpf_map_lookup_elem(&watched_tgids, &ptgid);
	if (!tag)
		return 0;
	__u32 ctgid = child->tgid;
	__u32 t = *tag;
	__u32 idx = (ctgid >> 6) & (BIT_WORDS - 1);
	__u64 *f = bpf_map_lookup_elem(&fork_bits, &idx);
	if (f)
		__sync_fetch_and_or(f, 1ULL << (ctgid & 63));
	bpf_map_update_elem(&watched_tgids, &ctgid, &t, BPF_NOEXIST);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_exit, struct task_struct *task)
{
	__u32 pid = task->pid;
	__u32 tgid = task->tgid;
	// Only the thread group leader's exit ends the process.
	if (pid == tgid)
		bpf_map_delete_elem(&watched_tgids, &tgid);
	return 0;
}
