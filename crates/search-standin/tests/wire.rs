//! The stand-in as the web-search skill meets it: the real binary on loopback, asked in
//! SearXNG's and Brave's shapes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Running(Child, String);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(extra: &[&str]) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clawos-search-standin"))
        .args(["--addr", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address line");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("said {line:?}"))
        .to_owned();
    Running(child, url)
}

#[tokio::test]
async fn searxng_and_brave_shapes_with_brave_keyed() {
    let s = start(&["--brave-key", "k-123"]);
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/search?q=what+is+clawos&format=json", s.1))
        .send()
        .await
        .expect("searxng");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["query"], "what is clawos");
    assert_eq!(v["results"][0]["url"], "https://clawos.example/");
    assert!(
        v["results"][0]["content"]
            .as_str()
            .is_some_and(|c| c.contains("microVM"))
    );
    let r = http
        .get(format!("{}/search?q=clawos&format=html", s.1))
        .send()
        .await
        .expect("html");
    assert_eq!(r.status(), 403, "only JSON, as a SearXNG without HTML");

    let brave = format!("{}/res/v1/web/search?q=wasmtime+fuel&count=1", s.1);
    let r = http.get(&brave).send().await.expect("brave");
    assert_eq!(r.status(), 401, "no token");
    let r = http
        .get(&brave)
        .header("x-subscription-token", "k-123")
        .send()
        .await
        .expect("brave");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    let results = v["web"]["results"].as_array().expect("results");
    assert_eq!(results.len(), 1, "{v}");
    assert_eq!(results[0]["url"], "https://wasmtime.dev/");
    assert!(results[0]["description"].is_string());
}

#[test]
fn a_corpus_file_that_is_not_one_is_refused_with_its_name() {
    let dir = std::env::temp_dir().join(format!("standin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("corpus.json");
    std::fs::write(&bad, r#"{"not": "an array"}"#).expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_clawos-search-standin"))
        .args(["--addr", "127.0.0.1:0", "--corpus"])
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("corpus.json") && err.contains("not a JSON array"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
