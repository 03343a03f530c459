//! Launcher configuration, validated before any socket opens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clawos_image::manifest::{VerifyingKey, parse_public_key};

/// Which hypervisor runs VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// QEMU `microvm`: KVM when the CPU has hardware virtualization, else TCG.
    Qemu,
    /// Firecracker through its API socket (needs hardware KVM).
    Firecracker,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Qemu => "qemu",
            Self::Firecracker => "firecracker",
        })
    }
}

/// Everything the launcher needs, already checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listen address: loopback only (the API has no TLS).
    pub addr: SocketAddr,
    /// The operator credential file (`<state>/launcher/admin.token`, 0600, made at the
    /// first start); every route but `/healthz` and `/metrics` needs its content as
    /// `Authorization: Bearer`.
    pub token_path: PathBuf,
    /// `Origin`s whose requests are served (`scheme://host[:port]`); none by default,
    /// so no web page can drive the API.
    pub allowed_origins: Vec<String>,
    /// State directory; VMs live in `<state>/vms/<name>/`.
    pub state_dir: PathBuf,
    /// Default image bundle directory.
    pub image_dir: Option<PathBuf>,
    /// Kernel file overriding the bundle's (`CLAWOS_AGENT_KERNEL`); still hash-checked.
    pub kernel_override: Option<PathBuf>,
    /// Rootfs file overriding the bundle's (`CLAWOS_AGENT_ROOTFS`).
    pub rootfs_override: Option<PathBuf>,
    /// Root hash every image must have (`CLAWOS_AGENT_ROOTHASH`).
    pub pinned_root_hash: Option<String>,
    /// Trusted image signing key (`CLAWOS_SIGNING_PUBKEY`). `None` only with
    /// `allow_unsigned`.
    pub public_key: Option<VerifyingKey>,
    /// Inference proxy URL on the host (`CLAWOS_INFERENCE_PROXY_URL`).
    pub inference_proxy_url: String,
    /// `host:port` the LLM relay connects to, from that URL.
    pub inference_proxy_authority: String,
    /// `host:port` of skill-manager, which the skills relay (guest `127.0.0.1:2083`)
    /// connects to (`CLAWOS_SKILLS_URL`); `None`: no skills relay, and no token for it.
    pub skills_authority: Option<String>,
    /// monitor-daemon to register each VM's processes with (`CLAWOS_MONITOR_URL`).
    pub monitor_url: Option<String>,
    /// identity-manager, which mints each running VM's agent token; `None`: guests'
    /// requests to host services are refused (503), never forwarded unauthenticated.
    pub identity: Option<IdentitySettings>,
    /// Hypervisor backend.
    pub backend: BackendKind,
    /// QEMU binary.
    pub qemu_bin: PathBuf,
    /// Firecracker binary.
    pub firecracker_bin: PathBuf,
    /// Jailer settings when Firecracker runs jailed.
    pub jailer: Option<crate::backend::firecracker::Jailer>,
    /// `vhost-device-vsock` for QEMU's hybrid vsock; `None`: QEMU VMs get no control
    /// channel (exec, files, relays), only console readiness.
    pub vhost_vsock_bin: Option<PathBuf>,
    /// Its log level, given to it as `RUST_LOG` (never the launcher's own `RUST_LOG`: at
    /// `debug` it logs each packet, at a rate the guest chooses).
    pub vsock_device_log: &'static str,
    /// How long a guest may take to power off before it is killed.
    pub stop_timeout: Duration,
    /// How long a guest may take to report ready before it is failed.
    pub boot_timeout: Duration,
    /// Size of each VM's `/var` disk.
    pub runtime_disk_mib: u64,
    /// Size of each VM's `/workspace` disk.
    pub workspace_disk_mib: u64,
    /// How often a starting VM is asked whether it is ready (its supervisor is woken by
    /// its process's exit and by requests; only readiness needs asking).
    pub ready_probe_interval: Duration,
    /// Largest a VM's live console log grows before it is cut (the previous part is
    /// kept as `console.log.1`): a guest writing to its serial port cannot fill the
    /// host's disk.
    pub console_max_bytes: u64,
    /// Most snapshots one VM may keep.
    pub max_snapshots_per_vm: usize,
}

/// How the launcher gets each running VM's agent token from identity-manager.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// identity-manager's URL (`CLAWOS_IDENTITY_URL`).
    pub url: String,
    /// The service credential file (`CLAWOS_IDENTITY_TOKEN_PATH`; default
    /// `<state>/identity/service.token`, where identity-manager writes it). Read at each
    /// issue, so identity-manager may start after the launcher.
    pub service_token_path: PathBuf,
    /// Lifetime of each token; it is replaced at two thirds of it.
    pub token_ttl: Duration,
    /// Audience of the tokens the LLM relay attaches (inference-proxy's `--audience`).
    pub llm_audience: String,
    /// Audience of the tokens the skills relay attaches (skill-manager's `--audience`).
    pub skills_audience: String,
}

/// Raw settings as given (flags or environment), before validation.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    pub addr: String,
    /// Operator credential file (`CLAWOS_LAUNCHER_TOKEN_PATH`); default
    /// `<state>/launcher/admin.token`.
    pub token_path: Option<PathBuf>,
    /// Allowed `Origin`s (`CLAWOS_LAUNCHER_ALLOWED_ORIGINS`, comma-separated).
    pub allowed_origins: Vec<String>,
    pub state_dir: PathBuf,
    pub image_dir: Option<PathBuf>,
    pub kernel_override: Option<PathBuf>,
    pub rootfs_override: Option<PathBuf>,
    pub pinned_root_hash: Option<String>,
    pub public_key: Option<String>,
    pub allow_unsigned: bool,
    pub inference_proxy_url: String,
    pub monitor_url: Option<String>,
    /// identity-manager URL (`CLAWOS_IDENTITY_URL`).
    pub identity_url: Option<String>,
    /// Its service credential file (`CLAWOS_IDENTITY_TOKEN_PATH`).
    pub identity_token_path: Option<PathBuf>,
    /// Agent token lifetime in seconds (0: 15 minutes).
    pub agent_token_ttl_secs: u64,
    /// Audience of LLM tokens (`CLAWOS_PROXY_AUDIENCE`; empty: `inference-proxy`).
    pub llm_audience: String,
    /// skill-manager URL (`CLAWOS_SKILLS_URL`), for the skills relay.
    pub skills_url: Option<String>,
    /// Audience of skills tokens (`CLAWOS_SKILLS_AUDIENCE`; empty: `skill-manager`).
    pub skills_audience: String,
    /// `auto`, `qemu` or `firecracker`.
    pub backend: String,
    pub qemu_bin: PathBuf,
    pub firecracker_bin: PathBuf,
    pub vhost_vsock_bin: PathBuf,
    /// `vhost-device-vsock`'s log level (`CLAWOS_VSOCK_DEVICE_LOG`; empty: `error`).
    pub vsock_device_log: String,
    /// Jailer binary (`CLAWOS_JAILER`); set to run Firecracker jailed.
    pub jailer_bin: Option<PathBuf>,
    /// `uid:gid` the jailed Firecracker runs as (`CLAWOS_JAILER_USER`).
    pub jailer_user: Option<String>,
    /// `--chroot-base-dir` (`CLAWOS_JAILER_CHROOT_BASE`); default `<state>/jail`.
    pub jailer_chroot_base: Option<PathBuf>,
    /// Network namespace for jailed VMs (`CLAWOS_JAILER_NETNS`).
    pub jailer_netns: Option<PathBuf>,
    pub stop_timeout_secs: u64,
    pub boot_timeout_secs: u64,
    /// Console log cap in MiB (0: the default).
    pub console_max_mib: u64,
}

/// A configuration problem, named.
#[derive(Debug, thiserror::Error)]
#[error("vm-launcher config: {0}")]
pub struct ConfigError(pub String);

fn find_in_path(bin: &std::path::Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_owned());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

impl RawConfig {
    /// Checks every setting and resolves `auto` choices.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let addr: SocketAddr = self
            .addr
            .parse()
            .map_err(|e| ConfigError(format!("listen address {:?}: {e}", self.addr)))?;
        if !addr.ip().is_loopback() {
            return Err(ConfigError(format!(
                "listen address {addr} is not loopback: the launcher's API has no TLS, so its operator credential would cross the network in clear text; listen on 127.0.0.1 or [::1] (reach it from elsewhere through an SSH tunnel)"
            )));
        }
        for o in &self.allowed_origins {
            if !valid_origin(o) {
                return Err(ConfigError(format!(
                    "allowed origin {o:?} is not scheme://host[:port] (e.g. https://console.example)"
                )));
            }
        }
        let public_key = match (&self.public_key, self.allow_unsigned) {
            (Some(k), _) => Some(
                parse_public_key(k)
                    .map_err(|e| ConfigError(format!("CLAWOS_SIGNING_PUBKEY: {e}")))?,
            ),
            (None, true) => None,
            (None, false) => {
                return Err(ConfigError(
                    "no image signing key: set CLAWOS_SIGNING_PUBKEY (hex, from `clawos keygen`), or pass --allow-unsigned to boot images without checking signatures".into(),
                ));
            }
        };
        if let Some(h) = &self.pinned_root_hash
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ConfigError(format!(
                "CLAWOS_AGENT_ROOTHASH {h:?} is not 64 hex characters"
            )));
        }
        for (what, p) in [
            ("CLAWOS_AGENT_KERNEL", &self.kernel_override),
            ("CLAWOS_AGENT_ROOTFS", &self.rootfs_override),
        ] {
            if let Some(p) = p
                && !p.is_file()
            {
                return Err(ConfigError(format!("{what} {} is not a file", p.display())));
            }
        }
        if let Some(d) = &self.image_dir
            && !d.is_dir()
        {
            return Err(ConfigError(format!(
                "image directory {} does not exist (build one with `clawos image build`)",
                d.display()
            )));
        }
        let inference_proxy_authority =
            url_authority(&self.inference_proxy_url).ok_or_else(|| {
                ConfigError(format!(
                    "CLAWOS_INFERENCE_PROXY_URL {:?} is not an http(s) URL with a host (e.g. http://127.0.0.1:11435)",
                    self.inference_proxy_url
                ))
            })?;
        let skills_authority = match self.skills_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(u) => match url_authority(u).filter(|_| u.starts_with("http://")) {
                Some(a) => Some(a),
                None => {
                    return Err(ConfigError(format!(
                        "CLAWOS_SKILLS_URL {u:?} is not an http URL with a host (e.g. http://127.0.0.1:2083)"
                    )));
                }
            },
        };
        if let Some(u) = &self.monitor_url
            && !(u.starts_with("http://") && url_authority(u).is_some())
        {
            return Err(ConfigError(format!(
                "CLAWOS_MONITOR_URL {u:?} is not an http URL with a host (e.g. http://127.0.0.1:2084)"
            )));
        }
        let identity = match &self.identity_url {
            None => None,
            Some(u) => {
                if !(u.starts_with("http://") && url_authority(u).is_some()) {
                    return Err(ConfigError(format!(
                        "CLAWOS_IDENTITY_URL {u:?} is not an http URL with a host (e.g. http://127.0.0.1:2082)"
                    )));
                }
                let ttl = match self.agent_token_ttl_secs {
                    0 => 900,
                    t @ 60..=3600 => t,
                    t => {
                        return Err(ConfigError(format!(
                            "agent token lifetime {t}s: between 60 and 3600 seconds (identity-manager issues at most an hour)"
                        )));
                    }
                };
                Some(IdentitySettings {
                    url: u.trim_end_matches('/').to_owned(),
                    service_token_path: self
                        .identity_token_path
                        .clone()
                        .unwrap_or_else(|| self.state_dir.join("identity/service.token")),
                    token_ttl: Duration::from_secs(ttl),
                    llm_audience: match self.llm_audience.trim() {
                        "" => "inference-proxy".to_owned(),
                        a => a.to_owned(),
                    },
                    skills_audience: match self.skills_audience.trim() {
                        "" => "skill-manager".to_owned(),
                        a => a.to_owned(),
                    },
                })
            }
        };
        let qemu = find_in_path(&self.qemu_bin);
        let fc = find_in_path(&self.firecracker_bin);
        let kvm = crate::host::has_hardware_kvm();
        let (backend, qemu_bin, firecracker_bin) = match self.backend.as_str() {
            "qemu" | "auto" if qemu.is_some() => (
                BackendKind::Qemu,
                qemu.unwrap_or_default(),
                self.firecracker_bin,
            ),
            "firecracker" => match (fc, kvm) {
                (Some(fc), true) => (BackendKind::Firecracker, self.qemu_bin, fc),
                (None, _) => {
                    return Err(ConfigError(format!(
                        "backend firecracker: no {} binary",
                        self.firecracker_bin.display()
                    )));
                }
                (Some(_), false) => {
                    return Err(ConfigError(
                        "backend firecracker needs hardware KVM (/dev/kvm and vmx/svm); use --backend qemu".into(),
                    ));
                }
            },
            "auto" => match fc {
                Some(fc) if kvm => (BackendKind::Firecracker, self.qemu_bin, fc),
                _ => {
                    return Err(ConfigError(format!(
                        "no hypervisor: {} not found (apt-get install qemu-system-x86)",
                        self.qemu_bin.display()
                    )));
                }
            },
            "qemu" => {
                return Err(ConfigError(format!(
                    "backend qemu: {} not found (apt-get install qemu-system-x86)",
                    self.qemu_bin.display()
                )));
            }
            other => {
                return Err(ConfigError(format!(
                    "unknown backend {other:?}: auto, qemu or firecracker"
                )));
            }
        };
        // `cargo install` puts it in ~/.cargo/bin, often not on a service's PATH.
        let vhost_vsock_bin = find_in_path(&self.vhost_vsock_bin).or_else(|| {
            let home = std::env::var_os("HOME")?;
            let p = PathBuf::from(home)
                .join(".cargo/bin")
                .join(&self.vhost_vsock_bin);
            p.is_file().then_some(p)
        });
        let vsock_device_log = match self.vsock_device_log.trim() {
            "" => "error",
            level => ["off", "error", "warn", "info", "debug", "trace"]
                .into_iter()
                .find(|l| l.eq_ignore_ascii_case(level))
                .ok_or_else(|| {
                    ConfigError(format!(
                        "CLAWOS_VSOCK_DEVICE_LOG {level:?} is not a log level: off, error, warn, info, debug or trace"
                    ))
                })?,
        };
        let jailer = match &self.jailer_bin {
            None => None,
            Some(bin) => {
                if backend != BackendKind::Firecracker {
                    return Err(ConfigError(
                        "CLAWOS_JAILER is set but the backend is not firecracker".into(),
                    ));
                }
                let bin = find_in_path(bin)
                    .ok_or_else(|| ConfigError(format!("jailer {} not found", bin.display())))?;
                let user = self.jailer_user.as_deref().ok_or_else(|| {
                    ConfigError(
                        "CLAWOS_JAILER_USER (uid:gid, not root) is required with the jailer".into(),
                    )
                })?;
                let (uid, gid) = user
                    .split_once(':')
                    .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
                    .filter(|&(u, g)| u != 0 && g != 0)
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "CLAWOS_JAILER_USER {user:?} must be uid:gid, neither 0"
                        ))
                    })?;
                Some(crate::backend::firecracker::Jailer {
                    bin,
                    uid,
                    gid,
                    chroot_base: self
                        .jailer_chroot_base
                        .clone()
                        .unwrap_or_else(|| self.state_dir.join("jail")),
                    netns: self.jailer_netns.clone(),
                })
            }
        };
        if self.stop_timeout_secs == 0 || self.boot_timeout_secs == 0 {
            return Err(ConfigError("timeouts must be at least 1 second".into()));
        }
        Ok(Config {
            addr,
            token_path: self
                .token_path
                .clone()
                .unwrap_or_else(|| clawos_vm_launcher_api::token_path(&self.state_dir)),
            allowed_origins: self.allowed_origins.clone(),
            state_dir: self.state_dir,
            image_dir: self.image_dir,
            kernel_override: self.kernel_override,
            rootfs_override: self.rootfs_override,
            pinned_root_hash: self.pinned_root_hash.map(|h| h.to_ascii_lowercase()),
            public_key,
            inference_proxy_url: self.inference_proxy_url,
            inference_proxy_authority,
            skills_authority,
            monitor_url: self.monitor_url,
            identity,
            backend,
            qemu_bin,
            firecracker_bin,
            vhost_vsock_bin,
            vsock_device_log,
            jailer,
            stop_timeout: Duration::from_secs(self.stop_timeout_secs),
            boot_timeout: Duration::from_secs(self.boot_timeout_secs),
            runtime_disk_mib: 256,
            workspace_disk_mib: 1024,
            ready_probe_interval: Duration::from_millis(200),
            console_max_bytes: match self.console_max_mib {
                0 => 8 << 20,
                mib => mib.saturating_mul(1 << 20),
            },
            max_snapshots_per_vm: 16,
        })
    }
}

/// Whether `o` is an origin as browsers send it: `http(s)://host[:port]`, nothing more.
fn valid_origin(o: &str) -> bool {
    o.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', '@', ' ', ','])
    })
}

/// `host:port` of an http(s) URL (the scheme's port when none is given); `None` when
/// it is not one or names no host.
pub fn url_authority(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let auth = rest.split(['/', '?', '#']).next()?;
    if auth.is_empty() || auth.contains('@') {
        return None;
    }
    let default_port = if scheme == "https" { 443 } else { 80 };
    let (host, port) = match auth.strip_prefix('[') {
        Some(v6) => {
            let (addr, rest) = v6.split_once(']')?;
            let port = match rest {
                "" => None,
                r => Some(r.strip_prefix(':')?),
            };
            (addr, port)
        }
        None => match auth.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        },
    };
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0)?,
    };
    if host.is_empty() {
        return None;
    }
    Some(match auth.starts_with('[') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawConfig {
        RawConfig {
            addr: "127.0.0.1:0".into(),
            state_dir: "/tmp".into(),
            allow_unsigned: true,
            inference_proxy_url: "http://127.0.0.1:11435".into(),
            backend: "qemu".into(),
            qemu_bin: "/bin/sh".into(),
            firecracker_bin: "firecracker-absent".into(),
            vhost_vsock_bin: "vhost-device-vsock".into(),
            stop_timeout_secs: 5,
            boot_timeout_secs: 5,
            ..RawConfig::default()
        }
    }

    #[test]
    fn proxy_authority() {
        for (url, want) in [
            ("http://127.0.0.1:11435", Some("127.0.0.1:11435")),
            ("http://proxy.local/v1", Some("proxy.local:80")),
            ("https://proxy.local", Some("proxy.local:443")),
            ("https://[::1]:8443/x", Some("[::1]:8443")),
            ("http://[::1]", Some("[::1]:80")),
            ("nonsense", None),
            ("ftp://x:21", None),
            ("http://", None),
            ("http:///v1", None),
            ("http://:80", None),
            ("http://h:0", None),
            ("http://h:99999", None),
            ("http://h:x", None),
            ("http://user@h", None),
        ] {
            assert_eq!(url_authority(url).as_deref(), want, "{url}");
        }
    }

    #[test]
    fn unsigned_needs_explicit_opt_in() {
        let r = RawConfig {
            allow_unsigned: false,
            ..raw()
        };
        let e = r.validate().expect_err("must refuse");
        assert!(e.to_string().contains("CLAWOS_SIGNING_PUBKEY"), "{e}");
        assert!(raw().validate().is_ok());
    }

    #[test]
    fn loopback_binds_and_browser_origins_are_accepted() {
        for addr in ["127.0.0.1:2080", "[::1]:2080", "127.0.0.2:0"] {
            let cfg = RawConfig {
                addr: addr.into(),
                allowed_origins: vec![
                    "https://console.example".into(),
                    "http://localhost:8080".into(),
                ],
                ..raw()
            }
            .validate()
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert_eq!(
                cfg.token_path,
                std::path::Path::new("/tmp/launcher/admin.token")
            );
        }
    }

    #[test]
    fn the_vsock_devices_log_level_is_its_own_and_checked() {
        let level = |v: &str| {
            RawConfig {
                vsock_device_log: v.into(),
                ..raw()
            }
            .validate()
            .map(|c| c.vsock_device_log)
        };
        assert_eq!(level("").expect("default"), "error");
        assert_eq!(level("WARN").expect("warn"), "warn");
        // A filter would let `debug` in for the device's own module: one level only.
        let e = level("vhost_device_vsock=debug").expect_err("a filter");
        assert!(e.to_string().contains("CLAWOS_VSOCK_DEVICE_LOG"), "{e}");
    }

    #[test]
    fn bad_settings_are_named() {
        let cases: Vec<(RawConfig, &str)> = vec![
            (
                RawConfig {
                    addr: "nope".into(),
                    ..raw()
                },
                "listen address",
            ),
            (
                RawConfig {
                    addr: "0.0.0.0:2080".into(),
                    ..raw()
                },
                "not loopback",
            ),
            (
                RawConfig {
                    addr: "[::]:2080".into(),
                    ..raw()
                },
                "not loopback",
            ),
            (
                RawConfig {
                    addr: "192.168.1.10:2080".into(),
                    ..raw()
                },
                "no TLS",
            ),
            (
                RawConfig {
                    allowed_origins: vec!["https://ok.example".into(), "null".into()],
                    ..raw()
                },
                "allowed origin",
            ),
            (
                RawConfig {
                    allowed_origins: vec!["https://ok.example/path".into()],
                    ..raw()
                },
                "allowed origin",
            ),
            (
                RawConfig {
                    public_key: Some("zz".into()),
                    ..raw()
                },
                "CLAWOS_SIGNING_PUBKEY",
            ),
            (
                RawConfig {
                    pinned_root_hash: Some("abc".into()),
                    ..raw()
                },
                "CLAWOS_AGENT_ROOTHASH",
            ),
            (
                RawConfig {
                    inference_proxy_url: "ftp://x".into(),
                    ..raw()
                },
                "CLAWOS_INFERENCE_PROXY_URL",
            ),
            (
                RawConfig {
                    inference_proxy_url: "http:///v1".into(),
                    ..raw()
                },
                "with a host",
            ),
            (
                RawConfig {
                    monitor_url: Some("127.0.0.1:2084".into()),
                    ..raw()
                },
                "CLAWOS_MONITOR_URL",
            ),
            (
                RawConfig {
                    backend: "xen".into(),
                    ..raw()
                },
                "unknown backend",
            ),
            (
                RawConfig {
                    backend: "firecracker".into(),
                    ..raw()
                },
                "firecracker",
            ),
            (
                RawConfig {
                    image_dir: Some("/nonexistent".into()),
                    ..raw()
                },
                "image directory",
            ),
        ];
        for (r, needle) in cases {
            let e = r.validate().expect_err(needle);
            assert!(
                e.to_string().contains(needle),
                "{e} should mention {needle}"
            );
        }
    }
}
