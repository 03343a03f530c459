//! One step of a spec checked: its kind, agent, prompt template and the references
//! in it, its needs, map and retry settings.

use super::check::Reach;
use super::*;

impl Checker<'_> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step(
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
