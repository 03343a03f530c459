//! Workflow specs: the YAML format, its validation, and the validated [`Workflow`].
//!
//! A spec is validated completely before anything runs, and every refusal names the
//! line and the field (`line 14, steps[2].needs[0]: unknown step "reserch" (steps are:
//! research, write)`), because the people writing specs fix them from the message.
//! Syntax and type errors come from `serde_yaml` with its location; for semantic
//! errors the offending node is found again in the source (the `locate` module).
//! This module holds the validated model and the YAML shape; `check` validates the spec
//! as a whole (names, limits, the step graph) and `step` each step.
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

// After the macro: the checker's modules use it.
mod check;
mod step;

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

/// Formats a duration for messages.
pub(crate) fn human(d: Duration) -> String {
    format_duration(d)
}
