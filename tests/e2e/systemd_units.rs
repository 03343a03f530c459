//! The systemd units in `packaging/systemd/`: checked by systemd's own tools, against
//! the real daemons. This machine's PID 1 is not systemd, so the units are not booted
//! here: `systemd-analyze verify` checks each (syntax, directives, dependencies, the
//! binary), `systemd-analyze security --offline` scores each one's exposure (≤ 5,
//! docs/security.md lists the figures), and each `ExecStart=` command line is handed
//! to its real daemon, which must take every flag in it.

use std::path::{Path, PathBuf};
use std::process::Command;

use clawos_e2e::show;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd")
}

fn units() -> Vec<PathBuf> {
    let mut u: Vec<PathBuf> = std::fs::read_dir(units_dir())
        .expect("packaging/systemd")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    u.sort();
    u
}

/// `systemd-analyze`, or why it cannot run (recorded as a skip).
fn analyzer(test: &str) -> bool {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            clawos_test_skip::record(
                test,
                "systemd-analyze is not installed (scripts/setup.sh installs systemd)",
            );
            false
        }
    }
}

/// A unit with its `/usr/bin/<daemon>` pointing at the daemon built here.
fn rewritten(unit: &Path, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(unit).expect("unit");
    let bin_dir = clawos_e2e::bin("clawos")
        .parent()
        .expect("bin dir")
        .to_owned();
    let out = dir.join(unit.file_name().expect("name"));
    std::fs::write(
        &out,
        text.replace("/usr/bin/", &format!("{}/", bin_dir.display())),
    )
    .expect("write");
    out
}

#[test]
fn every_unit_verifies_and_scores_an_exposure_of_at_most_5() {
    let name = "every_unit_verifies_and_scores_an_exposure_of_at_most_5";
    if !analyzer(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mut files: Vec<PathBuf> = units().iter().map(|u| rewritten(u, dir.path())).collect();
    assert!(files.len() >= 7, "every daemon has a unit: {files:?}");
    files.push(rewritten(&units_dir().join("clawos.target"), dir.path()));
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()
        .expect("systemd-analyze verify");
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        o.stderr.is_empty(),
        "verify complains: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "service"))
    {
        let o = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(f)
            .output()
            .expect("systemd-analyze security");
        let text = String::from_utf8_lossy(&o.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level: {}", show(&o)));
        eprintln!("{}: exposure {score}", f.display());
        assert!(
            score <= 5.0,
            "{}: exposure {score} > 5\n{text}",
            f.display()
        );
    }
}

#[test]
fn every_exec_start_is_a_command_line_its_daemon_takes() {
    for unit in units() {
        let text = std::fs::read_to_string(&unit).expect("unit");
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{}: no ExecStart", unit.display()));
        clawos_e2e::assert_command_line_taken(exec, "/usr/bin/", &unit.display().to_string());
    }
}
