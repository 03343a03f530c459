//! Planning: what a run does next given an input (an attempt's outcome, a timer, an
//! approval, a cancel) — the events it emits, never an effect of its own.

use super::*;

impl Run {
    /// Turns `inputs` into events (already applied), then starts whatever became
    /// ready. `rand` gives uniform random u64s for retry jitter.
    pub fn plan(
        &mut self,
        now: u64,
        inputs: Vec<Input>,
        rand: &mut dyn FnMut() -> u64,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        for input in inputs {
            if self.state.is_final() {
                break;
            }
            self.input(now, input, rand, &mut out);
        }
        if !self.state.is_final() {
            self.schedule(now, &mut out);
        }
        out
    }

    pub(super) fn input(
        &mut self,
        now: u64,
        input: Input,
        rand: &mut dyn FnMut() -> u64,
        out: &mut Vec<Event>,
    ) {
        match input {
            Input::Cancel => {
                self.finish(now, RunState::Cancelled, Some("cancelled".to_owned()), out)
            }
            Input::Approve {
                step,
                approved,
                reason,
            } => {
                if self
                    .steps
                    .get(step)
                    .is_some_and(|s| s.phase == Phase::Waiting)
                {
                    self.decide(now, step, approved, reason, false, out);
                }
            }
            Input::ApprovalDeadline { step } => {
                let Some(st) = self.steps.get(step) else {
                    return;
                };
                if st.phase != Phase::Waiting {
                    return;
                }
                let StepKind::Approval { default } = self.wf.steps[step].kind else {
                    return;
                };
                let timeout = crate::spec::human(self.wf.steps[step].timeout);
                self.decide(
                    now,
                    step,
                    default == ApprovalDefault::Approve,
                    Some(format!("no decision within {timeout}")),
                    true,
                    out,
                );
            }
            Input::Retry {
                step,
                item,
                attempt,
            } => {
                let Some(u) = self.unit(step, item) else {
                    return;
                };
                if !matches!(u.phase, UnitPhase::Backoff { next_attempt, .. } if next_attempt == attempt)
                {
                    return;
                }
                self.start_attempt(now, step, item, attempt, out);
            }
            Input::AttemptDone {
                step,
                item,
                attempt,
                result,
            } => {
                let Some(u) = self.unit(step, item) else {
                    return;
                };
                if !matches!(u.phase, UnitPhase::Running { attempt: a, .. } if a == attempt) {
                    // A stale answer: the attempt was cancelled or already answered.
                    return;
                }
                let id = self.wf.steps[step].id.clone();
                match result {
                    Ok(o) => {
                        self.emit(
                            now,
                            out,
                            Event::AttemptSucceeded {
                                step: id,
                                item,
                                attempt,
                                output: o.output,
                                artifacts: o.artifacts,
                                tokens: o.tokens,
                                vm: o.vm,
                            },
                        );
                        self.unit_succeeded(now, step, out);
                    }
                    Err(error) => {
                        let Some(agent) = self.wf.steps[step].kind.agent_step() else {
                            return;
                        };
                        let retry = &agent.retry;
                        let retry_at_ms = (error.kind.retryable() && attempt < retry.max_attempts)
                            .then(|| {
                                let max = u64::try_from(retry.backoff(attempt).as_millis())
                                    .unwrap_or(u64::MAX);
                                let wait = if retry.jitter && max > 0 {
                                    max.checked_add(1).map_or(max, |m| rand() % m)
                                } else {
                                    max
                                };
                                now.saturating_add(wait)
                            });
                        let message = error.to_string();
                        self.emit(
                            now,
                            out,
                            Event::AttemptFailed {
                                step: id.clone(),
                                item,
                                attempt,
                                error,
                                retry_at_ms,
                            },
                        );
                        if retry_at_ms.is_none() {
                            let what = match item {
                                Some(i) => {
                                    let it = self.steps[step]
                                        .items
                                        .get(i as usize)
                                        .cloned()
                                        .unwrap_or_default();
                                    format!(
                                        "item {i} ({it:?}) failed after {attempt} attempt(s): {message}"
                                    )
                                }
                                None => format!("failed after {attempt} attempt(s): {message}"),
                            };
                            self.emit(
                                now,
                                out,
                                Event::StepFailed {
                                    step: id.clone(),
                                    error: what.clone(),
                                },
                            );
                            self.finish(
                                now,
                                RunState::Failed,
                                Some(format!("step {id:?} {what}")),
                                out,
                            );
                        }
                    }
                }
            }
        }
    }

    pub(super) fn unit(&self, step: usize, item: Option<u32>) -> Option<&Unit> {
        self.steps
            .get(step)?
            .units
            .get(item.map_or(0, |i| i as usize))
    }

    pub(super) fn decide(
        &mut self,
        now: u64,
        step: usize,
        approved: bool,
        reason: Option<String>,
        by_timeout: bool,
        out: &mut Vec<Event>,
    ) {
        let id = self.wf.steps[step].id.clone();
        self.emit(
            now,
            out,
            Event::ApprovalDecided {
                step: id.clone(),
                approved,
                reason: reason.clone(),
                by_timeout,
            },
        );
        if approved {
            self.emit(now, out, Event::StepSucceeded { step: id });
        } else {
            let why = match reason {
                Some(r) => format!("step {id:?} was rejected: {r}"),
                None => format!("step {id:?} was rejected"),
            };
            self.finish(now, RunState::Rejected, Some(why), out);
        }
    }

    pub(super) fn unit_succeeded(&mut self, now: u64, step: usize, out: &mut Vec<Event>) {
        let st = &self.steps[step];
        if st.succeeded_units == st.units.len() {
            let id = self.wf.steps[step].id.clone();
            self.emit(now, out, Event::StepSucceeded { step: id });
        } else {
            self.start_items(now, step, out);
        }
    }

    /// Ends the run: stops running attempts, then the final event.
    pub(super) fn finish(
        &mut self,
        now: u64,
        state: RunState,
        reason: Option<String>,
        out: &mut Vec<Event>,
    ) {
        let mut cancels = Vec::new();
        for (s, st) in self.steps.iter().enumerate() {
            for (i, u) in st.units.iter().enumerate() {
                if let UnitPhase::Running { attempt, .. } = u.phase {
                    let item =
                        matches!(self.wf.steps[s].kind, StepKind::Map { .. }).then_some(i as u32);
                    cancels.push(Event::AttemptCancelled {
                        step: self.wf.steps[s].id.clone(),
                        item,
                        attempt,
                    });
                }
            }
        }
        for c in cancels {
            self.emit(now, out, c);
        }
        self.emit(now, out, Event::RunFinished { state, reason });
    }

    pub(super) fn start_attempt(
        &mut self,
        now: u64,
        step: usize,
        item: Option<u32>,
        attempt: u32,
        out: &mut Vec<Event>,
    ) {
        let spec = &self.wf.steps[step];
        let key = format!("{}/{}/{attempt}", self.id, unit_name(&spec.id, item));
        let timeout_ms = u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX);
        self.emit(
            now,
            out,
            Event::AttemptStarted {
                step: spec.id.clone(),
                item,
                attempt,
                idempotency_key: key,
                deadline_ms: now.saturating_add(timeout_ms),
            },
        );
    }

    /// Starts a map's next items while it is under `max_parallel`.
    pub(super) fn start_items(&mut self, now: u64, step: usize, out: &mut Vec<Event>) {
        let StepKind::Map { max_parallel, .. } = &self.wf.steps[step].kind else {
            return;
        };
        let max = *max_parallel as usize;
        while self.steps[step].active < max
            && self.steps[step].started_units < self.steps[step].units.len()
        {
            let i = self.steps[step].started_units as u32;
            self.start_attempt(now, step, Some(i), 1, out);
        }
    }

    /// Starts or skips every ready step, in topological order, then finishes the run
    /// if nothing is left.
    pub(super) fn schedule(&mut self, now: u64, out: &mut Vec<Event>) {
        while let Some((_, s)) = self.ready.pop_first() {
            if self.state.is_final() {
                return;
            }
            if self.steps[s].phase != Phase::Pending {
                continue;
            }
            let wf = self.wf.clone();
            let spec = &wf.steps[s];
            let needs = &wf.needs[s];
            if !needs.is_empty() && needs.iter().all(|&k| self.steps[k].phase == Phase::Skipped) {
                self.emit(
                    now,
                    out,
                    Event::StepSkipped {
                        step: spec.id.clone(),
                        reason: "all its needs were skipped".to_owned(),
                    },
                );
                continue;
            }
            if let Some(cond) = &spec.when {
                let actual = self.lookup(&cond.left, None);
                if !cond.eval(&actual) {
                    self.emit(
                        now,
                        out,
                        Event::StepSkipped {
                            step: spec.id.clone(),
                            reason: format!("when `{}` is false", cond.source()),
                        },
                    );
                    continue;
                }
            }
            match &spec.kind {
                StepKind::Agent(_) => {
                    self.emit(
                        now,
                        out,
                        Event::StepStarted {
                            step: spec.id.clone(),
                            items: None,
                        },
                    );
                    self.start_attempt(now, s, None, 1, out);
                }
                StepKind::Approval { .. } => {
                    let timeout_ms = u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX);
                    self.emit(
                        now,
                        out,
                        Event::ApprovalRequested {
                            step: spec.id.clone(),
                            deadline_ms: now.saturating_add(timeout_ms),
                        },
                    );
                }
                StepKind::Map { over, .. } => {
                    let items: Vec<String> = match over {
                        MapOver::Items(ts) => ts
                            .iter()
                            .map(|t| t.render(|r| self.lookup(r, None)))
                            .collect(),
                        MapOver::Lines { step } => {
                            let k = wf.step_index(step).unwrap_or(s);
                            output_lines(&self.output(k))
                                .into_iter()
                                .map(str::to_owned)
                                .collect()
                        }
                    };
                    if items.len() > self.max_map_items {
                        let n = items.len();
                        self.emit(
                            now,
                            out,
                            Event::StepStarted {
                                step: spec.id.clone(),
                                items: Some(Vec::new()),
                            },
                        );
                        let error =
                            format!("{n} items, more than the limit of {}", self.max_map_items);
                        self.emit(
                            now,
                            out,
                            Event::StepFailed {
                                step: spec.id.clone(),
                                error: error.clone(),
                            },
                        );
                        self.finish(
                            now,
                            RunState::Failed,
                            Some(format!("step {:?}: {error}", spec.id)),
                            out,
                        );
                        return;
                    }
                    let empty = items.is_empty();
                    self.emit(
                        now,
                        out,
                        Event::StepStarted {
                            step: spec.id.clone(),
                            items: Some(items),
                        },
                    );
                    if empty {
                        self.emit(
                            now,
                            out,
                            Event::StepSucceeded {
                                step: spec.id.clone(),
                            },
                        );
                    } else {
                        self.start_items(now, s, out);
                    }
                }
            }
        }
        if self.done == self.steps.len() && !self.state.is_final() {
            self.emit(
                now,
                out,
                Event::RunFinished {
                    state: RunState::Succeeded,
                    reason: None,
                },
            );
        }
    }
}
