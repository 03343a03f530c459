//! Printing results: pretty JSON for `--json`, and the VM and snapshot tables.

use anyhow::Result;
use clawos_vm_launcher_api::{Snapshot, Vm};

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn vm_table(vms: &[Vm]) {
    println!(
        "{:<24} {:<9} {:>7} {:>5} {:>8} {:<16} REASON",
        "NAME", "STATE", "MEM", "VCPU", "BOOT", "ROOT HASH"
    );
    for v in vms {
        println!(
            "{:<24} {:<9} {:>6}M {:>5} {:>8} {:<16} {}",
            v.name,
            v.state.to_string(),
            v.mem_mib,
            v.vcpus,
            v.boot_ms
                .map(|m| format!("{:.1}s", m as f64 / 1000.0))
                .unwrap_or_default(),
            &v.root_hash[..v.root_hash.len().min(16)],
            v.reason.as_deref().unwrap_or("")
        );
    }
}

pub fn snapshot_table(snaps: &[Snapshot]) {
    println!(
        "{:<24} {:>12} {:>6} {:>10} {:>10} {:>8}",
        "TAG", "CREATED", "MEM", "STATE", "DISK", "SAVE"
    );
    for s in snaps {
        println!(
            "{:<24} {:>12} {:>5}M {:>9}M {:>9}M {:>6}ms",
            s.tag,
            s.created_at,
            s.mem_mib,
            s.state_bytes >> 20,
            s.disk_bytes >> 20,
            s.save_ms
        );
    }
}
