//! TLS clients and certificates for the control plane's tests, made with other tools
//! than ours: `openssl` makes certificates, Python's `ssl` checks what is served and
//! holds connections open.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::show;

/// Makes a CA and a certificate for 127.0.0.1 signed by it with `openssl`, into
/// `cert`/`key`; `serial` tells the certificates apart.
pub fn openssl_cert(dir: &Path, ca: &str, cert: &Path, key: &Path, serial: u32) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        if !o.status.success() {
            bail!("openssl {args:?}: {}", show(&o));
        }
        Ok(())
    };
    if !dir.join(format!("{ca}.crt")).exists() {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
            "-days",
            "2",
            "-subj",
            "/CN=ClawOS test CA",
        ])?;
    }
    let tmp_key = dir.join(format!("leaf{serial}.key"));
    let tmp_csr = dir.join(format!("leaf{serial}.csr"));
    let tmp_crt = dir.join(format!("leaf{serial}.crt"));
    let ext = dir.join("san.ext");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        tmp_key.to_str().context("utf8")?,
        "-out",
        tmp_csr.to_str().context("utf8")?,
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        tmp_csr.to_str().context("utf8")?,
        "-CA",
        &format!("{ca}.crt"),
        "-CAkey",
        &format!("{ca}.key"),
        "-set_serial",
        &serial.to_string(),
        "-days",
        "1",
        "-extfile",
        ext.to_str().context("utf8")?,
        "-out",
        tmp_crt.to_str().context("utf8")?,
    ])?;
    // Replace as a renewal tool would: key first, then the certificate, each by rename.
    std::fs::copy(&tmp_key, dir.join("key.tmp"))?;
    std::fs::rename(dir.join("key.tmp"), key)?;
    std::fs::copy(&tmp_crt, dir.join("crt.tmp"))?;
    std::fs::rename(dir.join("crt.tmp"), cert)?;
    Ok(())
}

/// Holds one TLS connection to 127.0.0.1 open (SNI and certificate name `name`) and
/// answers commands on stdin: each line sends `GET /healthz` on it and prints
/// `<status> <serial of the certificate the connection was opened with>`.
const HOLDING_CLIENT: &str = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[2]))), server_hostname=sys.argv[3])
f = s.makefile("rb")
for line in sys.stdin:
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status = f.readline().split()[1].decode()
    length = 0
    while True:
        h = f.readline()
        if h in (b"\r\n", b""):
            break
        k, _, v = h.decode().partition(":")
        if k.lower() == "content-length":
            length = int(v)
    f.read(length)
    print(status, s.getpeercert()["serialNumber"], flush=True)
"#;

/// One connection held open by [`HOLDING_CLIENT`].
#[derive(Debug)]
pub struct HeldConnection {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: BufReader<std::process::ChildStdout>,
}

impl HeldConnection {
    pub fn open(port: u16, ca: &Path, name: &str) -> Result<Self> {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(HOLDING_CLIENT)
            .arg(ca)
            .arg(port.to_string())
            .arg(name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let to = child.stdin.take().context("stdin")?;
        let from = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self { child, to, from })
    }

    /// A request on the held connection: "<status> <serial>".
    pub fn ask(&mut self) -> Result<String> {
        writeln!(self.to, "get")?;
        let mut line = String::new();
        self.from.read_line(&mut line)?;
        if line.is_empty() {
            bail!("the held connection ended");
        }
        Ok(line.trim().to_owned())
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The serial number (hex) of the certificate a new TLS connection to 127.0.0.1:`port`
/// is shown for `name`, if it verifies against `ca`.
pub fn serial_served(port: u16, ca: &Path, name: &str) -> Result<String> {
    let o = Command::new("python3")
        .arg("-c")
        .arg("import socket, ssl, sys\nctx = ssl.create_default_context(cafile=sys.argv[1])\ns = ctx.wrap_socket(socket.create_connection(('127.0.0.1', int(sys.argv[2]))), server_hostname=sys.argv[3])\nprint(s.getpeercert()['serialNumber'])")
        .arg(ca)
        .arg(port.to_string())
        .arg(name)
        .output()?;
    if !o.status.success() {
        bail!("TLS client: {}", show(&o));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Polls [`serial_served`] until `done` holds for it, for at most `limit`.
pub fn wait_for_serial(
    port: u16,
    ca: &Path,
    name: &str,
    limit: Duration,
    done: impl Fn(&str) -> bool,
    log: impl Fn() -> String,
) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(serial) = serial_served(port, ca, name)
            && done(&serial)
        {
            return Ok(serial);
        }
        if Instant::now() > deadline {
            bail!(
                "no such certificate served within {limit:?}; last: {:?}\n{}",
                serial_served(port, ca, name).map_err(|e| e.to_string()),
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
