//! The engine's runs: finding a run (live or archived), loading one from the journal,
//! submitting one, delivering an input to it, archiving finished ones.

use super::drive::stamp;
use super::*;

impl<E: Executor, C: Clock> Inner<E, C> {
    pub(super) fn entry(&self, run: &RunId) -> Result<Entry, EngineError> {
        let runs = self.runs.read().unwrap_or_else(|p| p.into_inner());
        match runs.get(run) {
            Some(Entry::Live(s)) => Ok(Entry::Live(s.clone())),
            Some(Entry::Archived(s)) => Ok(Entry::Archived(s.clone())),
            None => Err(EngineError::UnknownRun(run.to_string())),
        }
    }

    pub(super) fn known(&self, run: &RunId) -> Result<(), EngineError> {
        self.entry(run).map(|_| ())
    }

    pub(super) fn slots(&self) -> Vec<Arc<Slot>> {
        let runs = self.runs.read().unwrap_or_else(|p| p.into_inner());
        runs.values()
            .filter_map(|e| match e {
                Entry::Live(s) => Some(s.clone()),
                Entry::Archived(_) => None,
            })
            .collect()
    }

    /// The slot of a run this engine drives, or why there is none.
    pub(super) fn live(&self, run: &RunId) -> Result<Arc<Slot>, EngineError> {
        match self.entry(run)? {
            Entry::Live(s) => Ok(s),
            Entry::Archived(s) => Err(EngineError::NotRunning {
                run: run.clone(),
                state: s.state,
            }),
        }
    }

    /// Runs `f` on the run's state: the live one, or one rebuilt from the journal.
    pub(super) fn with_run<T>(
        &self,
        run: &RunId,
        f: impl FnOnce(&Run) -> T,
    ) -> Result<T, EngineError> {
        match self.entry(run)? {
            Entry::Live(slot) => {
                let core = lock(&slot.core);
                if core.stalled.is_none() {
                    return Ok(f(&core.run));
                }
                // After a failed journal write the memory may be ahead of the
                // journal: answer from the journal.
                drop(core);
                let (r, _) = self.load(run)?;
                Ok(f(&r))
            }
            Entry::Archived(_) => {
                let (r, _) = self.load(run)?;
                Ok(f(&r))
            }
        }
    }

    /// Journals the end of a run that cannot be rebuilt; returns when.
    pub(super) fn fail_unrecoverable(&self, id: &RunId, reason: &str) -> Result<u64, EngineError> {
        let now = self.clock.now_ms();
        let seq = self.journal.last_seq(id)? + 1;
        let event = JournalEvent {
            run: id.clone(),
            seq,
            time_ms: now,
            event: Event::RunFinished {
                state: RunState::Failed,
                reason: Some(reason.to_owned()),
            },
        };
        self.journal
            .append(id, std::slice::from_ref(&event), None)?;
        Ok(now)
    }

    /// Rebuilds a run from its journaled spec and events.
    pub(super) fn load(&self, id: &RunId) -> Result<(Run, u64), EngineError> {
        let spec = self
            .journal
            .spec(id)?
            .ok_or_else(|| EngineError::UnknownRun(id.to_string()))?;
        // The spec was valid when submitted; limits lowered since must not strand it.
        let wf = Workflow::parse(&spec, &Limits::unlimited()).map_err(|e| EngineError::Replay {
            run: id.to_string(),
            reason: format!("its spec no longer validates: {e}"),
        })?;
        let mut run = Run::new(id.clone(), Arc::new(wf), self.cfg.limits.max_map_items);
        let mut next_seq = 1;
        for e in self.journal.events(id, 0, usize::MAX)? {
            if e.seq != next_seq {
                return Err(EngineError::Replay {
                    run: id.to_string(),
                    reason: format!("event {} follows {}", e.seq, next_seq - 1),
                });
            }
            run.apply(e.time_ms, &e.event)
                .map_err(|err| EngineError::Replay {
                    run: id.to_string(),
                    reason: err.to_string(),
                })?;
            next_seq = e.seq + 1;
        }
        Ok((run, next_seq))
    }

    pub(super) fn submit(
        &self,
        spec_yaml: &str,
        mut inputs: BTreeMap<String, String>,
    ) -> Result<RunId, EngineError> {
        let wf = Workflow::parse(spec_yaml, &self.cfg.limits)?;
        let known = || wf.inputs.keys().cloned().collect::<Vec<_>>().join(", ");
        for (name, value) in &inputs {
            if !wf.inputs.contains_key(name) {
                return Err(EngineError::Input {
                    name: name.clone(),
                    reason: format!(
                        "not an input of workflow {:?} (inputs are: {})",
                        wf.name,
                        known()
                    ),
                });
            }
            if value.len() > self.cfg.limits.max_prompt_bytes {
                return Err(EngineError::Input {
                    name: name.clone(),
                    reason: format!(
                        "{} bytes, more than the limit of {}",
                        value.len(),
                        self.cfg.limits.max_prompt_bytes
                    ),
                });
            }
        }
        for (name, spec) in &wf.inputs {
            if !inputs.contains_key(name) {
                match &spec.default {
                    Some(d) => {
                        inputs.insert(name.clone(), d.clone());
                    }
                    None => {
                        return Err(EngineError::Input {
                            name: name.clone(),
                            reason: "required (the spec gives no default)".to_owned(),
                        });
                    }
                }
            }
        }
        let now = self.clock.now_ms();
        let id = RunId::generate(now);
        let spec_sha256 = hex::encode(Sha256::digest(spec_yaml.as_bytes()));
        let name = wf.name.clone();
        let mut run = Run::new(id.clone(), Arc::new(wf), self.cfg.limits.max_map_items);
        let first = Event::RunSubmitted {
            name: name.clone(),
            inputs,
            spec_sha256: spec_sha256.clone(),
        };
        run.apply(now, &first).map_err(|e| EngineError::Replay {
            run: id.to_string(),
            reason: e.to_string(),
        })?;
        let mut events = vec![first];
        events.extend(run.plan(now, Vec::new(), &mut random_u64));
        let slot = Arc::new(Slot::new(run, 1));
        let mut core = lock(&slot.core);
        // Registered (locked) before anything is journaled: the tasks the effects
        // spawn look the slot up, and a concurrent shutdown either sees the slot (and
        // waits for this lock) or has set `stopped` before the check below.
        self.runs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Entry::Live(slot.clone()));
        let unregister = || {
            self.runs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        };
        if self.stopped.load(Ordering::SeqCst) {
            unregister();
            return Err(EngineError::ShutDown);
        }
        let batch = stamp(&mut core, &id, now, events);
        let new_run = NewRun {
            name: &name,
            spec: spec_yaml,
            spec_sha256: &spec_sha256,
            created_ms: now,
        };
        if let Err(e) = self.journal.append(&id, &batch, Some(new_run)) {
            unregister();
            return Err(e.into());
        }
        tracing::info!(run = %id, workflow = %name, "run submitted");
        self.effects(&mut core, &slot, &batch);
        drop(core);
        self.trim();
        Ok(id)
    }

    /// Delivers an input to a run and drives it.
    pub(super) fn deliver(&self, run: &RunId, input: Input) {
        let Ok(slot) = self.live(run) else { return };
        lock(&slot.inbox).push(input);
        if let Err(e) = self.drive(&slot, None) {
            tracing::debug!(run = %run, error = %e, "input not applied");
        }
        self.trim();
    }

    /// Moves the oldest finished runs out of memory, beyond the configured number.
    /// Called with no lock held: it takes a run's lock, releases it, then takes the
    /// run table's.
    pub(super) fn trim(&self) {
        loop {
            let id = {
                let mut q = lock(&self.finished);
                if q.len() <= self.cfg.max_finished_in_memory {
                    return;
                }
                match q.pop_front() {
                    Some(id) => id,
                    None => return,
                }
            };
            let Ok(Entry::Live(slot)) = self.entry(&id) else {
                continue;
            };
            let s = summary(&lock(&slot.core).run);
            self.runs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, Entry::Archived(s));
        }
    }
}
