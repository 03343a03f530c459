//! The VM state machine as one pure function: every state change in the launcher is an
//! [`Event`] applied by [`next`], so an impossible change (a stopped VM "resuming", a
//! second boot of a running VM) is refused in one place and tested exhaustively.

use clawos_vm_launcher_api::VmState;

/// What happens to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A hypervisor was launched for it (start or restore).
    Launched,
    /// The guest answered: it is ready.
    GuestReady,
    /// Its vCPUs were frozen.
    Paused,
    /// Its vCPUs run again.
    Resumed,
    /// A snapshot froze it.
    SnapshotBegun,
    /// A snapshot ended; `resume` when it ran before.
    SnapshotEnded { resume: bool },
    /// An operator asked it to stop.
    StopRequested,
    /// Its hypervisor process ended, as `Stopped` or `Failed`.
    Exited { failed: bool },
}

/// Why an event cannot happen in a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a VM that is {state} cannot take {event:?}")]
pub struct Illegal {
    pub state: VmState,
    pub event: Event,
}

/// The state after `event`, or why it cannot happen.
pub fn next(state: VmState, event: Event) -> Result<VmState, Illegal> {
    use Event as E;
    use VmState as S;
    let to = match (state, event) {
        (S::Stopped | S::Failed, E::Launched) => S::Starting,
        (S::Starting, E::GuestReady) => S::Running,
        (S::Running, E::Paused) => S::Paused,
        (S::Paused, E::Resumed) => S::Running,
        (S::Running | S::Paused, E::SnapshotBegun) => S::Paused,
        (S::Paused, E::SnapshotEnded { resume: true }) => S::Running,
        (S::Paused, E::SnapshotEnded { resume: false }) => S::Paused,
        (S::Starting | S::Running | S::Paused | S::Stopping, E::StopRequested) => S::Stopping,
        (s, E::Exited { failed }) if s.is_active() => {
            if failed {
                S::Failed
            } else {
                S::Stopped
            }
        }
        (state, event) => return Err(Illegal { state, event }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState as S;

    const STATES: [S; 6] = [
        S::Starting,
        S::Running,
        S::Paused,
        S::Stopping,
        S::Stopped,
        S::Failed,
    ];
    const EVENTS: [Event; 9] = [
        Event::Launched,
        Event::GuestReady,
        Event::Paused,
        Event::Resumed,
        Event::SnapshotBegun,
        Event::SnapshotEnded { resume: true },
        Event::SnapshotEnded { resume: false },
        Event::StopRequested,
        Event::Exited { failed: false },
    ];

    #[test]
    fn only_active_vms_have_a_hypervisor_to_lose_and_only_inactive_ones_boot() {
        for s in STATES {
            for e in EVENTS {
                match next(s, e) {
                    Ok(to) => {
                        if e == Event::Launched {
                            assert!(!s.is_active() && to == S::Starting, "{s} {e:?}");
                        }
                        if matches!(e, Event::Exited { .. }) {
                            assert!(s.is_active() && !to.is_active(), "{s} {e:?}");
                        } else if s.is_active() {
                            assert!(to.is_active(), "{s} {e:?} → {to}: only an exit ends a VM");
                        }
                    }
                    Err(i) => assert_eq!(i, Illegal { state: s, event: e }),
                }
            }
        }
    }

    #[test]
    fn a_stop_is_never_lost() {
        // Once stopping, nothing but the exit changes the state.
        for e in EVENTS {
            match next(S::Stopping, e) {
                Ok(to) if matches!(e, Event::Exited { .. }) => assert!(!to.is_active()),
                Ok(to) => assert_eq!(to, S::Stopping, "{e:?}"),
                Err(_) => {}
            }
        }
        assert_eq!(
            next(S::Stopping, Event::Exited { failed: true }),
            Ok(S::Failed)
        );
    }
}
