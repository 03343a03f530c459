//! `clawos-skill-build`: C sources for the `clawos:skill` world → a WebAssembly component.
//!
//! ```sh
//! clawos-skill-build -o skill.wasm src/main.c [more.c ...]
//! ```
//!
//! 1. resolves the world: the `clawos:skill` WIT (`crates/skill-manager/wit`, or
//!    `--wit DIR`) over the WASI packages wasmtime implements, taken from the
//!    `wasmtime-wasi-http` crate's own WIT (found with `cargo metadata`, or
//!    `--wasi-wit DIR`), so a skill is built against exactly what the host links;
//! 2. generates the C bindings (wit-bindgen's C generator) into a scratch directory:
//!    `skill.h`, `skill.c` and the object that carries the component type;
//! 3. compiles and links with clang for `wasm32-wasi` against the system's wasi-libc
//!    (Debian's `wasi-libc`, `lld`, `libclang-rt-*-dev-wasm32`), reactor model;
//! 4. turns the core module into a component (wit-component), adapting whatever
//!    WASI preview 1 calls wasi-libc makes to preview 2 with the official adapter.
//!
//! The skill's code includes `skill.h` (the scratch directory is on the include path)
//! and implements `exports_skill_describe` and `exports_skill_invoke`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Parser;
use wit_bindgen_core::wit_parser::Resolve;

#[derive(Debug, Parser)]
#[command(version, about = "Build a ClawOS skill component from C sources")]
struct Args {
    /// The component to write.
    #[arg(short, long)]
    output: PathBuf,
    /// The world to build for.
    #[arg(long, default_value = "skill")]
    world: String,
    /// More WIT directories, read after the skill-manager's `wit/` (a world there may
    /// `include clawos:skill/skill@0.1.0`); the world is looked up in the last one.
    #[arg(long)]
    wit: Vec<PathBuf>,
    /// Directory of the WASI WIT packages (default: the `wasmtime-wasi-http` crate's).
    #[arg(long)]
    wasi_wit: Option<PathBuf>,
    /// The C compiler (needs the wasm32 target: Debian's clang has it).
    #[arg(long, env = "CLAWOS_SKILL_CC", default_value = "clang")]
    cc: String,
    /// Extra compiler flags (repeatable).
    #[arg(long = "cflag", allow_hyphen_values = true)]
    cflags: Vec<String>,
    /// Also write the generated bindings (`skill.h`, ...) here, to read while writing a
    /// skill.
    #[arg(long)]
    bindings_dir: Option<PathBuf>,
    /// C sources.
    #[arg(required = true)]
    sources: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut wit_dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../skill-manager/wit")];
    wit_dirs.extend(args.wit.iter().cloned());
    let wasi_wit = match &args.wasi_wit {
        Some(d) => d.clone(),
        None => wasi_wit_from_cargo()?,
    };

    let mut resolve = Resolve::default();
    resolve
        .push_dir(&wasi_wit)
        .with_context(|| format!("reading the WASI WIT in {}", wasi_wit.display()))?;
    let mut pkg = None;
    for dir in &wit_dirs {
        let (id, _) = resolve
            .push_dir(dir)
            .with_context(|| format!("reading the WIT in {}", dir.display()))?;
        pkg = Some((id, dir));
    }
    let (pkg, dir) = pkg.context("no WIT directory")?;
    let world = resolve
        .select_world(&[pkg], Some(&args.world))
        .with_context(|| format!("no world {:?} in {}", args.world, dir.display()))?;

    let scratch = tempfile::tempdir().context("scratch directory")?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)
        .context("generating the C bindings")?;
    let mut objects = Vec::new();
    for (name, contents) in files.iter() {
        let path = scratch.path().join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        if name.ends_with(".c") || name.ends_with(".o") {
            objects.push(path);
        }
        if let Some(d) = &args.bindings_dir {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            std::fs::write(d.join(name), contents)
                .with_context(|| format!("writing {}", d.join(name).display()))?;
        }
    }

    let core = scratch.path().join("core.wasm");
    let mut cc = Command::new(&args.cc);
    cc.args([
        "--target=wasm32-wasi",
        // Debian's wasi-libc: /usr/lib/wasm32-wasi and /usr/include/wasm32-wasi.
        "--sysroot=/usr",
        "-mexec-model=reactor",
        "-O2",
        "-Wall",
        "-Werror",
        // The generated bindings leave some parameters unused.
        "-Wno-unused-parameter",
        "-fuse-ld=lld",
    ])
    .arg("-I")
    .arg(scratch.path())
    .args(&args.cflags)
    .args(&args.sources)
    .args(&objects)
    .arg("-o")
    .arg(&core);
    let status = cc
        .status()
        .with_context(|| format!("running {} (install clang, lld and wasi-libc)", args.cc))?;
    if !status.success() {
        bail!("{} failed ({status})", args.cc);
    }

    let module = std::fs::read(&core).context("reading the core module")?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .context("the core module does not carry the skill world")?
        .adapter(
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )
        .context("the WASI adapter")?
        .validate(true)
        .encode()
        .context("componentizing")?;
    std::fs::write(&args.output, &component)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "{}: {} bytes (core module {} bytes)",
        args.output.display(),
        component.len(),
        module.len()
    );
    Ok(())
}

/// The `wit/` directory of the `wasmtime-wasi-http` crate this workspace builds with.
fn wasi_wit_from_cargo() -> Result<PathBuf> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--manifest-path",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"))
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "wasmtime-wasi-http")
        .and_then(|p| p["manifest_path"].as_str())
        .context("wasmtime-wasi-http is not in the workspace's dependencies (pass --wasi-wit)")?;
    Ok(Path::new(manifest)
        .parent()
        .context("manifest path has no parent")?
        .join("wit"))
}
