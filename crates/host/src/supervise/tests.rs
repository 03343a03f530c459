use super::*;

#[test]
fn a_process_is_known_by_its_pid_and_start_time() {
    let me = std::process::id();
    let t = start_ticks(me).expect("this process");
    assert!(t > 0);
    assert_eq!(start_ticks(me), Some(t), "stable");
    let mut child = std::process::Command::new("true").spawn().expect("true");
    let pid = child.id();
    child.wait().expect("wait");
    assert_eq!(start_ticks(pid), None, "an ended process is not running");
}

#[test]
fn credentials_in_the_callers_environment_are_not_inherited() {
    for v in [
        "ANTHROPIC_API_KEY",
        "OPENAI_API_KEY",
        "CLAWOS_MASTER_KEY",
        "GITHUB_TOKEN",
        "DB_PASSWORD",
        "X_SECRET",
    ] {
        assert!(is_secret_var(v), "{v}");
    }
    for v in [
        "PATH",
        "HOME",
        "RUST_LOG",
        "CLAWOS_STATE_DIR",
        "CLAWOS_SIGNING_PUBKEY",
    ] {
        assert!(!is_secret_var(v), "{v}");
    }
    // What passes: the basics and ClawOS's own settings; not a stray credential,
    // nor anything else of the caller's.
    for v in [
        "PATH",
        "LC_ALL",
        "HTTPS_PROXY",
        "CLAWOS_QEMU",
        "CLAWOS_SIGNING_PUBKEY",
    ] {
        assert!(is_passed_var(v), "{v}");
    }
    for v in [
        "AWS_SECRET_ACCESS_KEY",
        "SSH_AUTH_SOCK",
        "CLAWOS_SCRIPTED_MODEL_KEY",
        "ANTHROPIC_API_KEY",
        "DATABASE_URL",
    ] {
        assert!(!is_passed_var(v), "{v}");
    }
}

#[test]
fn the_log_tail_is_what_came_after_the_start() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("x.log");
    std::fs::write(&p, "old run\nline a\n").expect("write");
    let from = std::fs::metadata(&p).expect("meta").len();
    std::fs::write(&p, "old run\nline a\nnew 1\nnew 2\nnew 3\n").expect("write");
    assert_eq!(log_tail(&p, from, 2), "new 2\nnew 3");
    assert_eq!(log_tail(&p, from, 20), "new 1\nnew 2\nnew 3");
    let mut failed = String::from("old\nError: no key\n");
    for i in 0..30 {
        failed.push_str(&format!("  {i}: frame\n"));
    }
    std::fs::write(&p, failed).expect("write");
    let tail = log_tail(&p, 0, 3);
    assert_eq!(tail, "Error: no key\n  0: frame\n  1: frame");
}
