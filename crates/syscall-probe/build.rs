//! Compiles the eBPF program with clang (`-target bpf`, CO-RE, no vmlinux.h needed).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/bpf/syscall_audit.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("syscall_audit.bpf.o");
    let clang = std::env::var("CLAWOS_CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-D__TARGET_ARCH_x86",
            // <asm/types.h> for the BPF target comes from the host's multiarch headers.
            "-I/usr/include/x86_64-linux-gnu",
            "-Wall",
            "-Werror",
            "-c",
            src,
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {clang} to build the eBPF program: {e}; install clang and libbpf-dev \
                 (scripts/setup.sh does)"
            )
        });
    assert!(
        status.success(),
        "{clang} failed to compile {src} (needs libbpf-dev for <bpf/bpf_helpers.h>)"
    );
}
