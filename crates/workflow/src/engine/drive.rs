//! Driving a run: plan from its inputs, journal the events, then act on them
//! (attempts, timers, cancellations, publication); what an attempt's outcome must be
//! before it is taken.

use super::*;

impl<E: Executor, C: Clock> Inner<E, C> {
    /// Takes the run's lock, plans everything in its inbox (plus `direct`, built and
    /// checked under the lock), journals the events, acts on them.
    #[allow(clippy::type_complexity)]
    pub(super) fn drive(
        &self,
        slot: &Slot,
        direct: Option<&dyn Fn(&Run) -> Result<Input, EngineError>>,
    ) -> Result<(), EngineError> {
        let mut core = lock(&slot.core);
        if self.stopped.load(Ordering::SeqCst) {
            return Err(EngineError::ShutDown);
        }
        if let Some(reason) = &core.stalled {
            return Err(EngineError::Stalled {
                run: slot.id.clone(),
                reason: reason.clone(),
            });
        }
        // A direct input (approve, cancel) goes first: it was checked against the
        // current state, and once acknowledged it must not be overtaken by, say, an
        // approval timeout waiting in the inbox.
        let mut inputs = Vec::new();
        if let Some(f) = direct {
            inputs.push(f(&core.run)?);
        }
        inputs.append(&mut lock(&slot.inbox));
        if inputs.is_empty() {
            return Ok(());
        }
        self.commit(&mut core, slot, inputs)
    }

    pub(super) fn commit(
        &self,
        core: &mut Core,
        slot: &Slot,
        inputs: Vec<Input>,
    ) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let events = core.run.plan(now, inputs, &mut random_u64);
        if events.is_empty() {
            return Ok(());
        }
        let batch = stamp(core, &slot.id, now, events);
        if let Err(e) = self.journal.append(&slot.id, &batch, None) {
            // The in-memory state is now ahead of the journal. Nothing of the batch
            // has taken effect; put the state back to what is journaled and stop
            // driving the run (the next open resumes it).
            tracing::error!(run = %slot.id, error = %e, "journal write failed; run stalled");
            core.next_seq -= batch.len() as u64;
            core.stalled = Some(e.to_string());
            for (_, t) in core.tasks.drain() {
                t.handle.abort();
            }
            // Best effort: `status` reads the journal while the run is stalled anyway.
            if let Ok((run, _)) = self.load(&slot.id) {
                core.run = run;
            }
            slot.phase.send_replace(SlotPhase::Stopped);
            return Err(EngineError::Journal(e));
        }
        self.effects(core, slot, &batch);
        Ok(())
    }

    /// Acts on journaled events: publishes them, starts and stops tasks.
    pub(super) fn effects(&self, core: &mut Core, slot: &Slot, batch: &[JournalEvent]) {
        for je in batch {
            let _ = self.events.send(je.clone());
            let step = je.event.step().and_then(|id| core.run.wf.step_index(id));
            tracing::debug!(run = %slot.id, seq = je.seq, event = je.event.kind(), step = je.event.step().unwrap_or(""), "event");
            match (&je.event, step) {
                (
                    Event::AttemptStarted {
                        item,
                        attempt,
                        deadline_ms,
                        ..
                    },
                    Some(s),
                ) => {
                    if let Some(t) = core.tasks.remove(&TaskKey::Timer(s, *item)) {
                        t.handle.abort();
                    }
                    self.spawn_attempt(core, s, *item, *attempt, *deadline_ms, false);
                }
                (Event::AttemptSucceeded { item, .. }, Some(s)) => {
                    core.tasks.remove(&TaskKey::Attempt(s, *item));
                }
                (
                    Event::AttemptFailed {
                        item,
                        attempt,
                        retry_at_ms,
                        error,
                        step: id,
                    },
                    Some(s),
                ) => {
                    core.tasks.remove(&TaskKey::Attempt(s, *item));
                    tracing::info!(run = %slot.id, step = %unit_name(id, *item), attempt, error = %error, retry_at_ms, "attempt failed");
                    if let Some(at) = retry_at_ms {
                        let (item, attempt) = (*item, attempt.saturating_add(1));
                        self.spawn_timer(core, TaskKey::Timer(s, item), *at, move || {
                            Input::Retry {
                                step: s,
                                item,
                                attempt,
                            }
                        });
                    }
                }
                (Event::AttemptCancelled { item, .. }, Some(s)) => {
                    if let Some(t) = core.tasks.remove(&TaskKey::Attempt(s, *item))
                        && let Some(c) = t.cancel
                    {
                        let _ = c.send(());
                    }
                }
                (Event::ApprovalRequested { deadline_ms, .. }, Some(s)) => {
                    self.spawn_timer(core, TaskKey::Timer(s, None), *deadline_ms, move || {
                        Input::ApprovalDeadline { step: s }
                    });
                }
                (Event::ApprovalDecided { .. }, Some(s)) => {
                    if let Some(t) = core.tasks.remove(&TaskKey::Timer(s, None)) {
                        t.handle.abort();
                    }
                }
                (Event::RunFinished { state, reason }, _) => {
                    tracing::info!(run = %slot.id, state = %state, reason = reason.as_deref().unwrap_or(""), "run finished");
                    for (_, t) in core.tasks.drain() {
                        match t.cancel {
                            // Attempts still registered were cancelled above; anything
                            // else (timers) just stops.
                            Some(c) => {
                                let _ = c.send(());
                            }
                            None => t.handle.abort(),
                        }
                    }
                    slot.phase.send_replace(SlotPhase::Finished);
                    lock(&self.finished).push_back(slot.id.clone());
                    let exec = self.exec.clone();
                    let run = slot.id.clone();
                    let state = *state;
                    tokio::spawn(async move { exec.run_finished(&run, state).await });
                }
                _ => {}
            }
        }
    }

    /// After a restart: re-attach running attempts, re-arm timers, start anything
    /// ready.
    pub(super) fn resume(&self, slot: &Arc<Slot>) {
        let mut core = lock(&slot.core);
        for (s, item, attempt, deadline_ms) in core.run.running() {
            tracing::info!(run = %slot.id, step = %unit_name(&core.run.wf.steps[s].id, item), attempt, "re-attaching attempt");
            self.spawn_attempt(&mut core, s, item, attempt, deadline_ms, true);
        }
        for (s, item, attempt, at) in core.run.backoffs() {
            self.spawn_timer(&mut core, TaskKey::Timer(s, item), at, move || {
                Input::Retry {
                    step: s,
                    item,
                    attempt,
                }
            });
        }
        for (s, deadline) in core.run.waiting() {
            self.spawn_timer(&mut core, TaskKey::Timer(s, None), deadline, move || {
                Input::ApprovalDeadline { step: s }
            });
        }
        // Nothing should be ready (every batch schedules to a fixpoint), but planning
        // once costs nothing and makes that a non-assumption.
        if let Err(e) = self.commit(&mut core, slot, Vec::new()) {
            tracing::error!(run = %slot.id, error = %e, "resuming run");
        }
    }

    pub(super) fn spawn_attempt(
        &self,
        core: &mut Core,
        s: usize,
        item: Option<u32>,
        attempt: u32,
        deadline_ms: u64,
        reattach: bool,
    ) {
        let Some(task) = core.run.task(s, item, attempt) else {
            tracing::error!(run = %core.run.id, step = s, "no task for an agent attempt");
            return;
        };
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(attempt_task(
            self.me.clone(),
            self.exec.clone(),
            self.clock.clone(),
            self.store.clone(),
            AttemptJob {
                task,
                step: s,
                item,
                deadline_ms,
                reattach,
            },
            rx,
        ));
        core.tasks.insert(
            TaskKey::Attempt(s, item),
            Task {
                handle,
                cancel: Some(tx),
            },
        );
    }

    pub(super) fn spawn_timer(
        &self,
        core: &mut Core,
        key: TaskKey,
        at_ms: u64,
        input: impl FnOnce() -> Input + Send + 'static,
    ) {
        let me = self.me.clone();
        let clock = self.clock.clone();
        let run = core.run.id.clone();
        let handle = tokio::spawn(async move {
            clock.sleep_until(at_ms).await;
            if let Some(inner) = me.upgrade() {
                inner.deliver(&run, input());
            }
        });
        if let Some(old) = core.tasks.insert(
            key,
            Task {
                handle,
                cancel: None,
            },
        ) {
            old.handle.abort();
        }
    }
}

/// Numbers events and stamps them with the run and time.
pub(super) fn stamp(
    core: &mut Core,
    run: &RunId,
    now: u64,
    events: Vec<Event>,
) -> Vec<JournalEvent> {
    events
        .into_iter()
        .map(|event| {
            let seq = core.next_seq;
            core.next_seq += 1;
            JournalEvent {
                run: run.clone(),
                seq,
                time_ms: now,
                event,
            }
        })
        .collect()
}

struct AttemptJob {
    task: AgentTask,
    step: usize,
    item: Option<u32>,
    deadline_ms: u64,
    reattach: bool,
}

enum Race {
    Done(Result<AgentOutcome, StepError>),
    TimedOut,
    Cancelled,
    Abandoned,
}

async fn race<C: Clock>(
    fut: impl Future<Output = Result<AgentOutcome, StepError>>,
    clock: &C,
    deadline_ms: u64,
    cancel: &mut oneshot::Receiver<()>,
) -> Race {
    tokio::select! {
        biased;
        c = cancel => match c {
            Ok(()) => Race::Cancelled,
            Err(_) => Race::Abandoned,
        },
        r = fut => Race::Done(r),
        () = clock.sleep_until(deadline_ms) => Race::TimedOut,
    }
}

/// One attempt: the executor's future raced against the deadline and a cancel.
async fn attempt_task<E: Executor, C: Clock>(
    me: Weak<Inner<E, C>>,
    exec: Arc<E>,
    clock: Arc<C>,
    store: ArtifactStore,
    job: AttemptJob,
    mut cancel: oneshot::Receiver<()>,
) {
    // Cancelled (or abandoned) before it started: the executor never saw it.
    if !matches!(cancel.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
        return;
    }
    let task = job.task;
    let outcome = if job.reattach {
        race(
            exec.reattach(task.clone()),
            &*clock,
            job.deadline_ms,
            &mut cancel,
        )
        .await
    } else {
        race(
            exec.run(task.clone()),
            &*clock,
            job.deadline_ms,
            &mut cancel,
        )
        .await
    };
    let result = match outcome {
        Race::Abandoned => return,
        Race::Cancelled => {
            exec.cancel(&task).await;
            return;
        }
        Race::TimedOut => {
            exec.cancel(&task).await;
            Err(StepError::timeout(format!(
                "no answer within {}",
                human(task.timeout)
            )))
        }
        Race::Done(Ok(o)) => check_outcome(&store, o),
        Race::Done(Err(e)) => Err(e),
    };
    if let Some(inner) = me.upgrade() {
        inner.deliver(
            &task.run,
            Input::AttemptDone {
                step: job.step,
                item: job.item,
                attempt: task.attempt,
                result,
            },
        );
    }
}

/// An executor's artifacts must be well-formed and in the store: later steps copy
/// them by hash.
pub(super) fn check_outcome(
    store: &ArtifactStore,
    o: AgentOutcome,
) -> Result<AgentOutcome, StepError> {
    for a in &o.artifacts {
        validate_ref(a)
            .map_err(|e| StepError::fatal(format!("the executor returned a bad artifact: {e}")))?;
        let size = store
            .path(&a.sha256)
            .ok()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len());
        match size {
            None => {
                return Err(StepError::fatal(format!(
                    "artifact {} ({}) is not in the store",
                    a.sha256, a.name
                )));
            }
            Some(n) if n != a.size => {
                return Err(StepError::fatal(format!(
                    "artifact {} ({}) is {n} bytes in the store, the executor said {}",
                    a.sha256, a.name, a.size
                )));
            }
            Some(_) => {}
        }
    }
    Ok(o)
}
