//! CEF (ArcSight Common Event Format) over RFC 5424 syslog.
//!
//! Escaping follows the CEF spec: in header fields `\` and `|` are escaped with a
//! backslash; in extension values `\` and `=` are, and line breaks become the two
//! characters `\n` / `\r`, so one event is always one line. Header fields cannot carry
//! line breaks at all; they become spaces.

use std::collections::BTreeMap;

use crate::event::{AuditEvent, Kind};

const VENDOR: &str = "ClawOS";
const PRODUCT: &str = "clawos-monitor";
/// Syslog facility 13, "log audit".
const FACILITY: u8 = 13;

/// Escapes a CEF header field.
pub fn escape_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a CEF extension value.
pub fn escape_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// The CEF line of an event (no syslog header).
pub fn encode(e: &AuditEvent) -> String {
    let (sig, name, severity) = match e.kind {
        Kind::Syscall => (
            format!("syscall:{}", e.syscall.as_deref().unwrap_or("?")),
            e.syscall.clone().unwrap_or_default(),
            1,
        ),
        Kind::Alert => (
            format!("alert:{}", e.rule.as_deref().unwrap_or("?")),
            format!(
                "{} by a watched process",
                e.syscall.as_deref().unwrap_or("syscall")
            ),
            e.severity.unwrap_or(8),
        ),
        Kind::Drops => ("drops".into(), "events dropped in the kernel".into(), 5),
        Kind::ForwardDrops => (
            "forward-drops".into(),
            "events dropped by the SIEM forwarder".into(),
            5,
        ),
        Kind::GuestDrops => (
            "guest-drops".into(),
            "events recorded in a VM that never reached the host".into(),
            5,
        ),
        Kind::SkillCall => match &e.skill_call {
            Some(c) => (
                format!("skill:{}", c.skill),
                format!("skill call {}", c.outcome),
                skill_severity(c),
            ),
            // A record that cannot be read may hide what a skill did: as loud as a
            // refused destination.
            None => ("skill:?".into(), "unreadable skill call record".into(), 7),
        },
    };
    let mut ext: Vec<(&str, String)> = vec![
        ("externalId", e.seq.to_string()),
        ("rt", e.ts.clone()),
        ("dvchost", e.host.clone()),
    ];
    let mut opt = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            ext.push((k, v));
        }
    };
    opt("cs1Label", e.agent.as_ref().map(|_| "agent".into()));
    opt("cs1", e.agent.clone());
    opt("cs2Label", e.vm.as_ref().map(|_| "vm".into()));
    opt("cs2", e.vm.clone());
    opt("dvcpid", e.pid.map(|p| p.to_string()));
    opt("cn1Label", e.tid.map(|_| "tid".into()));
    opt("cn1", e.tid.map(|p| p.to_string()));
    opt("dproc", e.comm.clone());
    opt("cn2Label", e.nr.map(|_| "syscallNr".into()));
    opt("cn2", e.nr.map(|p| p.to_string()));
    opt("cn3Label", e.ret.map(|_| "ret".into()));
    opt("cn3", e.ret.map(|p| p.to_string()));
    opt("cs3Label", e.args.as_ref().map(|_| "args".into()));
    opt(
        "cs3",
        e.args.map(|a| {
            a.iter()
                .map(|v| format!("{v:#x}"))
                .collect::<Vec<_>>()
                .join(",")
        }),
    );
    opt("filePath", e.path.clone());
    opt("cs4Label", e.rule.as_ref().map(|_| "rule".into()));
    opt("cs4", e.rule.clone());
    opt("cnt", e.dropped.map(|d| d.to_string()));
    opt(
        "cs5Label",
        e.guest_boot.as_ref().map(|_| "guestBoot".into()),
    );
    opt("cs5", e.guest_boot.clone());
    opt("cs6Label", e.guest_seq.map(|_| "guestSeq".into()));
    opt("cs6", e.guest_seq.map(|s| s.to_string()));
    if let Some(c) = &e.skill_call {
        opt("cs4Label", Some("skill".into()));
        opt("cs4", Some(format!("{} {}", c.skill, c.version)));
        opt("act", Some(c.outcome.clone()));
        opt("suser", Some(c.caller.clone()));
        opt("cs5Label", c.vm_id.as_ref().map(|_| "vmId".into()));
        opt("cs5", c.vm_id.clone());
        opt("cn1Label", Some("durationMs".into()));
        opt("cn1", Some(c.duration_ms.to_string()));
        opt("in", Some(c.input_bytes.to_string()));
        opt("out", Some(c.output_bytes.to_string()));
        opt("cnt", c.refused_unrecorded_before.map(|n| n.to_string()));
        opt(
            "request",
            (!c.requests.is_empty()).then(|| {
                c.requests
                    .iter()
                    .map(|r| {
                        let status = r.status.map(|s| format!(" {s}")).unwrap_or_default();
                        if r.allowed {
                            format!("{} allowed{status} {}B", r.destination, r.bytes)
                        } else {
                            format!("{} refused", r.destination)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
        );
    }
    opt("msg", e.detail.clone());
    let ext: Vec<String> = ext
        .into_iter()
        .map(|(k, v)| format!("{k}={}", escape_value(&v)))
        .collect();
    format!(
        "CEF:0|{VENDOR}|{PRODUCT}|{}|{}|{}|{severity}|{}",
        escape_header(env!("CARGO_PKG_VERSION")),
        escape_header(&sig),
        escape_header(&name),
        ext.join(" ")
    )
}

/// A skill call's CEF severity: a request its capabilities did not allow is what a
/// SIEM should see first, then refusals (an agent pressing past its limits).
fn skill_severity(c: &clawos_monitor_api::SkillCall) -> u8 {
    if c.requests.iter().any(|r| !r.allowed) {
        7
    } else {
        match c.outcome.as_str() {
            "answered" => 1,
            "refused" => 5,
            _ => 3,
        }
    }
}

/// An RFC 5424 message carrying `cef`, at most `cap` bytes. A longer CEF line is cut
/// at a character boundary that does not split an escape sequence.
pub fn syslog_message(e: &AuditEvent, cef: &str, cap: usize) -> String {
    let severity = match e.kind {
        Kind::Alert => 2,                                         // critical
        Kind::Drops | Kind::ForwardDrops | Kind::GuestDrops => 4, // warning
        Kind::SkillCall => match &e.skill_call {
            Some(c) if skill_severity(c) < 5 => 6,
            _ => 4,
        },
        Kind::Syscall => 6, // informational
    };
    let pri = u16::from(FACILITY) * 8 + severity;
    let host = if e.host.is_empty() { "-" } else { &e.host };
    let ts = if e.ts.is_empty() { "-" } else { &e.ts };
    let head = format!("<{pri}>1 {ts} {host} clawos-monitor - audit - ");
    let room = cap.saturating_sub(head.len());
    let mut body = cef;
    if body.len() > room {
        let mut cut = room;
        while cut > 0 && !body.is_char_boundary(cut) {
            cut -= 1;
        }
        // Do not leave a lone escaping backslash at the end.
        let trailing = body[..cut]
            .bytes()
            .rev()
            .take_while(|&b| b == b'\\')
            .count();
        if trailing % 2 == 1 {
            cut -= 1;
        }
        body = &body[..cut];
    }
    format!("{head}{body}")
}

/// Octet-counting framing (RFC 6587 §3.4.1) for syslog over TCP and TLS.
pub fn octet_counted(msg: &str) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

/// A parsed CEF line: the seven header fields (unescaped) and the extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub header: Vec<String>,
    pub ext: BTreeMap<String, String>,
}

/// Parses a CEF line (anything before `CEF:` is ignored), undoing the escapes.
pub fn parse(line: &str) -> Option<Parsed> {
    let start = line.find("CEF:")?;
    let s = &line[start + 4..];
    let mut header = Vec::new();
    let mut cur = String::new();
    let mut chars = s.char_indices();
    let mut rest_at = None;
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, n)) = chars.next() {
                    cur.push(n);
                }
            }
            '|' => {
                header.push(std::mem::take(&mut cur));
                if header.len() == 7 {
                    rest_at = Some(i + 1);
                    break;
                }
            }
            c => cur.push(c),
        }
    }
    let ext_text = &s[rest_at?..];
    Some(Parsed {
        header,
        ext: parse_extension(ext_text),
    })
}

fn parse_extension(s: &str) -> BTreeMap<String, String> {
    // Find every unescaped '='; the key is the word before it.
    let b = s.as_bytes();
    let mut eqs = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'=' => {
                eqs.push(i);
                i += 1;
            }
            _ => i += 1,
        }
    }
    let mut out = BTreeMap::new();
    let key_start = |eq: usize| s[..eq].rfind(' ').map_or(0, |p| p + 1);
    for (n, &eq) in eqs.iter().enumerate() {
        let key = &s[key_start(eq)..eq];
        let end = eqs
            .get(n + 1)
            .map_or(s.len(), |&next| key_start(next).saturating_sub(1));
        let raw = &s[eq + 1..end.max(eq + 1)];
        out.insert(key.to_owned(), unescape_value(raw));
    }
    out
}

fn unescape_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> AuditEvent {
        let mut e = AuditEvent::new(
            7,
            "2026-11-26T19:00:00.123456789Z".into(),
            "h|1",
            Kind::Syscall,
        );
        e.agent = Some("a=b".into());
        e.vm = Some("v\\m".into());
        e.pid = Some(10);
        e.comm = Some("x|y=z\\w\nq".into());
        e.nr = Some(257);
        e.syscall = Some("openat".into());
        e.ret = Some(-2);
        e.args = Some([1, 2, 3, 4, 5, 0xffff_ffff_ffff_ff9c]);
        e.path = Some("/tmp/a b=c|d\\e\nf\rg".into());
        e
    }

    #[test]
    fn escapes_round_trip_through_the_parser() {
        let e = event();
        let line = encode(&e);
        assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
        let p = parse(&line).expect("parse");
        assert_eq!(p.header[0], "0");
        assert_eq!(p.header[3], env!("CARGO_PKG_VERSION"));
        assert_eq!(p.header[4], "syscall:openat");
        assert_eq!(p.ext["externalId"], "7");
        assert_eq!(p.ext["dvchost"], "h|1");
        assert_eq!(p.ext["cs1"], "a=b");
        assert_eq!(p.ext["cs2"], "v\\m");
        assert_eq!(p.ext["dproc"], "x|y=z\\w\nq");
        assert_eq!(p.ext["filePath"], "/tmp/a b=c|d\\e\nf\rg");
        assert_eq!(p.ext["cn3"], "-2");
        assert_eq!(p.ext["cs3"], "0x1,0x2,0x3,0x4,0x5,0xffffffffffffff9c");
    }

    #[test]
    fn header_fields_escape_pipes_and_backslashes() {
        assert_eq!(escape_header("a|b\\c\nd"), "a\\|b\\\\c d");
        let mut e = event();
        e.kind = Kind::Alert;
        e.rule = Some("deny|x".into());
        let p = parse(&encode(&e)).expect("parse");
        assert_eq!(p.header[4], "alert:deny|x");
        assert_eq!(p.ext["cs4"], "deny|x");
    }

    #[test]
    fn a_skill_call_maps_to_its_own_signature_and_a_refused_destination_stands_out() {
        use clawos_monitor_api::{SkillCall, SkillRequest};
        let mut e = AuditEvent::new(9, "2026-12-02T10:00:00Z".into(), "h", Kind::SkillCall);
        e.agent = Some("a1".into());
        e.detail = Some("request refused: evil=host".into());
        let mut c = SkillCall {
            skill: "web-search".into(),
            version: "0.1.0".into(),
            caller: "agent".into(),
            vm_id: Some("a1-17".into()),
            outcome: "answered".into(),
            duration_ms: 12,
            input_bytes: 20,
            output_bytes: 300,
            requests: vec![SkillRequest {
                destination: "http://127.0.0.1:8888".into(),
                allowed: true,
                status: Some(200),
                bytes: 280,
            }],
            refused_unrecorded_before: None,
        };
        e.skill_call = Some(c.clone());
        let line = encode(&e);
        let p = parse(&line).expect("parse");
        assert_eq!(
            (
                p.header[4].as_str(),
                p.header[5].as_str(),
                p.header[6].as_str()
            ),
            ("skill:web-search", "skill call answered", "1")
        );
        assert_eq!(p.ext["cs1"], "a1");
        assert_eq!(p.ext["cs4"], "web-search 0.1.0");
        assert_eq!(p.ext["cs5"], "a1-17");
        assert_eq!(p.ext["act"], "answered");
        assert_eq!(p.ext["request"], "http://127.0.0.1:8888 allowed 200 280B");
        assert_eq!(p.ext["msg"], "request refused: evil=host");
        assert!(
            syslog_message(&e, &line, 8000).starts_with("<110>"),
            "informational"
        );

        c.outcome = "failed".into();
        c.requests.push(SkillRequest {
            destination: "https://evil.example:443".into(),
            allowed: false,
            status: None,
            bytes: 0,
        });
        e.skill_call = Some(c);
        let line = encode(&e);
        let p = parse(&line).expect("parse");
        assert_eq!(p.header[6], "7", "a refused destination is severity 7");
        assert!(p.ext["request"].ends_with(", https://evil.example:443 refused"));
        assert!(
            syslog_message(&e, &line, 8000).starts_with("<108>"),
            "warning"
        );

        e.skill_call = None;
        let p = parse(&encode(&e)).expect("parse");
        assert_eq!(
            (p.header[4].as_str(), p.header[6].as_str()),
            ("skill:?", "7")
        );
    }

    #[test]
    fn messages_are_capped_without_splitting_an_escape() {
        let mut e = event();
        e.path = Some("\\".repeat(500));
        let cef = encode(&e);
        for cap in 100..400 {
            let m = syslog_message(&e, &cef, cap);
            assert!(m.len() <= cap, "{cap}: {}", m.len());
            let tail = m.bytes().rev().take_while(|&b| b == b'\\').count();
            assert_eq!(tail % 2, 0, "cap {cap} left a lone backslash");
        }
        let m = syslog_message(&e, &cef, 100_000);
        assert!(
            m.starts_with(
                "<110>1 2026-11-26T19:00:00.123456789Z h|1 clawos-monitor - audit - CEF:0|"
            ),
            "{m}"
        );
        assert_eq!(octet_counted("abc"), b"3 abc");
    }
}
