use super::*;

fn spec() -> LaunchSpec {
    LaunchSpec {
        name: "a1".into(),
        dir: VmDir {
            root: "/state/vms/a1".into(),
        },
        mem_mib: 512,
        vcpus: 2,
        kernel: "/img/vmlinuz".into(),
        vmlinux: None,
        initramfs: "/img/initramfs.cpio.gz".into(),
        rootfs: "/img,odd/rootfs.img".into(),
        rootfs_fd: None,
        image_cmdline: "panic=-1 clawos.root_hash=ab".into(),
        snapshots: false,
    }
}

#[test]
fn tcg_args_carry_the_timer_and_readonly_rootfs() {
    let q = Qemu {
        bin: "qemu-system-x86_64".into(),
        kvm: false,
        tsc_khz: Some(2_596_146),
        vhost_vsock: Some("vhost-device-vsock".into()),
        vsock_device_log: "error",
        qboot: None,
    };
    let a = q.args(&spec(), None, &Disks::default()).join(" ");
    assert!(a.contains("-accel tcg"), "{a}");
    assert!(a.contains("tsc_early_khz=2596146"), "{a}");
    assert!(
        a.contains("console=ttyS0 tsc_early_khz=2596146 tsc=reliable panic=-1 clawos.root_hash=ab"),
        "{a}"
    );
    assert!(
        a.contains("id=rootfs,file=/img,,odd/rootfs.img,format=raw,if=none,readonly=on"),
        "{a}"
    );
    assert!(
        a.contains("virtio-blk-device,drive=workspace,serial=workspace"),
        "{a}"
    );
    assert!(a.contains("-m 512 -smp 2"), "{a}");
    assert!(a.contains("-accel tcg,tb-size=256"), "{a}");
    // Not running as another uid (the launcher is not root): the filter may deny
    // set*id as well.
    assert!(
        a.contains(
            "-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny,elevateprivileges=deny"
        ),
        "{a}"
    );
    assert!(!a.contains("-runas"), "{a}");
    assert!(a.contains("-M microvm,memory-backend=ram"), "{a}");
    assert!(
        a.contains("memory-backend-memfd,id=ram,size=512M,share=on"),
        "{a}"
    );
    assert!(a.contains("vhost-user-vsock-device,chardev=vsock"), "{a}");
}

#[test]
fn snapshot_capable_vms_use_pc_with_fixed_pci_slots_and_a_restorable_vsock() {
    let q = Qemu {
        bin: "qemu-system-x86_64".into(),
        kvm: false,
        tsc_khz: Some(1),
        vhost_vsock: Some("vhost-device-vsock".into()),
        vsock_device_log: "error",
        qboot: Some(QBOOT_ROM.into()),
    };
    let mut s = spec();
    s.snapshots = true;
    let boot = q.args(&s, Some(1234), &Disks::default()).join(" ");
    assert!(boot.contains("-M pc,memory-backend=ram"), "{boot}");
    assert!(boot.contains(&format!("-bios {QBOOT_ROM}")), "{boot}");
    assert!(boot.contains("virtio-rng-pci,addr=0x3"), "{boot}");
    assert!(
        boot.contains("virtio-blk-pci,addr=0x4,drive=rootfs,serial=rootfs"),
        "{boot}"
    );
    assert!(
        boot.contains("virtio-blk-pci,addr=0x7,drive=config,serial=config"),
        "{boot}"
    );
    assert!(
        boot.contains("vhost-user-vsock-pci,addr=0x9,chardev=vsock,id=vsock0"),
        "{boot}"
    );
    assert!(!boot.contains("-device virtio-blk-device"), "{boot}");
    assert!(
        boot.contains("-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny -runas 1234:1234"),
        "{boot}"
    );
    assert!(
        boot.contains("socket,id=vsock,path=vsock/vhost-vsock.sock"),
        "{boot}"
    );
    // A restore starts without the vsock device (it was unplugged when the state
    // was saved) and waits for the state; everything else is identical.
    let restore = q.restore_args(&s, Some(1234), &Disks::default());
    let mut expected = q.args(&s, Some(1234), &Disks::default());
    let at = expected
        .iter()
        .position(|a| a == "socket,id=vsock,path=vsock/vhost-vsock.sock");
    let at = at.expect("vsock chardev") - 1;
    expected.drain(at..at + 4);
    expected.extend(["-incoming".into(), "defer".into()]);
    assert_eq!(restore, expected);
}

#[test]
fn the_rootfs_is_the_checked_descriptor_never_its_path() {
    let q = Qemu {
        bin: "qemu-system-x86_64".into(),
        kvm: false,
        tsc_khz: Some(1),
        vhost_vsock: None,
        vsock_device_log: "error",
        qboot: None,
    };
    let f = std::fs::File::open("/dev/null").expect("a descriptor");
    let fd = f.as_raw_fd();
    let mut s = spec();
    s.rootfs_fd = Some(std::sync::Arc::new(f));
    let a = q.args(&s, Some(7), &Disks::default()).join(" ");
    assert!(
        a.contains(&format!("-add-fd fd={fd},set=1,opaque=rootfs")),
        "{a}"
    );
    assert!(
        a.contains("id=rootfs,file=/dev/fdset/1,format=raw,if=none,readonly=on"),
        "{a}"
    );
    assert!(!a.contains("rootfs.img"), "{a}");
    // The VM's own disks: a set each, read-write and read-only descriptors.
    let t = tempfile::tempdir().expect("tmp");
    for f in ["runtime.img", "workspace.img", "config.img"] {
        std::fs::write(t.path().join(f), b"disk").expect("disk");
    }
    let disks = Disks::open(&VmDir {
        root: t.path().to_owned(),
    })
    .expect("disks");
    let a = q.args(&s, Some(7), &disks);
    let joined = a.join(" ");
    for (serial, set, n) in [("runtime", 2, 2), ("workspace", 3, 2), ("config", 4, 1)] {
        let adds = a
            .iter()
            .filter(|x| x.ends_with(&format!(",set={set},opaque={serial}")))
            .count();
        assert_eq!(adds, n, "{serial}: {joined}");
        assert!(
            joined.contains(&format!("id={serial},file=/dev/fdset/{set},format=raw")),
            "{joined}"
        );
    }
    assert!(!joined.contains(".img"), "{joined}");
}

#[test]
fn kvm_args_skip_the_tcg_timer() {
    let q = Qemu {
        bin: "qemu-system-x86_64".into(),
        kvm: true,
        tsc_khz: Some(1),
        vhost_vsock: None,
        vsock_device_log: "error",
        qboot: None,
    };
    let a = q.args(&spec(), None, &Disks::default()).join(" ");
    assert!(a.contains("-accel kvm") && a.contains("-cpu host"), "{a}");
    assert!(!a.contains("tsc_early_khz"), "{a}");
}
