//! Loads and attaches the eBPF program (`src/bpf/syscall_audit.bpf.c`, compiled by
//! `build.rs`) and gives access to its maps.

use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags, MapHandle, ObjectBuilder};

/// The compiled eBPF object.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/syscall_audit.bpf.o"));

/// Errors of the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Loading, verifying or attaching failed (no privileges, no BTF, old kernel).
    #[error(
        "eBPF {step}: {source} (monitor-daemon needs root or CAP_BPF+CAP_PERFMON and a kernel with BTF)"
    )]
    Load {
        step: &'static str,
        #[source]
        source: libbpf_rs::Error,
    },
    /// A map update failed (e.g. the watch table is full).
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: libbpf_rs::Error,
    },
    /// Bad configuration of the ring buffer.
    #[error("ring buffer size {0} must be a power of two of at least 4096 bytes")]
    RingSize(u32),
}

/// Handles on the maps user space writes (shareable across threads).
#[derive(Debug)]
pub struct Maps {
    tgids: MapHandle,
    cgroups: MapHandle,
    drops: MapHandle,
    user_bits: MapHandle,
    cgroup_watches: MapHandle,
    /// Serializes user space's read-modify-write of `user_bits` and the cgroup count.
    lock: std::sync::Mutex<u32>,
}

/// Words in the tgid pre-filter bitmaps (see the eBPF program).
const BIT_WORDS: u32 = 1024;

impl Maps {
    /// Watches a process (and, from now on, the children it forks).
    pub fn watch_pid(&self, tgid: u32, tag: u32) -> Result<(), ProbeError> {
        {
            // The bit goes in first, so the hash entry is never hidden behind a clear bit.
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let idx = ((tgid >> 6) & (BIT_WORDS - 1)).to_ne_bytes();
            let word = self
                .user_bits
                .lookup(&idx, MapFlags::ANY)
                .ok()
                .flatten()
                .and_then(|v| v.get(..8).and_then(|b| b.try_into().ok()))
                .map_or(0, u64::from_ne_bytes);
            self.user_bits
                .update(
                    &idx,
                    &(word | 1 << (tgid & 63)).to_ne_bytes(),
                    MapFlags::ANY,
                )
                .map_err(|source| ProbeError::Map {
                    map: "user_bits",
                    source,
                })?;
        }
        self.tgids
            .update(&tgid.to_ne_bytes(), &tag.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| ProbeError::Map {
                map: "watched_tgids",
                source,
            })
    }

    /// Stops watching a process (its children stay watched until they exit).
    pub fn unwatch_pid(&self, tgid: u32) {
        let _ = self.tgids.delete(&tgid.to_ne_bytes());
    }

    /// Watches every process in a cgroup v2 (by the cgroup directory's inode number).
    pub fn watch_cgroup(&self, id: u64, tag: u32) -> Result<(), ProbeError> {
        self.cgroups
            .update(&id.to_ne_bytes(), &tag.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| ProbeError::Map {
                map: "watched_cgroups",
                source,
            })?;
        self.count_cgroups(1)
    }

    pub fn unwatch_cgroup(&self, id: u64) {
        if self.cgroups.delete(&id.to_ne_bytes()).is_ok() {
            let _ = self.count_cgroups(-1);
        }
    }

    fn count_cgroups(&self, delta: i32) -> Result<(), ProbeError> {
        let mut n = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_add_signed(delta);
        self.cgroup_watches
            .update(&0u32.to_ne_bytes(), &n.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| ProbeError::Map {
                map: "cgroup_watches",
                source,
            })
    }

    /// Events lost in the kernel so far (all CPUs).
    pub fn drops(&self) -> u64 {
        let Ok(Some(per_cpu)) = self.drops.lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY) else {
            return 0;
        };
        per_cpu
            .iter()
            .filter_map(|v| v.get(..8).and_then(|b| b.try_into().ok()))
            .map(u64::from_ne_bytes)
            .sum()
    }
}

/// Loads the program with a ring buffer of `ring_bytes` and runs `on_event` for every
/// record, in batches: `on_batch` after each drain. Returns on error, or once `stop`
/// is set and the ring is drained a last time; the maps are handed out through `ready`
/// once everything is attached.
pub fn run(
    ring_bytes: u32,
    ready: std::sync::mpsc::Sender<Result<Maps, ProbeError>>,
    mut on_event: impl FnMut(&[u8]),
    mut on_batch: impl FnMut(),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), ProbeError> {
    let load = |step| move |source| ProbeError::Load { step, source };
    let setup = (|| {
        if ring_bytes < 4096 || !ring_bytes.is_power_of_two() {
            return Err(ProbeError::RingSize(ring_bytes));
        }
        let mut open = ObjectBuilder::default()
            .open_memory(OBJECT)
            .map_err(load("open"))?;
        for mut m in open.maps_mut() {
            let name = m.name().to_string_lossy().into_owned();
            if name == "events" {
                m.set_max_entries(ring_bytes).map_err(load("ring size"))?;
            } else if name.ends_with(".rodata")
                && let Some(data) = m.initial_value_mut()
                && data.len() >= 8
            {
                // `wake_every`: about a quarter of the ring's worth of events per CPU
                // (a power of two, at least 1).
                let quarter = (u64::from(ring_bytes) / 4 / 128).max(1);
                let every = 1u64 << (63 - quarter.leading_zeros());
                data[..8].copy_from_slice(&every.to_ne_bytes());
            }
        }
        let obj = open.load().map_err(load("load (verifier)"))?;
        let mut links = Vec::new();
        for p in obj.progs_mut() {
            links.push(p.attach().map_err(load("attach"))?);
        }
        let handle = |want: &'static str| {
            obj.maps()
                .find(|m| m.name() == want)
                .ok_or_else(|| ProbeError::Map {
                    map: want,
                    source: libbpf_rs::Error::from(std::io::Error::other("map missing")),
                })
                .and_then(|m| {
                    MapHandle::try_from(&m).map_err(|source| ProbeError::Map { map: want, source })
                })
        };
        let maps = Maps {
            tgids: handle("watched_tgids")?,
            cgroups: handle("watched_cgroups")?,
            drops: handle("drops")?,
            user_bits: handle("user_bits")?,
            cgroup_watches: handle("cgroup_watches")?,
            lock: std::sync::Mutex::new(0),
        };
        Ok((obj, links, maps))
    })();
    let (obj, _links, maps) = match setup {
        Ok(v) => v,
        Err(e) => {
            // Reported to the caller, which stops the daemon with it.
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    let events = obj
        .maps()
        .find(|m| m.name() == "events")
        .ok_or_else(|| ProbeError::Map {
            map: "events",
            source: libbpf_rs::Error::from(std::io::Error::other("map missing")),
        })?;
    let mut builder = libbpf_rs::RingBufferBuilder::new();
    builder
        .add(&events, |data: &[u8]| {
            on_event(data);
            0
        })
        .map_err(load("ring buffer"))?;
    let ring = builder.build().map_err(load("ring buffer"))?;
    let _ = ready.send(Ok(maps));
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        // Wake-ups are batched in the kernel; the timeout bounds the latency of a quiet
        // trickle, and `consume` drains whatever is there either way.
        ring.poll(Duration::from_millis(10)).map_err(load("poll"))?;
        ring.consume().map_err(load("consume"))?;
        on_batch();
    }
    // What was emitted between the last drain and the stop is still in the ring: a
    // stopping daemon records it too.
    ring.consume().map_err(load("consume"))?;
    on_batch();
    Ok(())
}
