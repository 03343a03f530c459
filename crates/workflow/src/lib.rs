//! The ClawOS workflow engine: the library behind the orchestrator daemon (port
//! 2081). It has no HTTP in it; the daemon wraps [`Engine`] and supplies an
//! [`Executor`] that runs agent attempts in VMs.
//!
//! # Specs
//!
//! A workflow is YAML, validated completely before anything runs ([`Workflow::parse`];
//! errors name the line and field, e.g. `line 14, steps[2].needs[0]: unknown step
//! "reserch" (steps are: research, write)`):
//!
//! ```yaml
//! apiVersion: clawos.dev/v1
//! kind: Workflow
//! metadata: { name: research-report }          # [a-z0-9-], 1-63
//! inputs:                                       # [a-z0-9_-], 1-63; {{ inputs.topic }}
//!   topic: { default: "unikernels", description: "what to research" }
//!   audience:                                   # no default: the run must give it
//! agents:                                       # [a-z0-9-], 1-40
//!   researcher: { image: default, model: claude-sonnet-4-5, mem_mib: 512, budget_tokens: 50000, vm: fresh }
//! steps:
//!   - id: research                              # [a-z0-9-], 1-63, unique
//!     agent: researcher
//!     prompt: "Research {{ inputs.topic }}. Write notes to /workspace/out/notes.md"
//!     timeout: 10m                              # 500ms, 30s, 10m, 1h, 1h30m; default 15m
//!     retry: { max_attempts: 3, initial: 1s, factor: 2, max_interval: 30s, jitter: true }
//!     budget_tokens: 20000                      # overrides the agent's
//!   - id: approve
//!     kind: approval                            # agent (default) | approval | map
//!     needs: [research]
//!     timeout: 1h                               # then `default` applies
//!     default: reject                           # approve | reject (default reject)
//!   - id: write
//!     needs: [approve]
//!     agent: writer
//!     prompt: "Write a report from: {{ steps.research.output }}"
//!     inputs: [research]                        # their artifacts → /workspace/in/research/
//!     when: "steps.approve.outcome == approved"
//!   - id: per-file
//!     kind: map
//!     needs: [write]
//!     over: ["a.md", "b.md"]                    # or "{{ steps.list.output_lines }}"
//!     max_parallel: 2                           # default 4
//!     agent: reviewer
//!     prompt: "Review {{ item }} ({{ index }})"
//! ```
//!
//! Agents: `model` is required; `image` defaults to `default`, `mem_mib` to 512, `vm`
//! to `fresh` (a new VM per attempt) — `reuse` keeps one VM per agent for the run,
//! released at [`Executor::run_finished`].
//!
//! Templates: `{{ inputs.<name> }}`, `{{ steps.<id>.output }}` (a map: JSON array of
//! its items' outputs; an approval: the decision's reason), `{{ steps.<id>.output_lines
//! }}` (non-empty lines, trimmed), `{{ steps.<id>.outcome }}` (`succeeded`, `skipped`,
//! `approved`, `rejected`), and in map prompts `{{ item }}` and `{{ index }}`
//! (0-based). A step may only read steps among its transitive `needs` (guaranteed to
//! have finished); a skipped step reads as "". `when`: `<ref> <op> <value>` where ref
//! is `steps.<id>.output`, `steps.<id>.outcome` or `inputs.<name>`, op is `contains`,
//! `not contains`, `==` or `!=` (outcomes: `==`/`!=` only), value is quoted or one bare
//! word.
//!
//! Refused: unknown fields, wrong types, missing required fields, fields another
//! kind of step uses, duplicate step ids or keys, unknown steps/agents/inputs in
//! `needs`, `inputs`, templates and conditions, reads of steps not among the transitive
//! needs, cycles (named), bad names and durations, and anything over [`Limits`].
//!
//! # Semantics
//!
//! A step starts once all its needs finished (succeeded or skipped); `when` false →
//! skipped; all needs skipped → skipped. Attempts that time out (enforced by the
//! engine, then [`Executor::cancel`]) or fail `Transient`/`Lost` are retried with
//! exponential backoff ([`RetryPolicy`]) up to `max_attempts`, each a new
//! [`AgentTask`] with a new attempt number and idempotency key; `Budget` and `Fatal`
//! fail the step at once. A failed step fails the run (running attempts are
//! cancelled). An approval waits for [`Engine::approve`]; its timeout applies its
//! default; a rejection ends the run `rejected`. A map step resolves its items when it
//! starts, runs one attempt sequence per item with at most `max_parallel` in flight
//! (retry waits count), and succeeds with the JSON array of outputs and every item's
//! artifacts, or fails as soon as an item fails for good.
//!
//! # Durability
//!
//! Every state change is an [`Event`] committed to the journal ([`journal`] module:
//! SQLite, WAL, `synchronous = FULL`, 0600) before it takes effect. [`Engine::open`]
//! replays unfinished runs, re-attaches in-flight attempts and re-arms timers; a step
//! whose completion was journaled never runs again and a join fires exactly once.
//!
//! # Artifacts
//!
//! [`ArtifactStore`]: content-addressed files (`<dir>/sha256/<2 hex>/<64 hex>`) that
//! steps pass to each other as [`ArtifactRef`]s.

pub mod artifacts;
pub mod clock;
pub mod duration;
mod engine;
pub mod event;
pub mod executor;
pub mod journal;
mod machine;
pub mod spec;
pub mod status;
pub mod template;
pub mod testing;

pub use artifacts::{ArtifactError, ArtifactRef, ArtifactStore};
pub use clock::{Clock, FakeClock, SystemClock};
pub use engine::{Engine, EngineConfig, EngineError};
pub use event::{BadRunId, Event, JournalEvent, RunId, RunState};
pub use executor::{AgentOutcome, AgentTask, ErrorKind, Executor, StepError};
pub use journal::{JournalConfig, JournalError};
pub use spec::{
    AgentSpec, AgentStep, ApprovalDefault, InputSpec, Limits, MapOver, RetryPolicy, SpecError,
    SpecErrorKind, Step, StepKind, VmMode, Workflow,
};
pub use status::{ApprovalStatus, ItemStatus, RunStatus, RunSummary, StepState, StepStatus};
pub use template::{Condition, Ref, Template};
