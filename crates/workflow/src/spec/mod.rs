//! Workflow specs: the YAML format, its validation, and the validated [`Workflow`].
//!
//! A spec is validated completely before anything runs, and every refusal names the
//! line and the field (`line 14, steps[2].needs[0]: unknown step "reserch" (steps are:
//! research, write)`), because the people writing specs fix them from the message.
//! Syntax and type errors come from `serde_yaml` with its location; for semantic
//! errors the offending node is found again in the source (the `locate` module).
//!
//! ```yaml
//! apiVersion: clawos.dev/v1
//! kind: Workflow
//! metadata: { name: research-report }
//! inputs: { topic: { default: "unikernels" } }
//! agents:
//!   researcher: { image: default, model: claude-sonnet-4-5, mem_mib: 512, budget_tokens: 50000, vm: fresh }
//! steps:
//!   - id: research
//!     agent: researcher
//!     prompt: "Research {{ inputs.topic }}."
//!     timeout: 10m
//!   - id: approve
//!     kind: approval
//!     needs: [research]
//!     timeout: 1h
//!     default: reject
//! ```
//!
//! See the crate documentation for every field.

mod locate;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use locate::{Seg, locate, path_string};

use crate::duration::{DurationError, format_duration, parse_duration};
use crate::template::{Condition, Ref, Template, TemplateError};

/// The only `apiVersion` this engine reads.
pub const API_VERSION: &str = "clawos.dev/v1";
/// The only `kind` of document this engine reads.
pub const KIND: &str = "Workflow";
/// An agent or map step's timeout when the spec gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// A map step's `max_parallel` when the spec gives none.
pub const DEFAULT_MAX_PARALLEL: u32 = 4;

/// Size limits applied to specs (and to map item lists at run time). They keep one
/// spec from tying up the daemon: every check is linear in the spec's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest spec source, in bytes (1 MiB).
    pub max_spec_bytes: usize,
    /// Most steps in one workflow (1,000).
    pub max_steps: usize,
    /// Largest prompt template, in bytes (256 KiB).
    pub max_prompt_bytes: usize,
    /// Most items a map step may fan out to, literal or computed at run time (1,000).
    pub max_map_items: usize,
    /// Largest `max_parallel` of a map step (64).
    pub max_parallel: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_spec_bytes: 1 << 20,
            max_steps: 1_000,
            max_prompt_bytes: 256 << 10,
            max_map_items: 1_000,
            max_parallel: 64,
        }
    }
}

impl Limits {
    /// No size limits: used to re-read the specs of runs already accepted, so that
    /// lowering a limit never strands a run in the journal.
    pub fn unlimited() -> Self {
        Self {
            max_spec_bytes: usize::MAX,
            max_steps: usize::MAX,
            max_prompt_bytes: usize::MAX,
            max_map_items: usize::MAX,
            max_parallel: u32::MAX,
        }
    }
}

/// A refused spec: where (line, column, field path) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// 1-based line in the spec source, when the problem has a place.
    pub line: Option<usize>,
    /// 1-based column, with `line`.
    pub column: Option<usize>,
    /// The field, e.g. `steps[2].needs[0]`; empty for the whole document.
    pub path: String,
    /// What is wrong.
    #[source]
    pub kind: SpecErrorKind,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.path.is_empty()) {
            (Some(l), false) => write!(f, "line {l}, {}: {}", self.path, self.kind),
            (Some(l), true) => write!(f, "line {l}: {}", self.kind),
            (None, false) => write!(f, "{}: {}", self.path, self.kind),
            (None, true) => write!(f, "{}", self.kind),
        }
    }
}

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecErrorKind {
    /// The source is larger than [`Limits::max_spec_bytes`].
    #[error("the spec is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// Not YAML, an unknown field, a wrong type, a missing required field (as
    /// `serde_yaml` words it).
    #[error("{message}")]
    Syntax { message: String },
    /// A field that must have one exact value has another.
    #[error("expected {expected:?}, found {found:?}")]
    WrongValue {
        expected: &'static str,
        found: String,
    },
    /// A workflow, agent, step or input name that breaks its rule.
    #[error("bad name {name:?}: {rule}")]
    BadName { name: String, rule: &'static str },
    /// An unparseable or out-of-range duration.
    #[error("bad duration: {0}")]
    BadDuration(#[from] DurationError),
    /// A duration of zero where one is needed.
    #[error("must be longer than 0s")]
    ZeroDuration,
    /// A number outside its range.
    #[error("{value} is out of range ({range})")]
    OutOfRange { value: String, range: String },
    /// The same key twice in a mapping (`inputs`, `agents`).
    #[error("duplicate key {key:?}")]
    DuplicateKey { key: String },
    /// Two steps with one id.
    #[error("duplicate step id {id:?} (first used by steps[{first}])")]
    DuplicateStep { id: String, first: usize },
    /// More steps than [`Limits::max_steps`].
    #[error("{count} steps, more than the limit of {limit}")]
    TooManySteps { count: usize, limit: usize },
    /// A literal `over` list longer than [`Limits::max_map_items`].
    #[error("{count} items, more than the limit of {limit}")]
    TooManyItems { count: usize, limit: usize },
    /// A prompt larger than [`Limits::max_prompt_bytes`].
    #[error("the prompt is {size} bytes, more than the limit of {limit}")]
    PromptTooLarge { size: usize, limit: usize },
    /// A reference to a step that does not exist.
    #[error("unknown step {name:?} (steps are: {known})")]
    UnknownStep { name: String, known: String },
    /// A step naming an agent that `agents` does not define.
    #[error("unknown agent {name:?} (agents are: {known})")]
    UnknownAgent { name: String, known: String },
    /// A reference to an input that `inputs` does not define.
    #[error("unknown input {name:?} (inputs are: {known})")]
    UnknownInput { name: String, known: String },
    /// A step reading a step that is not guaranteed to have finished before it.
    #[error(
        "step {step:?} reads step {reads:?}, which is not among its needs (directly or through other needs); add it to needs"
    )]
    NotANeed { step: String, reads: String },
    /// A step needing itself.
    #[error("step {id:?} needs itself")]
    SelfNeed { id: String },
    /// Needs that loop.
    #[error("cycle: {cycle} (each step needs the next)")]
    Cycle { cycle: String },
    /// A field required by the step's kind is absent.
    #[error("missing field `{field}` (required on {kind} steps)")]
    Missing {
        field: &'static str,
        kind: &'static str,
    },
    /// A field that the step's kind does not use.
    #[error("field `{field}` is not allowed on {kind} steps")]
    NotAllowed {
        field: &'static str,
        kind: &'static str,
    },
    /// A bad template or condition.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// `{{ item }}`/`{{ index }}` outside a map step's prompt.
    #[error("`{{{{ {reference} }}}}` is only available in a map step's prompt")]
    ItemOutsideMap { reference: String },
    /// A map's `over` string that is not one output_lines reference.
    #[error("a string `over` must be exactly `{{{{ steps.<id>.output_lines }}}}`, found {found:?}")]
    BadOver { found: String },
    /// An outcome comparison with a value no step can have.
    #[error("{value:?} is not an outcome (outcomes are: succeeded, skipped, approved, rejected)")]
    BadOutcome { value: String },
    /// `outcome contains …`: outcomes are compared whole.
    #[error("outcomes are compared with == or !=, not contains")]
    OutcomeContains,
}

/// A run input the spec declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    /// The value when a run does not give one; `None` makes the input required.
    pub default: Option<String>,
    /// What the input is for, for people submitting runs.
    pub description: Option<String>,
}

/// Whether an agent gets a new VM for every attempt or one VM for the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmMode {
    /// A new VM per attempt, removed after it: no state leaks between attempts.
    Fresh,
    /// One long-lived VM for this agent for the whole run (the executor keeps it
    /// until [`crate::Executor::run_finished`]).
    Reuse,
}

/// An agent: which image and model its VMs run, with what memory and budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    /// The VM image (`default` when the spec gives none).
    pub image: String,
    /// The model the agent talks to.
    pub model: String,
    /// VM memory in MiB (512 when the spec gives none).
    pub mem_mib: u32,
    /// Token budget per attempt, unless the step overrides it.
    pub budget_tokens: Option<u64>,
    /// VM lifecycle.
    pub vm: VmMode,
}

/// An approval's outcome when its timeout passes without a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalDefault {
    Approve,
    Reject,
}

/// Retries with exponential backoff: attempt `n` (1-based) that failed with a
/// retryable error waits `min(max_interval, initial × factor^(n-1))` — or, with
/// jitter, a uniformly random part of that ("full jitter") — before attempt `n+1`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (3).
    pub max_attempts: u32,
    /// Wait after the first failure (1s).
    pub initial: Duration,
    /// Growth per failure (2).
    pub factor: f64,
    /// Longest wait (30s).
    pub max_interval: Duration,
    /// Full jitter (true): spreads retries of many failing steps apart.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial: Duration::from_secs(1),
            factor: 2.0,
            max_interval: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The wait before the attempt after `failed_attempt` (without jitter).
    pub fn backoff(&self, failed_attempt: u32) -> Duration {
        let exp = i32::try_from(failed_attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let ms = self.initial.as_millis() as f64 * self.factor.powi(exp);
        let cap = self.max_interval.as_millis() as f64;
        Duration::from_millis(ms.min(cap).max(0.0) as u64)
    }
}

/// What an agent step (or each item of a map step) runs.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentStep {
    /// Key into [`Workflow::agents`].
    pub agent: String,
    pub prompt: Template,
    pub retry: RetryPolicy,
    /// Overrides the agent's budget.
    pub budget_tokens: Option<u64>,
    /// Steps whose artifacts are copied to `/workspace/in/<step>/` of this step's VM.
    pub inputs: Vec<String>,
}

/// What a map step fans out over.
#[derive(Debug, Clone, PartialEq)]
pub enum MapOver {
    /// A literal list (each entry may use `{{ inputs.* }}` and `{{ steps.* }}`).
    Items(Vec<Template>),
    /// `{{ steps.<id>.output_lines }}`: one item per non-empty line of that output.
    Lines { step: String },
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// One agent run (with retries).
    Agent(AgentStep),
    /// A person's decision.
    Approval { default: ApprovalDefault },
    /// One agent run per item, at most `max_parallel` at once.
    Map {
        over: MapOver,
        max_parallel: u32,
        step: AgentStep,
    },
}

impl StepKind {
    /// `agent`, `approval` or `map`.
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Agent(_) => "agent",
            StepKind::Approval { .. } => "approval",
            StepKind::Map { .. } => "map",
        }
    }

    /// The agent part of an agent or map step.
    pub fn agent_step(&self) -> Option<&AgentStep> {
        match self {
            StepKind::Agent(a) | StepKind::Map { step: a, .. } => Some(a),
            StepKind::Approval { .. } => None,
        }
    }
}

/// One validated step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub needs: Vec<String>,
    pub when: Option<Condition>,
    /// Per attempt for agent and map steps; the wait for a decision for approvals.
    pub timeout: Duration,
    pub kind: StepKind,
}

/// A validated workflow: every reference resolves, the needs form a DAG, every
/// template reads only steps guaranteed to have finished before it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub name: String,
    pub inputs: BTreeMap<String, InputSpec>,
    pub agents: BTreeMap<String, AgentSpec>,
    /// In spec order.
    pub steps: Vec<Step>,
    /// Step indices by id.
    pub(crate) index: HashMap<String, usize>,
    /// Each step's needs, as indices.
    pub(crate) needs: Vec<Vec<usize>>,
    /// Each step's dependents, as indices.
    pub(crate) children: Vec<Vec<usize>>,
    /// Each step's position in a topological order (spec order among peers).
    pub(crate) rank: Vec<usize>,
}

impl Workflow {
    /// Parses and validates a spec.
    pub fn parse(src: &str, limits: &Limits) -> Result<Self, SpecError> {
        Checker { src, limits }.check()
    }

    /// The index of step `id`.
    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
}

// ---------------------------------------------------------------------------------
// The YAML shape. Unknown fields are refused; kind-specific rules come after.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    metadata: RawMetadata,
    #[serde(default)]
    inputs: UniqueMap<Option<RawInput>>,
    #[serde(default)]
    agents: UniqueMap<RawAgent>,
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    default: Option<String>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    image: Option<String>,
    model: String,
    mem_mib: Option<u32>,
    budget_tokens: Option<u64>,
    vm: Option<VmMode>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Agent,
    Approval,
    Map,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: String,
    kind: Option<RawKind>,
    needs: Option<Vec<String>>,
    agent: Option<String>,
    prompt: Option<String>,
    timeout: Option<String>,
    retry: Option<RawRetry>,
    budget_tokens: Option<u64>,
    inputs: Option<Vec<String>>,
    when: Option<String>,
    default: Option<ApprovalDefault>,
    over: Option<RawOver>,
    max_parallel: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial: Option<String>,
    factor: Option<f64>,
    max_interval: Option<String>,
    jitter: Option<bool>,
}

/// `over`: a list of strings or one string.
enum RawOver {
    List(Vec<String>),
    Text(String),
}

impl<'de> Deserialize<'de> for RawOver {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawOver;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of items or a string `{{ steps.<id>.output_lines }}`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawOver, E> {
                Ok(RawOver::Text(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<RawOver, A::Error> {
                let mut items = Vec::new();
                while let Some(x) = s.next_element::<String>()? {
                    items.push(x);
                }
                Ok(RawOver::List(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping that keeps source order and every entry, duplicates included (YAML
/// allows them and a `BTreeMap` would silently keep the last); the checker refuses
/// duplicates with the line of the second one.
struct UniqueMap<V>(Vec<(String, V)>);

impl<V> Default for UniqueMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<UniqueMap<V>, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v = m.next_value()?;
                    out.push((k, v));
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Vis(std::marker::PhantomData))
    }
}

impl<V> UniqueMap<V> {
    /// The first key that appears twice.
    fn duplicate(&self) -> Option<&str> {
        let mut seen = std::collections::HashSet::new();
        self.0
            .iter()
            .map(|(k, _)| k.as_str())
            .find(|k| !seen.insert(*k))
    }
}

// ---------------------------------------------------------------------------------
// Validation.

macro_rules! path {
    ($($s:expr),* $(,)?) => { vec![$(Seg::from($s)),*] };
}

impl From<&str> for Seg {
    fn from(s: &str) -> Self {
        Seg::Key(s.to_owned())
    }
}
impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

const NAME_RULE_63: &str = "use 1-63 characters a-z, 0-9 and -";
const NAME_RULE_40: &str = "use 1-40 characters a-z, 0-9 and -";
const INPUT_RULE: &str = "use 1-63 characters a-z, 0-9, _ and -";

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn valid_input_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn list(names: impl Iterator<Item = impl AsRef<str>>) -> String {
    const SHOWN: usize = 20;
    let mut v: Vec<String> = Vec::new();
    let mut more = 0;
    for n in names {
        if v.len() < SHOWN {
            v.push(n.as_ref().to_owned());
        } else {
            more += 1;
        }
    }
    if v.is_empty() {
        return "none".to_owned();
    }
    let mut s = v.join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

struct Checker<'a> {
    src: &'a str,
    limits: &'a Limits,
}

impl Checker<'_> {
    fn err(&self, path: Vec<Seg>, kind: SpecErrorKind) -> SpecError {
        let at = locate(self.src, &path);
        SpecError {
            line: at.map(|a| a.0),
            column: at.map(|a| a.1),
            path: path_string(&path),
            kind,
        }
    }

    fn duration(&self, path: Vec<Seg>, s: &str) -> Result<Duration, SpecError> {
        parse_duration(s).map_err(|e| self.err(path, e.into()))
    }

    fn check(&self) -> Result<Workflow, SpecError> {
        if self.src.len() > self.limits.max_spec_bytes {
            return Err(SpecError {
                line: None,
                column: None,
                path: String::new(),
                kind: SpecErrorKind::TooLarge {
                    size: self.src.len(),
                    limit: self.limits.max_spec_bytes,
                },
            });
        }
        let raw: RawSpec = serde_yaml::from_str(self.src).map_err(yaml_error)?;
        if raw.api_version != API_VERSION {
            return Err(self.err(
                path!["apiVersion"],
                SpecErrorKind::WrongValue {
                    expected: API_VERSION,
                    found: raw.api_version,
                },
            ));
        }
        if raw.kind != KIND {
            return Err(self.err(
                path!["kind"],
                SpecErrorKind::WrongValue {
                    expected: KIND,
                    found: raw.kind,
                },
            ));
        }
        if !valid_name(&raw.metadata.name, 63) {
            return Err(self.err(
                path!["metadata", "name"],
                SpecErrorKind::BadName {
                    name: raw.metadata.name,
                    rule: NAME_RULE_63,
                },
            ));
        }
        for (section, dup) in [
            ("inputs", raw.inputs.duplicate()),
            ("agents", raw.agents.duplicate()),
        ] {
            if let Some(key) = dup {
                return Err(self.err(
                    vec![Seg::from(section), Seg::KeyNth(key.to_owned(), 1)],
                    SpecErrorKind::DuplicateKey {
                        key: key.to_owned(),
                    },
                ));
            }
        }
        let mut inputs = BTreeMap::new();
        for (name, input) in raw.inputs.0 {
            if !valid_input_name(&name) {
                return Err(self.err(
                    path!["inputs", name.as_str()],
                    SpecErrorKind::BadName {
                        name,
                        rule: INPUT_RULE,
                    },
                ));
            }
            let (default, description) = input.map_or((None, None), |i| (i.default, i.description));
            inputs.insert(
                name,
                InputSpec {
                    default,
                    description,
                },
            );
        }
        let mut agents = BTreeMap::new();
        for (name, a) in raw.agents.0 {
            let at = |field: &str| path!["agents", name.as_str(), field];
            if !valid_name(&name, 40) {
                return Err(self.err(
                    path!["agents", name.as_str()],
                    SpecErrorKind::BadName {
                        name,
                        rule: NAME_RULE_40,
                    },
                ));
            }
            let image = a.image.unwrap_or_else(|| "default".to_owned());
            if image.is_empty() || image.len() > 255 {
                return Err(self.err(
                    at("image"),
                    SpecErrorKind::OutOfRange {
                        value: format!("{:?}", image),
                        range: "1-255 characters".into(),
                    },
                ));
            }
            if a.model.is_empty() || a.model.len() > 255 {
                return Err(self.err(
                    at("model"),
                    SpecErrorKind::OutOfRange {
                        value: format!("{:?}", a.model),
                        range: "1-255 characters".into(),
                    },
                ));
            }
            let mem_mib = a.mem_mib.unwrap_or(512);
            if !(64..=1 << 20).contains(&mem_mib) {
                return Err(self.err(
                    at("mem_mib"),
                    SpecErrorKind::OutOfRange {
                        value: mem_mib.to_string(),
                        range: "64-1048576".into(),
                    },
                ));
            }
            if a.budget_tokens == Some(0) {
                return Err(self.err(
                    at("budget_tokens"),
                    SpecErrorKind::OutOfRange {
                        value: "0".into(),
                        range: "at least 1".into(),
                    },
                ));
            }
            agents.insert(
                name,
                AgentSpec {
                    image,
                    model: a.model,
                    mem_mib,
                    budget_tokens: a.budget_tokens,
                    vm: a.vm.unwrap_or(VmMode::Fresh),
                },
            );
        }

        // Count first: a huge spec is refused before any per-step work.
        if raw.steps.len() > self.limits.max_steps {
            return Err(self.err(
                path!["steps", self.limits.max_steps],
                SpecErrorKind::TooManySteps {
                    count: raw.steps.len(),
                    limit: self.limits.max_steps,
                },
            ));
        }
        let mut index: HashMap<String, usize> = HashMap::with_capacity(raw.steps.len());
        for (i, s) in raw.steps.iter().enumerate() {
            if !valid_name(&s.id, 63) {
                return Err(self.err(
                    path!["steps", i, "id"],
                    SpecErrorKind::BadName {
                        name: s.id.clone(),
                        rule: NAME_RULE_63,
                    },
                ));
            }
            if let Some(&first) = index.get(&s.id) {
                return Err(self.err(
                    path!["steps", i, "id"],
                    SpecErrorKind::DuplicateStep {
                        id: s.id.clone(),
                        first,
                    },
                ));
            }
            index.insert(s.id.clone(), i);
        }
        let step_ids: Vec<String> = raw.steps.iter().map(|s| s.id.clone()).collect();
        let known_steps = || list(step_ids.iter());
        let unknown_step = |name: &str| SpecErrorKind::UnknownStep {
            name: name.to_owned(),
            known: known_steps(),
        };

        // Needs, then the DAG, then everything that reads other steps.
        let mut needs: Vec<Vec<usize>> = Vec::with_capacity(raw.steps.len());
        for (i, s) in raw.steps.iter().enumerate() {
            let mut n = Vec::new();
            for (j, name) in s.needs.iter().flatten().enumerate() {
                let Some(&k) = index.get(name) else {
                    return Err(self.err(path!["steps", i, "needs", j], unknown_step(name)));
                };
                if k == i {
                    return Err(self.err(
                        path!["steps", i, "needs", j],
                        SpecErrorKind::SelfNeed { id: name.clone() },
                    ));
                }
                if !n.contains(&k) {
                    n.push(k);
                }
            }
            needs.push(n);
        }
        let order = self.topo_order(&raw.steps, &needs)?;
        let mut rank = vec![0; raw.steps.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r;
        }
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); raw.steps.len()];
        for (i, n) in needs.iter().enumerate() {
            for &k in n {
                children[k].push(i);
            }
        }
        let reach = Reach { needs: &needs };

        let mut steps = Vec::with_capacity(raw.steps.len());
        for (i, s) in raw.steps.into_iter().enumerate() {
            steps.push(self.step(i, s, &index, &agents, &inputs, &reach, &known_steps)?);
        }
        Ok(Workflow {
            name: raw.metadata.name,
            inputs,
            agents,
            steps,
            index,
            needs,
            children,
            rank,
        })
    }

    /// A topological order (Kahn's, spec order among peers), or the cycle.
    fn topo_order(&self, steps: &[RawStep], needs: &[Vec<usize>]) -> Result<Vec<usize>, SpecError> {
        let n = steps.len();
        let mut pending: Vec<usize> = needs.iter().map(Vec::len).collect();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, ns) in needs.iter().enumerate() {
            for &k in ns {
                children[k].push(i);
            }
        }
        let mut queue: VecDeque<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = queue.pop_front() {
            order.push(i);
            for &c in &children[i] {
                pending[c] -= 1;
                if pending[c] == 0 {
                    queue.push_back(c);
                }
            }
        }
        if order.len() == n {
            return Ok(order);
        }
        // Every step left over needs another one left over: walk those edges until a
        // step repeats.
        let Some(start) = (0..n).find(|&i| pending[i] > 0) else {
            return Ok(order);
        };
        let mut seen = vec![usize::MAX; n];
        let mut walk = Vec::new();
        let mut at = start;
        while seen[at] == usize::MAX {
            seen[at] = walk.len();
            walk.push(at);
            match needs[at].iter().find(|&&k| pending[k] > 0) {
                Some(&k) => at = k,
                None => break,
            }
        }
        let cycle = walk.get(seen[at]..).unwrap_or(&walk[..]).to_vec();
        let mut names: Vec<&str> = cycle.iter().map(|&i| steps[i].id.as_str()).collect();
        if let Some(first) = names.first().copied() {
            names.push(first);
        }
        let first = cycle.first().copied().unwrap_or(start);
        let next = cycle.get(1).copied().unwrap_or(first);
        let j = steps[first]
            .needs
            .iter()
            .flatten()
            .position(|n| *n == steps[next].id)
            .unwrap_or(0);
        Err(self.err(
            path!["steps", first, "needs", j],
            SpecErrorKind::Cycle {
                cycle: names.join(" -> "),
            },
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        i: usize,
        s: RawStep,
        index: &HashMap<String, usize>,
        agents: &BTreeMap<String, AgentSpec>,
        inputs: &BTreeMap<String, InputSpec>,
        reach: &Reach<'_>,
        known_steps: &dyn Fn() -> String,
    ) -> Result<Step, SpecError> {
        let kind = s.kind.unwrap_or(RawKind::Agent);
        let kind_name = match kind {
            RawKind::Agent => "agent",
            RawKind::Approval => "approval",
            RawKind::Map => "map",
        };
        let not_allowed = |field: &'static str| {
            self.err(
                path!["steps", i, field],
                SpecErrorKind::NotAllowed {
                    field,
                    kind: kind_name,
                },
            )
        };
        let missing = |field: &'static str| {
            self.err(
                path!["steps", i],
                SpecErrorKind::Missing {
                    field,
                    kind: kind_name,
                },
            )
        };
        // Which fields each kind takes.
        let present = [
            ("agent", s.agent.is_some()),
            ("prompt", s.prompt.is_some()),
            ("retry", s.retry.is_some()),
            ("budget_tokens", s.budget_tokens.is_some()),
            ("inputs", s.inputs.is_some()),
            ("default", s.default.is_some()),
            ("over", s.over.is_some()),
            ("max_parallel", s.max_parallel.is_some()),
        ];
        let allowed: &[&str] = match kind {
            RawKind::Agent => &["agent", "prompt", "retry", "budget_tokens", "inputs"],
            RawKind::Approval => &["default"],
            RawKind::Map => &[
                "agent",
                "prompt",
                "retry",
                "budget_tokens",
                "inputs",
                "over",
                "max_parallel",
            ],
        };
        for (field, is) in present {
            if is && !allowed.contains(&field) {
                return Err(not_allowed(field));
            }
        }

        let timeout = match &s.timeout {
            Some(t) => {
                let d = self.duration(path!["steps", i, "timeout"], t)?;
                if d.is_zero() {
                    return Err(self.err(path!["steps", i, "timeout"], SpecErrorKind::ZeroDuration));
                }
                d
            }
            None => DEFAULT_TIMEOUT,
        };

        // Reads of other steps must go to steps guaranteed to be finished.
        let read = |path: Vec<Seg>, name: &str| -> Result<(), SpecError> {
            match index.get(name) {
                None => Err(self.err(
                    path,
                    SpecErrorKind::UnknownStep {
                        name: name.to_owned(),
                        known: known_steps(),
                    },
                )),
                Some(&k) if !reach.reaches(i, k) => Err(self.err(
                    path,
                    SpecErrorKind::NotANeed {
                        step: s.id.clone(),
                        reads: name.to_owned(),
                    },
                )),
                Some(_) => Ok(()),
            }
        };
        let check_refs = |path: Vec<Seg>, t: &Template, item_ok: bool| -> Result<(), SpecError> {
            for r in t.refs() {
                match r {
                    Ref::Input(name) if !inputs.contains_key(name) => {
                        return Err(self.err(
                            path,
                            SpecErrorKind::UnknownInput {
                                name: name.clone(),
                                known: list(inputs.keys()),
                            },
                        ));
                    }
                    Ref::Item | Ref::Index if !item_ok => {
                        return Err(self.err(
                            path,
                            SpecErrorKind::ItemOutsideMap {
                                reference: r.to_string(),
                            },
                        ));
                    }
                    _ => {}
                }
                if let Some(step) = r.step() {
                    read(path.clone(), step)?;
                }
            }
            Ok(())
        };

        let when = match &s.when {
            None => None,
            Some(text) => {
                let at = path!["steps", i, "when"];
                let c = Condition::parse(text).map_err(|e| self.err(at.clone(), e.into()))?;
                match &c.left {
                    Ref::Input(name) if !inputs.contains_key(name) => {
                        return Err(self.err(
                            at,
                            SpecErrorKind::UnknownInput {
                                name: name.clone(),
                                known: list(inputs.keys()),
                            },
                        ));
                    }
                    Ref::Outcome(_) => {
                        if matches!(
                            c.op,
                            crate::template::CondOp::Contains
                                | crate::template::CondOp::NotContains
                        ) {
                            return Err(self.err(at, SpecErrorKind::OutcomeContains));
                        }
                        if !["succeeded", "skipped", "approved", "rejected"]
                            .contains(&c.value.as_str())
                        {
                            return Err(self.err(
                                at,
                                SpecErrorKind::BadOutcome {
                                    value: c.value.clone(),
                                },
                            ));
                        }
                    }
                    _ => {}
                }
                if let Some(step) = c.left.step() {
                    read(at, step)?;
                }
                Some(c)
            }
        };

        let agent_step = |item_ok: bool| -> Result<AgentStep, SpecError> {
            let agent = s.agent.clone().ok_or_else(|| missing("agent"))?;
            if !agents.contains_key(&agent) {
                return Err(self.err(
                    path!["steps", i, "agent"],
                    SpecErrorKind::UnknownAgent {
                        name: agent,
                        known: list(agents.keys()),
                    },
                ));
            }
            let text = s.prompt.as_deref().ok_or_else(|| missing("prompt"))?;
            let at = path!["steps", i, "prompt"];
            if text.len() > self.limits.max_prompt_bytes {
                return Err(self.err(
                    at,
                    SpecErrorKind::PromptTooLarge {
                        size: text.len(),
                        limit: self.limits.max_prompt_bytes,
                    },
                ));
            }
            let prompt = Template::parse(text).map_err(|e| self.err(at.clone(), e.into()))?;
            check_refs(at, &prompt, item_ok)?;
            let mut retry = RetryPolicy::default();
            if let Some(r) = &s.retry {
                let at = |f: &str| path!["steps", i, "retry", f];
                if let Some(n) = r.max_attempts {
                    if !(1..=100).contains(&n) {
                        return Err(self.err(
                            at("max_attempts"),
                            SpecErrorKind::OutOfRange {
                                value: n.to_string(),
                                range: "1-100".into(),
                            },
                        ));
                    }
                    retry.max_attempts = n;
                }
                if let Some(d) = &r.initial {
                    retry.initial = self.duration(at("initial"), d)?;
                }
                if let Some(d) = &r.max_interval {
                    retry.max_interval = self.duration(at("max_interval"), d)?;
                }
                if let Some(f) = r.factor {
                    if !(1.0..=100.0).contains(&f) {
                        return Err(self.err(
                            at("factor"),
                            SpecErrorKind::OutOfRange {
                                value: f.to_string(),
                                range: "1-100".into(),
                            },
                        ));
                    }
                    retry.factor = f;
                }
                if let Some(j) = r.jitter {
                    retry.jitter = j;
                }
            }
            if s.budget_tokens == Some(0) {
                return Err(self.err(
                    path!["steps", i, "budget_tokens"],
                    SpecErrorKind::OutOfRange {
                        value: "0".into(),
                        range: "at least 1".into(),
                    },
                ));
            }
            let mut step_inputs = Vec::new();
            for (j, name) in s.inputs.iter().flatten().enumerate() {
                read(path!["steps", i, "inputs", j], name)?;
                if !step_inputs.contains(name) {
                    step_inputs.push(name.clone());
                }
            }
            Ok(AgentStep {
                agent,
                prompt,
                retry,
                budget_tokens: s.budget_tokens,
                inputs: step_inputs,
            })
        };

        let step_kind = match kind {
            RawKind::Agent => StepKind::Agent(agent_step(false)?),
            RawKind::Approval => StepKind::Approval {
                default: s.default.unwrap_or(ApprovalDefault::Reject),
            },
            RawKind::Map => {
                let over_path = path!["steps", i, "over"];
                let over = match &s.over {
                    None => return Err(missing("over")),
                    Some(RawOver::Text(text)) => {
                        let t = Template::parse(text)
                            .map_err(|e| self.err(over_path.clone(), e.into()))?;
                        match t.sole_ref() {
                            Some(Ref::OutputLines(step)) => {
                                read(over_path, step)?;
                                MapOver::Lines { step: step.clone() }
                            }
                            _ => {
                                return Err(self.err(
                                    over_path,
                                    SpecErrorKind::BadOver {
                                        found: text.clone(),
                                    },
                                ));
                            }
                        }
                    }
                    Some(RawOver::List(items)) => {
                        if items.len() > self.limits.max_map_items {
                            return Err(self.err(
                                over_path,
                                SpecErrorKind::TooManyItems {
                                    count: items.len(),
                                    limit: self.limits.max_map_items,
                                },
                            ));
                        }
                        let mut ts = Vec::with_capacity(items.len());
                        for (j, item) in items.iter().enumerate() {
                            let at = path!["steps", i, "over", j];
                            let t = Template::parse(item)
                                .map_err(|e| self.err(at.clone(), e.into()))?;
                            check_refs(at, &t, false)?;
                            ts.push(t);
                        }
                        MapOver::Items(ts)
                    }
                };
                let max_parallel = s
                    .max_parallel
                    .unwrap_or(DEFAULT_MAX_PARALLEL.min(self.limits.max_parallel));
                if max_parallel == 0 || max_parallel > self.limits.max_parallel {
                    return Err(self.err(
                        path!["steps", i, "max_parallel"],
                        SpecErrorKind::OutOfRange {
                            value: max_parallel.to_string(),
                            range: format!("1-{}", self.limits.max_parallel),
                        },
                    ));
                }
                StepKind::Map {
                    over,
                    max_parallel,
                    step: agent_step(true)?,
                }
            }
        };
        Ok(Step {
            id: s.id.clone(),
            needs: s.needs.clone().unwrap_or_default(),
            when,
            timeout,
            kind: step_kind,
        })
    }
}

/// Answers "is `k` among the transitive needs of `i`?" over a validated DAG.
struct Reach<'a> {
    needs: &'a [Vec<usize>],
}

impl Reach<'_> {
    fn reaches(&self, i: usize, k: usize) -> bool {
        // Most reads are of direct needs.
        if self.needs[i].contains(&k) {
            return true;
        }
        let mut seen = vec![false; self.needs.len()];
        let mut stack: Vec<usize> = self.needs[i].clone();
        while let Some(x) = stack.pop() {
            if x == k {
                return true;
            }
            if std::mem::replace(&mut seen[x], true) {
                continue;
            }
            stack.extend(self.needs[x].iter().copied().filter(|&y| !seen[y]));
        }
        false
    }
}

/// A `serde_yaml` error as a [`SpecError`]: its location, its path, its message
/// without the ` at line N column M` suffix (the line leads the message instead).
fn yaml_error(e: serde_yaml::Error) -> SpecError {
    let loc = e.location();
    let mut msg = e.to_string();
    if let Some(l) = &loc {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(p) = msg.find(&suffix) {
            msg.replace_range(p..p + suffix.len(), "");
        }
    }
    // serde_yaml puts the path first ("steps[0]: unknown field …"); keep it as the path.
    let (path, message) = match msg.split_once(": ") {
        Some((p, m)) if !p.contains(' ') && loc.is_some() => (p.to_owned(), m.to_owned()),
        _ => (String::new(), msg),
    };
    SpecError {
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        path,
        kind: SpecErrorKind::Syntax { message },
    }
}

/// Formats a duration for messages.
pub(crate) fn human(d: Duration) -> String {
    format_duration(d)
}
