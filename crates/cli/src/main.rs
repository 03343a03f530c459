//! `clawos`: the operator's command line.

mod agent;
mod audit;
mod exec;
mod exit;
mod host;
mod identity;
mod image;
mod output;
mod remote;
mod skill;
mod terminal;
mod token;
mod usage;
mod vm;
mod workflow;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clawos_vm_launcher_api::{DEFAULT_URL, LauncherClient};

use crate::exit::Exit;

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 conflict (e.g. already running, paused),
5 image refused (signature/hash/size), 6 the VM failed, 7 a service cannot be reached,
8 rate limited, 9 a credential was missing or refused.
`vm exec` exits with the command's own code (124 on --timeout, 128 on a signal).

`vm` commands send the launcher's operator credential, read from
$CLAWOS_STATE_DIR/launcher/admin.token (or the file CLAWOS_LAUNCHER_TOKEN_PATH names).
On a terminal, `vm logs` and `vm exec` show control characters a VM prints as text
(`\x1b`) unless --raw; pipes get the bytes unchanged.

`up`, `down`, `status` read the host's configuration: --config FILE, else
$CLAWOS_STATE_DIR/clawos.toml when it exists, over the built-in defaults
(`clawos config default`), with CLAWOS_<SECTION>_<KEY> variables over both.

Environment: CLAWOS_STATE_DIR (default ~/.clawos; to find credentials and the image
store, /var/lib/clawos when ~/.clawos does not exist and it does), CLAWOS_LAUNCHER_URL,
CLAWOS_LAUNCHER_TOKEN_PATH, CLAWOS_SIGNING_PUBKEY, CLAWOS_GUEST_BIN_DIR, CLAWOS_SKILLS_URL,
CLAWOS_SKILLS_TOKEN_PATH.";

#[derive(Debug, Parser)]
#[command(name = "clawos", version, about = "Run AI agents in signed, verified microVMs", after_help = AFTER_HELP)]
struct Cli {
    /// vm-launcher URL.
    #[arg(long, global = true, env = "CLAWOS_LAUNCHER_URL", default_value = DEFAULT_URL)]
    launcher_url: String,
    /// identity-manager URL.
    #[arg(
        long,
        global = true,
        env = "CLAWOS_IDENTITY_URL",
        default_value = clawos_identity_manager_api::DEFAULT_URL
    )]
    identity_url: String,
    /// orchestrator URL.
    #[arg(
        long,
        global = true,
        env = "CLAWOS_ORCHESTRATOR_URL",
        default_value = clawos_orchestrator_api::DEFAULT_URL
    )]
    orchestrator_url: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// Drive a remote ClawOS host through its control plane (https://host:8080)
    /// instead of the daemons on this host; `clawos login` first.
    #[arg(long, global = true, env = "CLAWOS_SERVER")]
    server: Option<String>,
    /// Trust the control plane's certificate through this PEM CA (or the self-signed
    /// certificate itself).
    #[arg(long, global = true, env = "CLAWOS_SERVER_CA")]
    ca: Option<PathBuf>,
    /// Trust exactly the control-plane certificate with this SHA-256 fingerprint.
    #[arg(long, global = true, env = "CLAWOS_SERVER_FINGERPRINT")]
    fingerprint: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bring this host up: every daemon clawos.toml asks for, wired together, each
    /// healthy before the next; already running ones are left as they are.
    Up(host::ConfigArgs),
    /// Stop this host's VMs, then its daemons (SIGTERM, each drains; killed after
    /// stop_timeout_secs).
    Down(host::DownArgs),
    /// This host's daemons: state, pid, address, uptime. Exits 7 while one the
    /// configuration asks for is not up.
    Status(host::ConfigArgs),
    /// The host's configuration file (clawos.toml).
    #[command(subcommand)]
    Config(host::ConfigCmd),
    /// Create an Ed25519 image-signing key (0600) and print its public key.
    Keygen {
        /// Where to write the private key [default: $CLAWOS_STATE_DIR/signing.key].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build, sign and verify agent images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Start, list, stop and inspect agent VMs.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Give a VM's agent tasks and list its sessions.
    #[command(subcommand)]
    Agent(agent::AgentCmd),
    /// Multi-agent workflows on the orchestrator: each step in its own agent VM.
    #[command(subcommand)]
    Workflow(workflow::WorkflowCmd),
    /// Agent tokens from identity-manager.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// identity-manager keys.
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
    /// LLM usage per agent and model, from inference-proxy's ledger.
    Usage(usage::UsageArgs),
    /// Skills (sandboxed WebAssembly tools agents call over MCP) on skill-manager.
    Skill(skill::SkillArgs),
    /// The syscall audit trail from monitor-daemon.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Log in to a control plane (--server, with --ca or --fingerprint): the operator
    /// token is read from standard input and kept 0600 in ~/.config/clawos.
    Login(remote::LoginArgs),
    /// Forget the login for --server.
    Logout,
    /// Operators of the control plane: who am I, API tokens (locally as the host's
    /// admin, or with --server).
    #[command(subcommand)]
    Operator(remote::OperatorCmd),
}

/// Where the Debian package's daemons keep their state.
const PACKAGED_STATE_DIR: &str = "/var/lib/clawos";

/// Where a command finds the host's credentials and image store: `$CLAWOS_STATE_DIR`;
/// else `~/.clawos` (where `clawos up` and daemons started by hand keep them); else,
/// when that does not exist, [`PACKAGED_STATE_DIR`] if it is a directory (a host
/// installed from the package or the NixOS module) — so that `sudo clawos vm list`
/// works there as it is (sudo passes no `CLAWOS_STATE_DIR`). What a command writes of
/// its own (keys, caches, a host it runs) goes to [`own_state_dir`].
pub fn state_dir() -> PathBuf {
    match std::env::var_os("CLAWOS_STATE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => state_dir_between(
            clawos_service::default_state_dir(),
            std::path::Path::new(PACKAGED_STATE_DIR),
        ),
    }
}

/// Where a command keeps what is its own: the host it runs (`clawos up`, `down`,
/// `status`, `config`), signing keys (`keygen`, `image sign`, `skill sign`), the image
/// build's cache and output, a master-key rotation: `$CLAWOS_STATE_DIR`, else
/// `~/.clawos` — never a packaged host's state, whose daemons run as their own users
/// and whose purge deletes it.
pub fn own_state_dir() -> PathBuf {
    std::env::var_os("CLAWOS_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(clawos_service::default_state_dir)
}

/// `home` (the per-user default) unless it is missing and `packaged` is a directory.
fn state_dir_between(home: PathBuf, packaged: &std::path::Path) -> PathBuf {
    if !home.exists() && packaged.is_dir() {
        packaged.to_owned()
    } else {
        home
    }
}

/// Runs a command that talks to a service on a single-threaded runtime, and shuts the
/// runtime down before returning. The shutdown does not wait for blocking reads still
/// in flight: `vm exec -i`'s stdin read cannot be cancelled, and would otherwise hold
/// the process until the operator typed a line. Commands flush their own async stdout
/// and stderr before they finish.
fn block_on<T>(fut: impl Future<Output = Result<T, Exit>>) -> Result<T, Exit> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit(1, e.into()))?;
    let result = rt.block_on(fut);
    rt.shutdown_background();
    result
}

/// Runs the command. `Ok` carries the exit status: 0, or a `vm exec` command's own.
fn run(cli: Cli) -> Result<u8, Exit> {
    let ok = |()| 0;
    let server = remote::ServerArgs {
        server: cli.server.clone(),
        ca: cli.ca.clone(),
        fingerprint: cli.fingerprint.clone(),
    };
    match cli.cmd {
        Cmd::Up(_) | Cmd::Down(_) | Cmd::Status(_) | Cmd::Config(_) if server.server.is_some() => {
            return Err(Exit(
                2,
                anyhow::anyhow!(
                    "up, down, status and config run on the host itself, not through --server"
                ),
            ));
        }
        Cmd::Up(args) => return host::up(args, cli.json),
        Cmd::Down(args) => return host::down(args, cli.json),
        Cmd::Status(args) => return host::status(args, cli.json),
        Cmd::Config(cmd) => return host::config(cmd, cli.json),
        Cmd::Login(args) => return block_on(remote::login(&server, args, cli.json)).map(ok),
        Cmd::Logout => return remote::logout(&server).map(ok),
        Cmd::Operator(cmd) => {
            let client = if server.server.is_some() {
                remote::client(&server)?
            } else {
                remote::local_client(&server)?
            };
            return block_on(remote::operator(&client, cmd, cli.json)).map(ok);
        }
        _ => {}
    }
    // Commands that work on this machine's files (keys, image bundles) run here
    // either way; `image add` writes the host's image store and so runs on the host.
    match cli.cmd {
        Cmd::Keygen { out } => return image::keygen(out, cli.json).map(ok),
        Cmd::Skill(args) if args.is_local_file_command() => {
            return skill::run_local(args, cli.json).map(ok);
        }
        Cmd::Image(cmd) if !cmd.asks_launcher() => {
            if server.server.is_some() && matches!(cmd, image::ImageCmd::Add { .. }) {
                return Err(remote::not_remote("image add"));
            }
            return image::run(cmd, cli.json).map(ok);
        }
        _ => {}
    }
    if server.server.is_some() {
        let cp = remote::client(&server)?;
        let client = cp.vms();
        return match cli.cmd {
            Cmd::Vm(cmd) => block_on(vm::run(cmd, &client, cli.json)),
            Cmd::Agent(cmd) => block_on(agent::run(cmd, &client, cli.json)),
            Cmd::Image(cmd) => block_on(image::run_launcher(cmd, &client, cli.json)),
            Cmd::Workflow(cmd) => block_on(workflow::run(cmd, &cp.workflows(), cli.json)),
            Cmd::Token(cmd) => block_on(token::run(cmd, &cp.agent_tokens(), cli.json)).map(ok),
            Cmd::Usage(args) => block_on(usage::run(args, &cp.usage(), cli.json)).map(ok),
            Cmd::Audit(cmd) => audit::run(cmd, Some(&cp), cli.json).map(ok),
            Cmd::Identity(cmd) => {
                identity::run(cmd, &cli.identity_url, Some(cp.agent_tokens())).map(ok)
            }
            Cmd::Skill(_) => Err(Exit(
                2,
                anyhow::anyhow!(
                    "`clawos skill` is not served by the control plane yet: run it on the host"
                ),
            )),
            Cmd::Keygen { .. }
            | Cmd::Login(_)
            | Cmd::Logout
            | Cmd::Operator(_)
            | Cmd::Up(_)
            | Cmd::Down(_)
            | Cmd::Status(_)
            | Cmd::Config(_) => Ok(0),
        };
    }
    match cli.cmd {
        Cmd::Login(_)
        | Cmd::Logout
        | Cmd::Operator(_)
        | Cmd::Keygen { .. }
        | Cmd::Up(_)
        | Cmd::Down(_)
        | Cmd::Status(_)
        | Cmd::Config(_) => Ok(0),
        Cmd::Image(cmd) => with_launcher(&cli.launcher_url, |client| {
            block_on(image::run_launcher(cmd, client, cli.json))
        }),
        Cmd::Token(cmd) => block_on(token::run_local(cmd, &cli.identity_url, cli.json)).map(ok),
        Cmd::Audit(cmd) => audit::run(cmd, None, cli.json).map(ok),
        Cmd::Usage(args) => usage::run_local(args, cli.json).map(ok),
        Cmd::Skill(args) => skill::run_local(args, cli.json).map(ok),
        Cmd::Identity(cmd) => identity::run(cmd, &cli.identity_url, None).map(ok),
        Cmd::Vm(cmd) => with_launcher(&cli.launcher_url, |client| {
            block_on(vm::run(cmd, client, cli.json))
        }),
        Cmd::Agent(cmd) => with_launcher(&cli.launcher_url, |client| {
            block_on(agent::run(cmd, client, cli.json))
        }),
        Cmd::Workflow(cmd) => {
            let token = clawos_orchestrator_api::local_token(&state_dir()).map_err(|why| {
                Exit(
                    9,
                    anyhow::anyhow!(
                        "no orchestrator operator credential: {why} (run as the orchestrator's user, or set CLAWOS_STATE_DIR or CLAWOS_ORCHESTRATOR_TOKEN_PATH)"
                    ),
                )
            })?;
            let client =
                clawos_orchestrator_api::OrchestratorClient::new(&cli.orchestrator_url, &token);
            block_on(workflow::run(cmd, &client, cli.json))
        }
    }
}

/// Runs a launcher command with the local operator's credential, found as the launcher
/// made it. Without one the launcher answers 401; the error then says why none was sent.
fn with_launcher(
    url: &str,
    f: impl FnOnce(&LauncherClient) -> Result<u8, Exit>,
) -> Result<u8, Exit> {
    let state = state_dir();
    let (client, missing) = match clawos_vm_launcher_api::local_token(&state) {
        Ok(t) => (LauncherClient::new(url).with_token(&t), None),
        Err(why) => (LauncherClient::new(url), Some(why)),
    };
    f(&client).map_err(|Exit(code, e)| match missing {
                Some(why) if code == 9 => Exit(
                    code,
                    e.context(format!(
                        "no operator credential was sent: {why} (run as the launcher's user, or set CLAWOS_STATE_DIR or CLAWOS_LAUNCHER_TOKEN_PATH)"
                    )),
                ),
        _ => Exit(code, e),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    exit::exit_code(run(cli))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_dir_is_the_users_then_a_packaged_hosts() {
        let d = tempfile::tempdir().expect("tmp");
        let (home, packaged) = (
            d.path().join("home/.clawos"),
            d.path().join("var/lib/clawos"),
        );
        // Neither: the user's (made when first used).
        assert_eq!(state_dir_between(home.clone(), &packaged), home);
        // A packaged host, nothing of the user's: the host's.
        std::fs::create_dir_all(&packaged).expect("packaged");
        assert_eq!(state_dir_between(home.clone(), &packaged), packaged);
        // The user's own, once it exists, wins.
        std::fs::create_dir_all(&home).expect("home");
        assert_eq!(state_dir_between(home.clone(), &packaged), home);
    }
}
