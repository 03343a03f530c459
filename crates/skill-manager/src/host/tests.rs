use super::*;
use std::time::{Duration, Instant};

#[test]
fn a_rotated_trail_is_followed_by_a_new_file_at_its_path() {
    let d = tempfile::tempdir().expect("tmp");
    let path = d.path().join("audit.jsonl");
    let audit = Audit::open(&path).expect("open");
    audit
        .write(&record_of("one", "1", &Caller::Operator))
        .expect("write");
    std::fs::rename(&path, d.path().join("audit.jsonl.1")).expect("rotate");
    audit
        .write(&record_of("two", "1", &Caller::Operator))
        .expect("write");
    let old = std::fs::read_to_string(d.path().join("audit.jsonl.1")).expect("old");
    let new = std::fs::read_to_string(&path).expect("new");
    assert!(old.contains("\"one\"") && !old.contains("\"two\""), "{old}");
    assert!(new.contains("\"two\""), "{new}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A link planted at the path is not written through.
    std::fs::remove_file(&path).expect("rm");
    std::os::unix::fs::symlink(d.path().join("elsewhere"), &path).expect("link");
    assert!(
        audit
            .write(&record_of("three", "1", &Caller::Operator))
            .is_err()
    );
    assert!(!d.path().join("elsewhere").exists());
}

#[test]
fn a_skills_own_words_are_cut_so_its_record_stays_readable() {
    use crate::runtime::LogLevel;
    // As much as a skill may log: 256 lines of 4096 bytes, control characters
    // (six bytes each once escaped in JSON) and multi-byte ones.
    let line = "\u{1}é".repeat(1365);
    let log: Vec<(LogLevel, String)> = (0..256).map(|_| (LogLevel::Info, line.clone())).collect();
    let kept = audit_log(&log);
    assert_eq!(kept.len(), AUDIT_LOG_LINES + 1);
    assert_eq!(kept[AUDIT_LOG_LINES], "… 240 more lines");
    assert!(
        kept[..AUDIT_LOG_LINES]
            .iter()
            .all(|l| l.len() <= AUDIT_TEXT_MAX + "…".len())
    );
    let json = serde_json::to_string(&kept).expect("json");
    assert!(json.len() < 64 * 1024, "{} bytes", json.len());
    assert_eq!(capped("short", 10), "short");
    assert_eq!(capped("ééé", 3), "é…", "cut at a character boundary");
}

#[test]
fn one_refusal_a_second_is_recorded_and_the_next_counts_the_rest() {
    let mut seen = RefusalsSeen::new();
    let t0 = Instant::now();
    let every = Duration::from_secs(1);
    let at = |ms| t0 + Duration::from_millis(ms);
    let rate = ("a", "rate limit");
    assert_eq!(record_this_one(&mut seen, rate, at(0), every), Some(0));
    for ms in [1, 10, 999] {
        assert_eq!(record_this_one(&mut seen, rate, at(ms), every), None);
    }
    // Another reason and another agent have their own.
    assert_eq!(
        record_this_one(&mut seen, ("a", "in flight"), at(5), every),
        Some(0)
    );
    assert_eq!(
        record_this_one(&mut seen, ("b", "rate limit"), at(5), every),
        Some(0)
    );
    assert_eq!(record_this_one(&mut seen, rate, at(1000), every), Some(3));
    assert_eq!(record_this_one(&mut seen, rate, at(1500), every), None);
    assert_eq!(record_this_one(&mut seen, rate, at(2000), every), Some(1));
}
