//! The runtime's settings and its command line. Parsed by hand (a handful of flags do
//! not justify clap in a static binary that ships in every VM).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clawos_agentd_api::DEFAULT_PORT;

/// Model used when neither `--model`, `CLAWOS_MODEL` nor the env file names one.
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
/// The guest's relay to the host's inference proxy.
pub const DEFAULT_LLM_URL: &str = "http://127.0.0.1:11435";
/// Where the workspace disk is mounted in the guest.
pub const DEFAULT_WORKSPACE: &str = clawos_guest::workspace::WORKSPACE;

/// Everything a running runtime needs (the listening socket is the caller's).
#[derive(Debug, Clone)]
pub struct Config {
    /// The directory the file tools are confined to, the shell's working directory,
    /// and the home of `.clawos/sessions`.
    pub workspace: PathBuf,
    /// Base URL of the Anthropic Messages API (plain `http://` only).
    pub llm_url: String,
    /// The model tasks use unless their request names another.
    pub model: String,
    /// Sent as `x-api-key` when set (`ANTHROPIC_API_KEY`); in a VM the host's relay
    /// drops it and the proxy adds the real credential.
    pub api_key: Option<String>,
    /// `max_tokens` of every model call.
    pub max_tokens: u32,
    /// Model calls one task may make.
    pub max_steps: u32,
    /// Wall-clock time one task may take.
    pub max_task: Duration,
    /// Longest `timeout_secs` the `bash` tool accepts.
    pub max_shell: Duration,
    /// Bytes of a tool's output given to the model.
    pub output_cap: usize,
    /// The MCP server whose tools the model may call too (in a VM: the host's
    /// skill-manager through the guest's relay, `http://127.0.0.1:2083/mcp`, named by
    /// `CLAWOS_MCP_URL` in the VM's `.env` when the host offers skills); `None`: the
    /// built-in tools only.
    pub mcp_url: Option<String>,
}

impl Config {
    /// Defaults for a workspace, as the binary would have them without flags.
    pub fn new(workspace: impl Into<PathBuf>) -> Self {
        Self {
            workspace: workspace.into(),
            llm_url: DEFAULT_LLM_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            api_key: None,
            max_tokens: 4096,
            max_steps: 25,
            max_task: Duration::from_secs(900),
            max_shell: Duration::from_secs(300),
            output_cap: 16 * 1024,
            mcp_url: None,
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run { listen: SocketAddr, config: Config },
    Help,
    Version,
}

/// A command line the runtime cannot run with. The message is meant for the operator
/// reading the guest's log.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown flag {0:?} (see --help)")]
    UnknownFlag(String),
    #[error("{flag} needs a value (see --help)")]
    MissingValue { flag: String },
    #[error("{flag} {value:?}: {why}")]
    BadValue {
        flag: String,
        value: String,
        why: String,
    },
    #[error("cannot read the env file {path}: {source}")]
    EnvFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `--help`.
pub const USAGE: &str = "\
clawos-agentd: the ClawOS agent runtime. Runs the model's tool-use loop (bash,
read_file, write_file, edit_file, list_files, confined to the workspace) and serves
an OpenAI-compatible agent API.

USAGE: clawos-agentd [FLAGS]

  --listen ADDR          agent API address            [127.0.0.1:18789]
  --workspace DIR        workspace root               [/workspace]
  --llm-url URL          Anthropic Messages API base, plain http
                                                      [http://127.0.0.1:11435]
  --model NAME           model (else $CLAWOS_MODEL, else CLAWOS_MODEL in
                         --env-file)                  [claude-sonnet-4-5]
  --env-file PATH        KEY=VALUE file to read CLAWOS_MODEL and
                         CLAWOS_MCP_URL from (e.g. /workspace/.env)
  --mcp-url URL          MCP server (Streamable HTTP, plain http) whose
                         tools the model may call too; empty for none
                                                      [$CLAWOS_MCP_URL, else
                                                       CLAWOS_MCP_URL in --env-file]
  --max-tokens N         max_tokens per model call    [4096]
  --max-steps N          model calls per task         [25]
  --max-task-secs N      wall-clock seconds per task  [900]
  --max-shell-secs N     longest bash timeout_secs    [300]
  --output-cap BYTES     tool output given to the model [16384]
  -h, --help             this text
  -V, --version          the version

ENVIRONMENT: CLAWOS_MODEL; CLAWOS_MCP_URL; ANTHROPIC_API_KEY (sent as x-api-key
if set).
Routes: GET /healthz, POST /v1/chat/completions, GET /v1/sessions.
Sessions: <workspace>/.clawos/sessions/<id>.jsonl.
";

fn number<T>(flag: &str, value: &str, min: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let bad = |why: String| ConfigError::BadValue {
        flag: flag.to_owned(),
        value: value.to_owned(),
        why,
    };
    let n: T = value
        .parse()
        .map_err(|_| bad("not a whole number".to_owned()))?;
    if n < min {
        return Err(bad(format!("must be at least {min}")));
    }
    Ok(n)
}

/// Parses the command line (without the program name). `env` looks up environment
/// variables (a parameter so tests need not touch the process's environment).
pub fn parse_args(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, ConfigError> {
    let mut config = Config::new(DEFAULT_WORKSPACE);
    let mut listen = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT));
    let mut model_flag = None;
    let mut env_file = None;
    let mut mcp_flag: Option<String> = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => {}
        }
        let known = [
            "--listen",
            "--workspace",
            "--llm-url",
            "--model",
            "--env-file",
            "--mcp-url",
            "--max-tokens",
            "--max-steps",
            "--max-task-secs",
            "--max-shell-secs",
            "--output-cap",
        ];
        if !known.contains(&flag.as_str()) {
            return Err(ConfigError::UnknownFlag(arg));
        }
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| ConfigError::MissingValue { flag: flag.clone() })?,
        };
        let bad = |why: &str| ConfigError::BadValue {
            flag: flag.clone(),
            value: value.clone(),
            why: why.to_owned(),
        };
        match flag.as_str() {
            "--listen" => {
                listen = value
                    .parse()
                    .map_err(|_| bad("not an address like 127.0.0.1:18789"))?;
            }
            "--workspace" => {
                if value.is_empty() {
                    return Err(bad("empty"));
                }
                config.workspace = PathBuf::from(&value);
            }
            "--llm-url" => {
                crate::llm::Endpoint::parse(&value).map_err(|e| bad(&e.to_string()))?;
                config.llm_url = value;
            }
            "--model" => {
                if value.trim().is_empty() {
                    return Err(bad("empty"));
                }
                model_flag = Some(value);
            }
            "--env-file" => env_file = Some(PathBuf::from(value)),
            "--mcp-url" => {
                if !value.is_empty() {
                    crate::llm::Endpoint::parse(&value).map_err(|e| bad(&e.to_string()))?;
                }
                mcp_flag = Some(value);
            }
            "--max-tokens" => config.max_tokens = number(&flag, &value, 1)?,
            "--max-steps" => config.max_steps = number(&flag, &value, 1)?,
            "--max-task-secs" => {
                config.max_task = Duration::from_secs(number(&flag, &value, 1)?);
            }
            "--max-shell-secs" => {
                config.max_shell = Duration::from_secs(number(&flag, &value, 1)?);
            }
            "--output-cap" => config.output_cap = number(&flag, &value, 256)?,
            _ => return Err(ConfigError::UnknownFlag(arg)),
        }
    }
    let from_file = match &env_file {
        Some(path) => read_env_file(path)?,
        None => EnvFileValues::default(),
    };
    config.model = model_flag
        .or_else(|| env("CLAWOS_MODEL").filter(|m| !m.trim().is_empty()))
        .or(from_file.model)
        .unwrap_or_else(|| DEFAULT_MODEL.to_owned());
    // A URL from the environment or the file that does not parse is ignored (and
    // logged when the runtime starts): the built-in tools still work.
    config.mcp_url = mcp_flag
        .or_else(|| env("CLAWOS_MCP_URL"))
        .or(from_file.mcp_url)
        .filter(|u| !u.trim().is_empty());
    config.api_key = env("ANTHROPIC_API_KEY").filter(|k| !k.is_empty());
    Ok(Command::Run { listen, config })
}

/// What the runtime reads from an env file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnvFileValues {
    pub model: Option<String>,
    pub mcp_url: Option<String>,
}

/// `CLAWOS_MODEL` and `CLAWOS_MCP_URL` from a `KEY=VALUE` file (the VM's
/// `/workspace/.env`): `#` comments, an optional `export `, optional quotes. A file that
/// does not exist yields nothing (the runtime still works with its default model); one
/// that cannot be read is an error. Nothing else of the file is kept: it may hold values
/// that are none of the runtime's business.
pub fn read_env_file(path: &Path) -> Result<EnvFileValues, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(EnvFileValues::default()),
        Err(source) => {
            return Err(ConfigError::EnvFile {
                path: path.to_owned(),
                source,
            });
        }
    };
    Ok(EnvFileValues {
        model: env_value(&text, "CLAWOS_MODEL"),
        mcp_url: env_value(&text, "CLAWOS_MCP_URL"),
    })
}

/// The last value of `key` in `KEY=VALUE` text.
fn env_value(text: &str, key: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() != key {
            continue;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        found = (!v.is_empty()).then(|| v.to_owned());
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Command, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_args(args.iter().map(|s| s.to_string()), move |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    fn run(args: &[&str], env: &[(&str, &str)]) -> (SocketAddr, Config) {
        match parse(args, env) {
            Ok(Command::Run { listen, config }) => (listen, config),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let (listen, c) = run(&[], &[]);
        assert_eq!(listen.to_string(), "127.0.0.1:18789");
        assert_eq!(c.workspace, Path::new("/workspace"));
        assert_eq!(c.model, DEFAULT_MODEL);
        assert_eq!(c.llm_url, DEFAULT_LLM_URL);
        assert_eq!(c.max_steps, 25);
        assert_eq!(c.max_task, Duration::from_secs(900));
        assert_eq!(c.output_cap, 16384);
        assert!(c.api_key.is_none());
    }

    #[test]
    fn flags_both_spellings() {
        let (listen, c) = run(
            &[
                "--listen=0.0.0.0:1",
                "--max-steps",
                "3",
                "--output-cap=1000",
                "--model",
                "m1",
            ],
            &[("CLAWOS_MODEL", "m2"), ("ANTHROPIC_API_KEY", "k")],
        );
        assert_eq!(listen.port(), 1);
        assert_eq!(c.max_steps, 3);
        assert_eq!(c.output_cap, 1000);
        assert_eq!(c.model, "m1", "the flag wins over the environment");
        assert_eq!(c.api_key.as_deref(), Some("k"));
    }

    #[test]
    fn model_precedence_env_then_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join(".env");
        std::fs::write(
            &f,
            "# c\nCLAWOS_AGENT_NAME=a\nexport CLAWOS_MODEL=\"claude-x\"\nOTHER=1\n",
        )
        .expect("write");
        let fs = f.to_string_lossy().into_owned();
        let (_, c) = run(&["--env-file", &fs], &[("CLAWOS_MODEL", "from-env")]);
        assert_eq!(c.model, "from-env");
        let (_, c) = run(&["--env-file", &fs], &[]);
        assert_eq!(c.model, "claude-x");
        let missing = d.path().join("nope").to_string_lossy().into_owned();
        let (_, c) = run(&["--env-file", &missing], &[]);
        assert_eq!(c.model, DEFAULT_MODEL);
    }

    #[test]
    fn the_mcp_server_comes_from_the_flag_the_environment_or_the_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join(".env");
        std::fs::write(&f, "CLAWOS_MCP_URL=http://127.0.0.1:2083/mcp\n").expect("write");
        let fs = f.to_string_lossy().into_owned();
        let (_, c) = run(&[], &[]);
        assert_eq!(c.mcp_url, None, "no skills unless the host says so");
        let (_, c) = run(&["--env-file", &fs], &[]);
        assert_eq!(c.mcp_url.as_deref(), Some("http://127.0.0.1:2083/mcp"));
        let (_, c) = run(&["--env-file", &fs], &[("CLAWOS_MCP_URL", "http://h:1/x")]);
        assert_eq!(c.mcp_url.as_deref(), Some("http://h:1/x"));
        let (_, c) = run(&["--env-file", &fs, "--mcp-url", ""], &[]);
        assert_eq!(c.mcp_url, None, "an empty flag turns skills off");
        let e = parse(&["--mcp-url", "https://h/mcp"], &[]).expect_err("https");
        assert!(e.to_string().contains("--mcp-url"), "{e}");
    }

    #[test]
    fn errors_name_the_flag() {
        for (args, want) in [
            (&["--bogus"][..], "unknown flag \"--bogus\""),
            (&["--max-steps"][..], "--max-steps needs a value"),
            (
                &["--max-steps", "x"][..],
                "--max-steps \"x\": not a whole number",
            ),
            (&["--max-steps", "0"][..], "must be at least 1"),
            (&["--listen", "nowhere"][..], "--listen \"nowhere\""),
            (&["--llm-url", "https://x"][..], "plain http"),
        ] {
            let e = parse(args, &[]).expect_err("must fail").to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        assert!(matches!(parse(&["--help"], &[]), Ok(Command::Help)));
        assert!(matches!(parse(&["-V"], &[]), Ok(Command::Version)));
    }
}
