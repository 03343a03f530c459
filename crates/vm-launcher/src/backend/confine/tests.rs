use super::*;

const HYBRID_MOUNTINFO: &str = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
37 35 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 35 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
39 35 0:34 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
40 35 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
const HYBRID_CGROUP: &str = "\
8:pids:/
7:blkio:/
4:memory:/process_api/67ef
1:cpu:/
0::/
";

#[test]
fn a_hybrid_host_uses_v1_under_the_launchers_own_cgroups() {
    let only_hugetlb = |p: &Path| {
        (p == Path::new("/sys/fs/cgroup/unified/cgroup.controllers"))
            .then(|| "hugetlb\n".to_owned())
    };
    let c = Cgroups::from_proc(HYBRID_MOUNTINFO, HYBRID_CGROUP, &only_hugetlb);
    assert_eq!(
        c,
        Cgroups::V1 {
            memory: Some("/sys/fs/cgroup/memory/process_api/67ef".into()),
            cpu: Some("/sys/fs/cgroup/cpu".into()),
            pids: Some("/sys/fs/cgroup/pids".into()),
            blkio: Some("/sys/fs/cgroup/blkio".into()),
        }
    );
    assert_eq!(
        c.dirs("clawos-a-1")[0],
        PathBuf::from("/sys/fs/cgroup/memory/process_api/67ef/clawos-a-1")
    );
}

#[test]
fn v2_is_used_when_its_controllers_are_there() {
    let mi = "30 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
    let cg = "0::/system.slice/clawos.service\n";
    let all = |p: &Path| {
        (p == Path::new("/sys/fs/cgroup/system.slice/clawos.service/cgroup.controllers"))
            .then(|| "cpuset cpu io memory hugetlb pids\n".to_owned())
    };
    assert_eq!(
        Cgroups::from_proc(mi, cg, &all),
        Cgroups::V2 {
            base: "/sys/fs/cgroup/system.slice/clawos.service".into(),
            io: true
        }
    );
    // A cgroup namespace: the mount's root is the launcher's cgroup itself.
    let mi = "30 24 0:26 /system.slice/clawos.service /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
    let ns = |p: &Path| {
        (p == Path::new("/sys/fs/cgroup/cgroup.controllers"))
            .then(|| "memory pids cpu\n".to_owned())
    };
    assert_eq!(
        Cgroups::from_proc(mi, cg, &ns),
        Cgroups::V2 {
            base: "/sys/fs/cgroup".into(),
            io: false
        }
    );
    assert!(matches!(
        Cgroups::from_proc("", "", &|_| None),
        Cgroups::Unavailable(_)
    ));
}

#[test]
fn limits_cover_guest_ram_plus_overhead() {
    let l = Limits::for_vm(512, 2, false, Path::new("/nonexistent"));
    assert_eq!(l.memory_bytes, (512 + 256 + TCG_TB_MIB) << 20);
    assert_eq!(l.cpu_quota_us, 3 * CPU_PERIOD_US);
    assert_eq!(l.pids, PIDS_MAX);
    assert!(
        l.io.is_none(),
        "no block device for a path that does not exist"
    );
    assert!(Limits::for_vm(512, 1, true, Path::new("/")).memory_bytes >= 512 << 20);
}

#[test]
fn limits_are_written_as_each_version_spells_them() {
    let t = tempfile::tempdir().expect("tmp");
    let limits = Limits {
        memory_bytes: 1 << 30,
        cpu_quota_us: 200_000,
        pids: 64,
        io: Some(IoLimit {
            major: 254,
            minor: 0,
            bps: 1000,
            iops: 10,
        }),
    };
    let read = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap_or_default();
    for ctrl in ["memory", "cpu", "pids", "blkio"] {
        let d = t.path().join(ctrl);
        std::fs::create_dir(&d).expect("mkdir");
        write_v1_limits(ctrl, &d, &limits).expect(ctrl);
    }
    assert_eq!(
        read("memory/memory.limit_in_bytes"),
        (1u64 << 30).to_string()
    );
    assert_eq!(read("cpu/cpu.cfs_quota_us"), "200000");
    assert_eq!(read("cpu/cpu.cfs_period_us"), "100000");
    assert_eq!(read("pids/pids.max"), "64");
    assert_eq!(read("blkio/blkio.throttle.write_bps_device"), "254:0 1000");
    assert_eq!(read("blkio/blkio.throttle.read_iops_device"), "254:0 10");
    let d = t.path().join("v2");
    std::fs::create_dir(&d).expect("mkdir");
    std::fs::write(d.join("memory.swap.max"), "max").expect("swap");
    write_v2_limits(&d, &limits, true).expect("v2");
    assert_eq!(read("v2/memory.max"), (1u64 << 30).to_string());
    assert_eq!(read("v2/memory.swap.max"), "0");
    assert_eq!(read("v2/pids.max"), "64");
    assert_eq!(read("v2/cpu.max"), "200000 100000");
    assert_eq!(
        read("v2/io.max"),
        "254:0 rbps=1000 wbps=1000 riops=10 wiops=10"
    );
}

#[test]
fn uids_are_per_vm_and_outside_passwd() {
    let a = allocate_uid(Path::new("/s/vms/a")).expect("a");
    let b = allocate_uid(Path::new("/s/vms/b")).expect("b");
    assert_ne!(a, b);
    assert!((UID_BASE..UID_BASE + UID_RANGE).contains(&a));
    assert!(!in_passwd(a));
    // The same VM asking again gets the same one back while nothing uses it.
    assert_eq!(allocate_uid(Path::new("/s/vms/a")).expect("a again"), a);
    release_uid(Path::new("/s/vms/a"));
    release_uid(Path::new("/s/vms/b"));
    assert!(in_passwd(0), "root is in passwd");
}

#[test]
fn cgroup_names_differ_per_state_directory() {
    let a = cgroup_name(Path::new("/one/vms/agent"));
    let b = cgroup_name(Path::new("/two/vms/agent"));
    assert!(a.starts_with("clawos-agent-") && b.starts_with("clawos-agent-"));
    assert_ne!(a, b);
}
