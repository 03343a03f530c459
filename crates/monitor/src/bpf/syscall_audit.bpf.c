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

// One event; mirrored by `RawEvent` in src/event.rs (keep them in step).
struct event {
	__u64 ts_ns;
	__u32 tgid;
	__u32 tid;
	__u32 tag;
	__s32 nr;
	__s64 ret;
	__u64 args[6];
	char comm[COMM_LEN];
	char path[PATH_LEN];
};

// Wake the consumer only once this much is waiting (it polls on a timer anyway).
const volatile __u64 wakeup_bytes = 64 * 1024;

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

static __always_inline __u32 *watched(__u32 tgid)
{
	__u32 *tag = bpf_map_lookup_elem(&watched_tgids, &tgid);
	if (tag)
		return tag;
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

	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&drops, &zero);
		if (n)
			*n += 1;
		return 0;
	}
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->tgid = tgid;
	e->tid = (__u32)id;
	e->tag = *tag;
	e->nr = (__s32)BPF_CORE_READ(regs, orig_ax);
	e->ret = ret;
	e->args[0] = BPF_CORE_READ(regs, di);
	e->args[1] = BPF_CORE_READ(regs, si);
	e->args[2] = BPF_CORE_READ(regs, dx);
	e->args[3] = BPF_CORE_READ(regs, r10);
	e->args[4] = BPF_CORE_READ(regs, r8);
	e->args[5] = BPF_CORE_READ(regs, r9);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->path[0] = 0;
	int pa = path_arg(e->nr);
	if (pa >= 0 && pa < 6) {
		const char *p = (const char *)e->args[pa];
		if (bpf_probe_read_user_str(e->path, sizeof(e->path), p) < 0)
			e->path[0] = 0;
	}
	__u64 waiting = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, waiting >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(on_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = BPF_CORE_READ(parent, tgid);
	__u32 *tag = bpf_map_lookup_elem(&watched_tgids, &ptgid);
	if (!tag)
		return 0;
	__u32 ctgid = BPF_CORE_READ(child, tgid);
	__u32 t = *tag;
	bpf_map_update_elem(&watched_tgids, &ctgid, &t, BPF_NOEXIST);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_exit, struct task_struct *task)
{
	__u32 pid = BPF_CORE_READ(task, pid);
	__u32 tgid = BPF_CORE_READ(task, tgid);
	// Only the thread group leader's exit ends the process.
	if (pid == tgid)
		bpf_map_delete_elem(&watched_tgids, &tgid);
	return 0;
}
