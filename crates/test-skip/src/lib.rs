//! Records and prints why a test did not run. Every test that returns early goes through
//! [`record`]: the test runner hides the output of tests that pass, so a skip that only
//! printed would look like a pass. `scripts/test.sh` lists `<target>/e2e/SKIPPED` after
//! the run and fails on a line that is not on its allow-list of machine-dependent skips.

use std::io::Write;
use std::path::PathBuf;

/// The skip file of the running test binary: `<target>/e2e/SKIPPED`, found from the
/// binary's own path (`<target>/<profile>/deps/<test>-<hash>`).
pub fn skip_file() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.ancestors().nth(2)?.join("../e2e/SKIPPED"))
}

/// Prints `SKIP <test>: <why>` and appends the same line to [`skip_file`].
pub fn record(test: &str, why: &str) {
    eprintln!("SKIP {test}: {why}");
    let Some(file) = skip_file() else {
        return;
    };
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
    {
        // One write per line: O_APPEND keeps concurrent tests' lines whole.
        let _ = f.write_all(format!("SKIP {test}: {why}\n").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_skip_file_is_beside_the_profile_directory() {
        let f = super::skip_file().expect("path");
        assert!(f.ends_with("../e2e/SKIPPED"), "{}", f.display());
        let exe = std::env::current_exe().expect("exe");
        assert_eq!(
            exe.parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str()),
            Some("deps"),
            "test binaries run from <target>/<profile>/deps"
        );
    }
}
