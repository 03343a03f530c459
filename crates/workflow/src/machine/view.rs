//! What a run shows: step outputs and references for templates, the task an attempt
//! runs, its artifacts, its status, and what is in flight (attempts, backoffs, waits)
//! for the engine to resume.

use super::*;

impl Run {
    /// A step's output as templates read it: the reply (a map: a JSON array of its
    /// items' replies; an approval: the decision's reason), "" when it did not run.
    pub fn output(&self, s: usize) -> Cow<'_, str> {
        let st = &self.steps[s];
        match &self.wf.steps[s].kind {
            StepKind::Agent(_) => Cow::Borrowed(st.units.first().map_or("", |u| u.output.as_str())),
            StepKind::Approval { .. } => Cow::Borrowed(
                st.decision
                    .as_ref()
                    .and_then(|d| d.reason.as_deref())
                    .unwrap_or(""),
            ),
            StepKind::Map { .. } => {
                if st.phase != Phase::Succeeded {
                    return Cow::Borrowed("");
                }
                let outs: Vec<&str> = st.units.iter().map(|u| u.output.as_str()).collect();
                Cow::Owned(serde_json::to_string(&outs).unwrap_or_default())
            }
        }
    }

    pub(super) fn outcome(&self, s: usize) -> &'static str {
        let approval = matches!(self.wf.steps[s].kind, StepKind::Approval { .. });
        match self.steps[s].phase {
            Phase::Succeeded if approval => "approved",
            Phase::Succeeded => "succeeded",
            Phase::Skipped => "skipped",
            Phase::Rejected => "rejected",
            _ => "",
        }
    }

    /// What a reference reads. Validation guarantees every step referenced has
    /// finished; a skipped one reads as "".
    pub fn lookup(&self, r: &Ref, item: Option<(u32, &str)>) -> Cow<'_, str> {
        let step = |id: &str| self.wf.step_index(id);
        match r {
            Ref::Input(n) => Cow::Borrowed(self.inputs.get(n).map_or("", String::as_str)),
            Ref::Output(id) => step(id).map_or(Cow::Borrowed(""), |s| self.output(s)),
            Ref::OutputLines(id) => step(id).map_or(Cow::Borrowed(""), |s| {
                Cow::Owned(output_lines(&self.output(s)).join("\n"))
            }),
            Ref::Outcome(id) => Cow::Borrowed(step(id).map_or("", |s| self.outcome(s))),
            Ref::Item => Cow::Owned(item.map_or(String::new(), |(_, v)| v.to_owned())),
            Ref::Index => Cow::Owned(item.map_or(String::new(), |(i, _)| i.to_string())),
        }
    }

    /// The executor's task for an attempt: everything derived from finished steps,
    /// so it is the same when rebuilt after a restart.
    pub fn task(&self, s: usize, item: Option<u32>, attempt: u32) -> Option<AgentTask> {
        let spec = &self.wf.steps[s];
        let agent_step = spec.kind.agent_step()?;
        let agent = self.wf.agents.get(&agent_step.agent)?;
        let name = unit_name(&spec.id, item);
        let item_text = item.map(|i| {
            (
                i,
                self.steps[s]
                    .items
                    .get(i as usize)
                    .map_or("", String::as_str),
            )
        });
        let prompt = agent_step.prompt.render(|r| self.lookup(r, item_text));
        let mut inputs = Vec::new();
        for dep in &agent_step.inputs {
            let Some(k) = self.wf.step_index(dep) else {
                continue;
            };
            if self.steps[k].phase != Phase::Succeeded {
                continue;
            }
            let is_map = matches!(self.wf.steps[k].kind, StepKind::Map { .. });
            for (i, u) in self.steps[k].units.iter().enumerate() {
                let dir = if is_map {
                    format!("{dep}/{i}")
                } else {
                    dep.clone()
                };
                inputs.extend(u.artifacts.iter().map(|a| (dir.clone(), a.clone())));
            }
        }
        Some(AgentTask {
            run: self.id.clone(),
            step: name.clone(),
            attempt,
            idempotency_key: format!("{}/{name}/{attempt}", self.id),
            agent_name: agent_step.agent.clone(),
            agent: agent.clone(),
            prompt,
            inputs,
            timeout: spec.timeout,
            budget_tokens: agent_step.budget_tokens.or(agent.budget_tokens),
        })
    }

    /// The artifacts of every step that succeeded, in spec order.
    pub fn artifacts(&self) -> Vec<ArtifactRef> {
        let mut out = Vec::new();
        for st in &self.steps {
            if st.phase == Phase::Succeeded {
                for u in &st.units {
                    out.extend(u.artifacts.iter().cloned());
                }
            }
        }
        out
    }

    /// A snapshot for [`crate::Engine::status`].
    pub fn status(&self, now: u64, preview_bytes: usize) -> RunStatus {
        let end = self.finished_ms.unwrap_or(now);
        let mut tokens = 0;
        let steps = self
            .steps
            .iter()
            .enumerate()
            .map(|(s, st)| {
                let spec = &self.wf.steps[s];
                let is_map = matches!(spec.kind, StepKind::Map { .. });
                let unit_state = |u: &Unit| match u.phase {
                    UnitPhase::Pending => StepState::Pending,
                    UnitPhase::Running { .. } => StepState::Running,
                    UnitPhase::Backoff { .. } => StepState::Retrying,
                    UnitPhase::Succeeded => StepState::Succeeded,
                    UnitPhase::Failed => StepState::Failed,
                    UnitPhase::Cancelled => StepState::Cancelled,
                };
                let state = match st.phase {
                    Phase::Pending => StepState::Pending,
                    Phase::Waiting => StepState::Waiting,
                    Phase::Running => {
                        if !is_map
                            && st
                                .units
                                .first()
                                .is_some_and(|u| matches!(u.phase, UnitPhase::Backoff { .. }))
                        {
                            StepState::Retrying
                        } else {
                            StepState::Running
                        }
                    }
                    Phase::Succeeded => StepState::Succeeded,
                    Phase::Skipped => StepState::Skipped,
                    Phase::Failed => StepState::Failed,
                    Phase::Rejected => StepState::Rejected,
                    Phase::Cancelled => StepState::Cancelled,
                };
                let step_tokens: u64 = st.units.iter().map(|u| u.tokens).sum();
                tokens += step_tokens;
                let output = self.output(s);
                let single = (!is_map).then(|| st.units.first()).flatten();
                let retry_at_ms = single.and_then(|u| match u.phase {
                    UnitPhase::Backoff { at_ms, .. } => Some(at_ms),
                    _ => None,
                });
                let deadline_ms = match (st.phase, single.map(|u| &u.phase)) {
                    (Phase::Waiting, _) => st.approval_deadline_ms,
                    (_, Some(UnitPhase::Running { deadline_ms, .. })) => Some(*deadline_ms),
                    _ => None,
                };
                let error = st
                    .error
                    .clone()
                    .or_else(|| single.and_then(|u| u.error.as_ref().map(ToString::to_string)));
                let approval = match spec.kind {
                    StepKind::Approval { default } => {
                        st.approval_deadline_ms.map(|deadline_ms| ApprovalStatus {
                            deadline_ms,
                            default,
                            approved: st.decision.as_ref().map(|d| d.approved),
                            reason: st.decision.as_ref().and_then(|d| d.reason.clone()),
                            by_timeout: st.decision.as_ref().is_some_and(|d| d.by_timeout),
                        })
                    }
                    _ => None,
                };
                let items = if is_map {
                    st.units
                        .iter()
                        .enumerate()
                        .map(|(i, u)| ItemStatus {
                            index: i as u32,
                            item: st.items.get(i).cloned().unwrap_or_default(),
                            state: unit_state(u),
                            attempts: u.attempts,
                            started_ms: u.started_ms,
                            finished_ms: u.finished_ms,
                            tokens: u.tokens,
                            output: preview(&u.output, preview_bytes),
                            error: u.error.as_ref().map(ToString::to_string),
                            retry_at_ms: match u.phase {
                                UnitPhase::Backoff { at_ms, .. } => Some(at_ms),
                                _ => None,
                            },
                            vm: u.vm.clone(),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                StepStatus {
                    id: spec.id.clone(),
                    kind: spec.kind.name().to_owned(),
                    state,
                    needs: spec.needs.clone(),
                    attempts: st.units.iter().map(|u| u.attempts).sum(),
                    started_ms: st.started_ms,
                    finished_ms: st.finished_ms,
                    duration_ms: st
                        .started_ms
                        .map(|a| st.finished_ms.unwrap_or(end).saturating_sub(a)),
                    tokens: step_tokens,
                    output: preview(&output, preview_bytes),
                    output_bytes: output.len(),
                    error,
                    skip_reason: st.skip_reason.clone(),
                    retry_at_ms,
                    deadline_ms,
                    vm: single.and_then(|u| u.vm.clone()),
                    approval,
                    items,
                    artifacts: st
                        .units
                        .iter()
                        .flat_map(|u| u.artifacts.iter().cloned())
                        .collect(),
                }
            })
            .collect();
        RunStatus {
            run: self.id.clone(),
            name: self.wf.name.clone(),
            state: self.state,
            reason: self.reason.clone(),
            created_ms: self.created_ms,
            finished_ms: self.finished_ms,
            duration_ms: end.saturating_sub(self.created_ms),
            inputs: self.inputs.clone(),
            tokens,
            steps,
        }
    }

    /// Attempts running now: (step, item, attempt, deadline).
    pub fn running(&self) -> Vec<(usize, Option<u32>, u32, u64)> {
        let mut v = Vec::new();
        for (s, st) in self.steps.iter().enumerate() {
            let is_map = matches!(self.wf.steps[s].kind, StepKind::Map { .. });
            for (i, u) in st.units.iter().enumerate() {
                if let UnitPhase::Running {
                    attempt,
                    deadline_ms,
                    ..
                } = u.phase
                {
                    v.push((s, is_map.then_some(i as u32), attempt, deadline_ms));
                }
            }
        }
        v
    }

    /// Units waiting to retry: (step, item, next attempt, when).
    pub fn backoffs(&self) -> Vec<(usize, Option<u32>, u32, u64)> {
        let mut v = Vec::new();
        for (s, st) in self.steps.iter().enumerate() {
            let is_map = matches!(self.wf.steps[s].kind, StepKind::Map { .. });
            for (i, u) in st.units.iter().enumerate() {
                if let UnitPhase::Backoff {
                    next_attempt,
                    at_ms,
                } = u.phase
                {
                    v.push((s, is_map.then_some(i as u32), next_attempt, at_ms));
                }
            }
        }
        v
    }

    /// Approvals waiting: (step, deadline).
    pub fn waiting(&self) -> Vec<(usize, u64)> {
        self.steps
            .iter()
            .enumerate()
            .filter(|(_, st)| st.phase == Phase::Waiting)
            .filter_map(|(s, st)| st.approval_deadline_ms.map(|d| (s, d)))
            .collect()
    }
}
