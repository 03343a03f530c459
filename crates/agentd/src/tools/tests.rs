use super::*;

fn tools(cap: usize) -> (tempfile::TempDir, Tools) {
    let d = tempfile::tempdir().expect("tempdir");
    let t = Tools::new(d.path(), cap, Duration::from_secs(5)).expect("tools");
    (d, t)
}

#[tokio::test]
async fn bash_runs_in_the_workspace_and_reports_status() {
    let (d, t) = tools(4096);
    let out = t
        .run(
            "bash",
            &json!({"command": "pwd; echo err >&2; touch made; exit 3"}),
        )
        .await;
    assert!(!out.ok);
    let root = d.path().canonicalize().expect("canon");
    assert!(
        out.text.contains(&root.display().to_string()),
        "{}",
        out.text
    );
    assert!(out.text.contains("err\n"), "{}", out.text);
    assert!(out.text.ends_with("[exit status: 3]"), "{}", out.text);
    assert!(d.path().join("made").exists());
}

#[tokio::test]
async fn bash_output_is_capped() {
    let (_d, t) = tools(1000);
    let out = t
        .run(
            "bash",
            &json!({"command": "head -c 5000 /dev/zero | tr '\\0' x"}),
        )
        .await;
    assert!(out.ok, "{}", out.text);
    assert!(
        out.text.contains("[output truncated: 5000 bytes total]"),
        "{}",
        out.text
    );
    assert!(out.text.len() < 1100);
}

#[tokio::test]
async fn bash_timeout_kills_the_whole_group() {
    let (d, t) = tools(4096);
    let start = std::time::Instant::now();
    // A grandchild in the background that would write a file after the timeout.
    let out = t
        .run(
            "bash",
            &json!({"command": "(sleep 3; touch late) & echo started; sleep 30", "timeout_secs": 1}),
        )
        .await;
    assert!(!out.ok);
    assert!(out.text.contains("started"), "{}", out.text);
    assert!(
        out.text.ends_with("[killed: timed out after 1 s]"),
        "{}",
        out.text
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        !d.path().join("late").exists(),
        "the background process was killed"
    );
}

#[tokio::test]
async fn bash_timeout_is_bounded() {
    let (_d, t) = tools(4096);
    let out = t
        .run("bash", &json!({"command": "true", "timeout_secs": 999}))
        .await;
    assert!(out.ok);
    assert!(
        out.text
            .starts_with("[timeout_secs 999 lowered to the 5 s maximum]")
    );
    let out = t
        .run("bash", &json!({"command": "true", "timeout_secs": 0}))
        .await;
    assert!(!out.ok);
    let out = t.run("bash", &json!({"cmd": "true"})).await;
    assert!(!out.ok);
    assert!(
        out.text
            .contains("invalid input for bash: missing field `command`"),
        "{}",
        out.text
    );
}

#[tokio::test]
async fn file_tools_round_trip() {
    let (d, t) = tools(4096);
    let w = t
        .run(
            "write_file",
            &json!({"path": "a/b/c.txt", "content": "one two two"}),
        )
        .await;
    assert!(w.ok, "{}", w.text);
    assert_eq!(
        std::fs::read_to_string(d.path().join("a/b/c.txt")).expect("read"),
        "one two two"
    );
    let abs = d.path().join("a/b/c.txt").display().to_string();
    let r = t.run("read_file", &json!({"path": abs})).await;
    assert_eq!(r, ToolOutput::ok("one two two"));
    let e = t
        .run(
            "edit_file",
            &json!({"path": "a/b/c.txt", "old_text": "two", "new_text": "2"}),
        )
        .await;
    assert!(!e.ok);
    assert!(e.text.contains("matches 2 times"), "{}", e.text);
    let e = t
        .run(
            "edit_file",
            &json!({"path": "a/b/c.txt", "old_text": "three", "new_text": "3"}),
        )
        .await;
    assert!(e.text.contains("matches 0 times"), "{}", e.text);
    let e = t
        .run(
            "edit_file",
            &json!({"path": "a/b/c.txt", "old_text": "one", "new_text": "1"}),
        )
        .await;
    assert!(e.ok, "{}", e.text);
    assert_eq!(
        std::fs::read_to_string(d.path().join("a/b/c.txt")).expect("read"),
        "1 two two"
    );
    let l = t.run("list_files", &json!({})).await;
    assert_eq!(l, ToolOutput::ok("a/\n"));
    let l = t.run("list_files", &json!({"path": "a/b"})).await;
    assert_eq!(l, ToolOutput::ok("c.txt (9 bytes)\n"));
}

#[tokio::test]
async fn edit_keeps_the_mode() {
    let (d, t) = tools(4096);
    let p = d.path().join("run.sh");
    std::fs::write(&p, "echo a\n").expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let e = t
        .run(
            "edit_file",
            &json!({"path": "run.sh", "old_text": "a", "new_text": "b"}),
        )
        .await;
    assert!(e.ok, "{}", e.text);
    let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o750);
}

#[tokio::test]
async fn escapes_are_refused() {
    let (d, t) = tools(4096);
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret"), "s").expect("write");
    std::os::unix::fs::symlink(outside.path(), d.path().join("out")).expect("symlink");
    for (tool, input) in [
        ("read_file", json!({"path": "../x"})),
        ("read_file", json!({"path": "/etc/passwd"})),
        ("read_file", json!({"path": "out/secret"})),
        ("write_file", json!({"path": "../x", "content": "x"})),
        ("write_file", json!({"path": "out/new", "content": "x"})),
        ("write_file", json!({"path": "out/sub/new", "content": "x"})),
        ("write_file", json!({"path": "/tmp/x", "content": "x"})),
        ("list_files", json!({"path": "out"})),
        ("list_files", json!({"path": ".."})),
        (
            "edit_file",
            json!({"path": "out/secret", "old_text": "s", "new_text": "t"}),
        ),
    ] {
        let out = t.run(tool, &input).await;
        assert!(!out.ok, "{tool} {input}: {}", out.text);
        assert!(
            out.text.contains("outside") || out.text.contains("escapes"),
            "{tool} {input}: {}",
            out.text
        );
    }
    assert_eq!(
        std::fs::read_dir(outside.path()).expect("ls").count(),
        1,
        "nothing was created outside"
    );
}

#[tokio::test]
async fn read_limits() {
    let (d, t) = tools(4096);
    std::fs::write(
        d.path().join("big"),
        vec![b'x'; (MAX_READ_BYTES + 1) as usize],
    )
    .expect("write");
    std::fs::write(d.path().join("bin"), [0xff, 0xfe, 0]).expect("write");
    std::fs::create_dir(d.path().join("dir")).expect("mkdir");
    let fifo = std::ffi::CString::new(d.path().join("fifo").to_string_lossy().as_bytes())
        .expect("cstring");
    // SAFETY: a valid C string; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    for (path, want) in [
        ("big", "over the 1048576-byte limit"),
        ("bin", "not UTF-8"),
        ("dir", "is a directory"),
        ("fifo", "not a regular file"),
        ("nope", "No such file"),
    ] {
        let out = t.run("read_file", &json!({"path": path})).await;
        assert!(!out.ok);
        assert!(out.text.contains(want), "{path}: {}", out.text);
    }
    let out = t.run("frobnicate", &json!({})).await;
    assert!(out.text.starts_with("unknown tool \"frobnicate\""));
}
