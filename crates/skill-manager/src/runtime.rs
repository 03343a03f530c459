//! Runs skills: one wasmtime engine, components compiled once and cached on disk, and
//! one fresh store per call holding only what the manifest grants.
//!
//! A call's store has a WASI context that inherits nothing — no preopened directory,
//! no environment, no arguments, no stdio, TCP/UDP and name lookup off — the
//! `wasi:http` outgoing handler behind [`crate::outbound`], and the `clawos:skill/log`
//! import. Its memory is capped by a resource limiter (growing past the cap traps), its
//! CPU by an epoch deadline (a ticker thread advances the epoch every
//! [`EPOCH_TICK`]) and optional fuel, and the whole call, host I/O included, by the
//! manifest's timeout.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::ResourceTable;
use wasmtime::component::{Component, ComponentType, InstancePre, Lift, Linker, Lower};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::SkillError;
use crate::manifest::SkillManifest;
use crate::outbound::{
    CallHooks, Outbound, OutboundPolicy, RequestLog, RequestRecord, SecretHeader,
};

/// How often the epoch advances: the resolution of the CPU deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Log lines kept per call, and their length.
const MAX_LOG_LINES: usize = 256;
const MAX_LOG_LINE: usize = 4096;
/// Largest answer a skill may return to the agent.
pub const MAX_OUTPUT: usize = 1 << 20;
/// Host-side resources (streams, header maps, requests) one call may hold at once.
const MAX_RESOURCES: usize = 4096;
/// Largest header map a call may build, bytes of the host's representation.
const MAX_FIELDS_BYTES: usize = 64 << 10;
/// Largest input passed to a skill.
pub const MAX_INPUT: usize = 1 << 20;
/// The import the log interface is linked under.
const LOG_INTERFACE: &str = "clawos:skill/log@0.1.0";
/// The import the config interface is linked under.
const CONFIG_INTERFACE: &str = "clawos:skill/config@0.1.0";

/// `clawos:skill/log.level`.
#[derive(ComponentType, Lift, Lower, Debug, Clone, Copy, PartialEq, Eq)]
#[component(enum)]
#[repr(u8)]
pub enum LogLevel {
    #[component(name = "debug")]
    Debug,
    #[component(name = "info")]
    Info,
    #[component(name = "warn")]
    Warn,
    #[component(name = "error")]
    Error,
}

/// Caps a store's memories and tables; remembers a refused growth, so the trap it
/// causes is reported as the memory limit.
struct MemoryCap {
    max_bytes: usize,
    /// Bytes of linear memory granted so far.
    used: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    /// The cap is on all of the call's linear memories together (a component may
    /// have several).
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(desired.saturating_sub(current));
        if total > self.max_bytes {
            self.hit = true;
            wasmtime::bail!("memory limit");
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        32
    }
    fn tables(&self) -> usize {
        64
    }
    fn memories(&self) -> usize {
        8
    }
}

/// What a call's store holds.
struct CallState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: CallHooks,
    cap: MemoryCap,
    log: Vec<(LogLevel, String)>,
    config: Arc<BTreeMap<String, String>>,
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Advances the engine's epoch until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("skill-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawn the epoch ticker thread");
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The engine, its linker and the compiled-component cache.
pub struct SkillRuntime {
    engine: Engine,
    linker: Linker<CallState>,
    cache_dir: Option<PathBuf>,
    outbound: Outbound,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for SkillRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SkillRuntime")
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

/// A component compiled and linked, ready to instantiate.
#[derive(Clone)]
pub struct LoadedSkill {
    pre: InstancePre<CallState>,
    pub manifest: SkillManifest,
    /// Whether the compiled code came from the cache.
    pub from_cache: bool,
}

impl std::fmt::Debug for LoadedSkill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedSkill")
            .field("name", &self.manifest.name)
            .field("from_cache", &self.from_cache)
            .finish_non_exhaustive()
    }
}

/// What a call did, for the caller and the audit trail.
#[derive(Debug)]
pub struct CallOutcome {
    /// The skill's answer, or why there is none.
    pub result: Result<String, SkillError>,
    pub duration: Duration,
    pub requests: Vec<RequestRecord>,
    pub log: Vec<(LogLevel, String)>,
}

fn component_error(e: impl std::fmt::Display) -> SkillError {
    SkillError::Component {
        reason: e.to_string(),
    }
}

/// The full chain of a wasmtime error, for messages.
fn chain(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}

impl SkillRuntime {
    /// An engine with the component model, epoch interruption and fuel, compiled
    /// components cached in `cache_dir` (created 0700) when given.
    pub fn new(cache_dir: Option<&Path>, outbound: Outbound) -> Result<Self, SkillError> {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .max_wasm_stack(512 << 10);
        let engine = Engine::new(&config).map_err(|e| component_error(chain(&e)))?;
        let mut linker = Linker::<CallState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| component_error(chain(&e)))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| component_error(chain(&e)))?;
        linker
            .instance(LOG_INTERFACE)
            .and_then(|mut log| {
                log.func_wrap(
                    "write",
                    |mut store: wasmtime::StoreContextMut<'_, CallState>,
                     (level, message): (LogLevel, String)| {
                        let log = &mut store.data_mut().log;
                        if log.len() < MAX_LOG_LINES {
                            let mut m = message;
                            if m.len() > MAX_LOG_LINE {
                                let mut end = MAX_LOG_LINE;
                                while !m.is_char_boundary(end) {
                                    end -= 1;
                                }
                                m.truncate(end);
                            }
                            log.push((level, m));
                        }
                        Ok(())
                    },
                )
            })
            .map_err(|e| component_error(chain(&e)))?;
        linker
            .instance(CONFIG_INTERFACE)
            .and_then(|mut config| {
                config.func_wrap(
                    "get",
                    |store: wasmtime::StoreContextMut<'_, CallState>, (key,): (String,)| {
                        Ok((store.data().config.get(&key).cloned(),))
                    },
                )
            })
            .map_err(|e| component_error(chain(&e)))?;
        if let Some(d) = cache_dir {
            std::fs::create_dir_all(d)
                .and_then(|()| {
                    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                })
                .map_err(|source| SkillError::Cache {
                    path: d.to_owned(),
                    source,
                })?;
        }
        Ok(Self {
            _ticker: EpochTicker::start(engine.clone()),
            engine,
            linker,
            cache_dir: cache_dir.map(Path::to_owned),
            outbound,
        })
    }

    /// The cache file for a component: its sha256 and this engine's compatibility
    /// hash (a wasmtime upgrade or another configuration never loads stale code).
    fn cache_path(&self, wasm: &[u8]) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let mut digest = Sha256::new();
        digest.update(wasm);
        digest.update(h.finish().to_le_bytes());
        Some(dir.join(format!("{}.cwasm", hex::encode(digest.finalize()))))
    }

    /// Compiles (or loads from the cache) and links a skill's component. Refuses a
    /// component that imports anything skills do not get.
    pub fn load(&self, manifest: &SkillManifest, wasm: &[u8]) -> Result<LoadedSkill, SkillError> {
        let cached = self.cache_path(wasm);
        let mut from_cache = false;
        let component = match cached.as_ref().filter(|p| p.is_file()) {
            Some(path) => {
                // SAFETY: files in the cache directory (0700, the daemon's own) are
                // only ever written by `cache_store` below from `Component::serialize`
                // of this engine, under a name that includes the engine's
                // compatibility hash; wasmtime checks the header again on load.
                match unsafe { Component::deserialize_file(&self.engine, path) } {
                    Ok(c) => {
                        from_cache = true;
                        c
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %chain(&e), "cached component unusable; compiling again");
                        Component::new(&self.engine, wasm)
                            .map_err(|e| component_error(chain(&e)))?
                    }
                }
            }
            None => Component::new(&self.engine, wasm).map_err(|e| component_error(chain(&e)))?,
        };
        if let (Some(path), false) = (&cached, from_cache) {
            cache_store(path, &component)?;
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| component_error(chain(&e)))?;
        Ok(LoadedSkill {
            pre,
            manifest: manifest.clone(),
            from_cache,
        })
    }

    /// Calls the skill's `describe` (a check at install: the component runs).
    pub async fn describe(&self, skill: &LoadedSkill) -> CallOutcome {
        let config = Arc::new(skill.manifest.config.clone());
        self.run(
            skill,
            Vec::new(),
            config,
            Entry::Describe,
            RequestLog::default(),
        )
        .await
    }

    /// Runs the skill's `invoke` on `input` with the secrets its manifest names and its
    /// settings (the manifest's, with the operator's overrides).
    pub async fn invoke(
        &self,
        skill: &LoadedSkill,
        input: &str,
        secrets: Vec<SecretHeader>,
        config: Arc<BTreeMap<String, String>>,
    ) -> CallOutcome {
        self.invoke_recording(skill, input, secrets, config, RequestLog::default())
            .await
    }

    /// [`Self::invoke`], recording each outgoing request into `requests` as it is
    /// decided, so a caller that gives up on the call still knows what it reached.
    pub async fn invoke_recording(
        &self,
        skill: &LoadedSkill,
        input: &str,
        secrets: Vec<SecretHeader>,
        config: Arc<BTreeMap<String, String>>,
        requests: RequestLog,
    ) -> CallOutcome {
        if input.len() > MAX_INPUT {
            return CallOutcome {
                result: Err(SkillError::Failed {
                    message: format!("input larger than {MAX_INPUT} bytes"),
                }),
                duration: Duration::ZERO,
                requests: Vec::new(),
                log: Vec::new(),
            };
        }
        self.run(
            skill,
            secrets,
            config,
            Entry::Invoke(input.to_owned()),
            requests,
        )
        .await
    }

    async fn run(
        &self,
        skill: &LoadedSkill,
        secrets: Vec<SecretHeader>,
        config: Arc<BTreeMap<String, String>>,
        entry: Entry,
        records: RequestLog,
    ) -> CallOutcome {
        let started = Instant::now();
        let limits = &skill.manifest.limits;
        let policy = OutboundPolicy {
            destinations: skill.manifest.destinations(),
            secrets,
            response_max: limits.response_kib as usize * 1024,
        };
        let hooks = CallHooks::recording(self.outbound.clone(), policy, Arc::clone(&records));
        // Inherits nothing; sockets and name lookup off (wasi:http is the only way out).
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = CallState {
            wasi,
            http: {
                let mut h = WasiHttpCtx::new();
                h.set_field_size_limit(MAX_FIELDS_BYTES);
                h
            },
            table: {
                let mut t = ResourceTable::new();
                t.set_max_capacity(MAX_RESOURCES);
                t
            },
            hooks,
            cap: MemoryCap {
                max_bytes: limits.memory_mib as usize * (1 << 20),
                used: 0,
                hit: false,
            },
            log: Vec::new(),
            config,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.cap);
        let fuel = limits.fuel.unwrap_or(u64::MAX);
        let timeout = Duration::from_millis(limits.timeout_ms);
        let result = match store.set_fuel(fuel) {
            Err(e) => Err(component_error(chain(&e))),
            Ok(()) => {
                // Yield to the runtime at every epoch tick: a component spinning in
                // wasm must not hold a worker thread (the daemon has two), so other
                // calls, the API and token refreshes keep going; the call's own
                // deadline is the timeout around it.
                store.set_epoch_deadline(1);
                store.epoch_deadline_async_yield_and_update(1);
                match tokio::time::timeout(timeout, entry.call(&skill.pre, &mut store)).await {
                    Err(_) => Err(SkillError::Timeout {
                        limit_ms: limits.timeout_ms,
                    }),
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(classify(&e, store.data().cap.hit, limits)),
                }
            }
        };
        let result = result.and_then(|out| {
            if out.len() > MAX_OUTPUT {
                Err(SkillError::Failed {
                    message: format!("answer larger than {MAX_OUTPUT} bytes"),
                })
            } else {
                Ok(out)
            }
        });
        let requests = records.lock().map(|r| r.clone()).unwrap_or_default();
        CallOutcome {
            result,
            duration: started.elapsed(),
            requests,
            log: std::mem::take(&mut store.data_mut().log),
        }
    }
}

/// Which export a call runs.
enum Entry {
    Describe,
    Invoke(String),
}

impl Entry {
    async fn call(
        self,
        pre: &InstancePre<CallState>,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<Result<String, SkillError>> {
        let instance = pre.instantiate_async(&mut *store).await?;
        match self {
            Self::Describe => {
                let f = instance.get_typed_func::<(), (String,)>(&mut *store, "describe")?;
                let (out,) = f.call_async(&mut *store, ()).await?;
                Ok(Ok(out))
            }
            Self::Invoke(input) => {
                let f = instance.get_typed_func::<(String,), (Result<String, String>,)>(
                    &mut *store,
                    "invoke",
                )?;
                let (out,) = f.call_async(&mut *store, (input,)).await?;
                Ok(out.map_err(|message| SkillError::Failed { message }))
            }
        }
    }
}

/// What a wasmtime error means for the agent.
fn classify(e: &wasmtime::Error, memory_hit: bool, limits: &crate::manifest::Limits) -> SkillError {
    if memory_hit {
        return SkillError::MemoryLimit {
            limit_mib: limits.memory_mib,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => SkillError::Timeout {
            limit_ms: limits.timeout_ms,
        },
        Some(Trap::OutOfFuel) => SkillError::OutOfFuel {
            fuel: limits.fuel.unwrap_or(u64::MAX),
        },
        Some(t) => SkillError::Trap {
            reason: t.to_string(),
        },
        None => SkillError::Trap { reason: chain(e) },
    }
}

/// Writes a compiled component to the cache: a temporary file of its own (two installs
/// of one component may store it at once) renamed into place, so a reader never sees
/// half a file.
fn cache_store(path: &Path, component: &Component) -> Result<(), SkillError> {
    let err = |source| SkillError::Cache {
        path: path.to_owned(),
        source,
    };
    let bytes = component
        .serialize()
        .map_err(|e| err(std::io::Error::other(chain(&e))))?;
    clawos_service::atomic_write(path, &bytes, 0o600).map_err(err)
}
