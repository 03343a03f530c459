//! The guest side of the syscall audit: `clawos-audit` loads the same eBPF program as
//! the host's monitor-daemon, watches the cgroup the guest agent puts every command
//! into (children included), and ships the records to the host over vsock in the
//! [`clawos_syscall_probe::stream`] format.
//!
//! Nothing is dropped silently on the way:
//! - the kernel's ring-buffer drops are sent as a running total;
//! - records wait in a bounded [`Queue`] until the host acknowledges them (it does once
//!   they are in its trail); when the queue is full the oldest go, which the host sees
//!   as a gap in the sequence numbers and reports;
//! - after a reconnect the unacknowledged records are sent again, and the host skips
//!   the sequence numbers it already has.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use clawos_syscall_probe::stream::{self, Frame};

pub use clawos_guest::{AGENT_CGROUP, AUDIT_READY};

/// Records waiting for the host.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<Inner>,
    more: Condvar,
}

#[derive(Debug)]
struct Inner {
    frames: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    max_bytes: usize,
    /// Sequence number of the last record pushed.
    last_seq: u64,
    /// Kernel drops since boot, as last read from the probe.
    kernel_drops: u64,
    /// Records discarded because the queue was full.
    discarded: u64,
}

/// What the sender takes to write: frames in order, and the drop total.
#[derive(Debug)]
pub struct Batch {
    pub frames: Vec<(u64, Vec<u8>)>,
    pub kernel_drops: u64,
}

impl Queue {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                frames: VecDeque::new(),
                bytes: 0,
                max_bytes,
                last_seq: 0,
                kernel_drops: 0,
                discarded: 0,
            }),
            more: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one record under the next sequence number; discards the oldest records
    /// (sent or not, but unacknowledged) while it does not fit.
    pub fn push(&self, record: &[u8]) {
        let mut q = self.lock();
        q.last_seq += 1;
        let seq = q.last_seq;
        while q.bytes + record.len() > q.max_bytes {
            let Some((_, old)) = q.frames.pop_front() else {
                break;
            };
            q.bytes -= old.len();
            q.discarded += 1;
        }
        q.bytes += record.len();
        q.frames.push_back((seq, record.to_vec()));
    }

    /// Wakes the sender (after a batch of pushes).
    pub fn notify(&self) {
        self.more.notify_all();
    }

    /// Records the kernel's drop total.
    pub fn set_kernel_drops(&self, total: u64) {
        let mut q = self.lock();
        if total != q.kernel_drops {
            q.kernel_drops = total;
            drop(q);
            self.more.notify_all();
        }
    }

    /// Records discarded for lack of room so far.
    pub fn discarded(&self) -> u64 {
        self.lock().discarded
    }

    /// Records waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` records numbered after `after` (left in the queue) and the drop
    /// total; waits up to `wait` for something new when there is nothing after `after`
    /// and the drop total is `sent_drops`.
    pub fn peek_after(&self, after: u64, max: usize, sent_drops: u64, wait: Duration) -> Batch {
        let mut q = self.lock();
        let fresh = |q: &Inner| q.frames.back().is_some_and(|(s, _)| *s > after);
        if !fresh(&q) && q.kernel_drops == sent_drops {
            q = self
                .more
                .wait_timeout(q, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let from = q.frames.partition_point(|(s, _)| *s <= after);
        Batch {
            frames: q.frames.range(from..).take(max).cloned().collect(),
            kernel_drops: q.kernel_drops,
        }
    }

    /// Forgets the records up to `seq`: the host has them.
    pub fn acknowledge(&self, seq: u64) {
        let mut q = self.lock();
        while q.frames.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, r)) = q.frames.pop_front() {
                q.bytes -= r.len();
            }
        }
    }
}

/// Ships the queue to the host over the connections `connect` makes (a reading and
/// a writing half of each), forever: a hello frame on each, then every unacknowledged
/// record and the drop total, then new ones as they come. Acknowledgements read from
/// the connection release records. A connection the host closed, or a failed write,
/// ends it; the next one starts again from the oldest unacknowledged record.
pub fn ship<R, W>(
    queue: &Arc<Queue>,
    boot_id: &str,
    mut connect: impl FnMut() -> std::io::Result<(R, W)>,
    log: impl Fn(&str),
) -> !
where
    R: Read + Send + 'static,
    W: Write,
{
    let mut backoff = Duration::from_millis(100);
    let mut was_up = true;
    loop {
        let (mut acks, mut conn) = match connect() {
            Ok(c) => c,
            Err(e) => {
                if was_up {
                    log(&format!("host audit port unreachable ({e}); queueing"));
                    was_up = false;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let opened = std::time::Instant::now();
        let closed = Arc::new(AtomicBool::new(false));
        {
            let (q, closed) = (Arc::clone(queue), Arc::clone(&closed));
            std::thread::spawn(move || {
                while let Ok(Some(seq)) = stream::read_ack(&mut acks) {
                    q.acknowledge(seq);
                }
                closed.store(true, Ordering::SeqCst);
                q.notify();
            });
        }
        let mut buf = Vec::with_capacity(64 * 1024);
        Frame::Hello {
            version: stream::VERSION,
            boot_id: boot_id.to_owned(),
            clock_offset_ns: stream::boot_clock_offset_ns(),
        }
        .encode(&mut buf);
        // Sent again on every connection: the host may be a restarted daemon.
        let mut sent_drops = u64::MAX;
        let mut sent_upto = 0;
        while !closed.load(Ordering::SeqCst) {
            let batch = queue.peek_after(sent_upto, 512, sent_drops, Duration::from_millis(500));
            if batch.kernel_drops != sent_drops {
                Frame::Drops {
                    total: batch.kernel_drops,
                }
                .encode(&mut buf);
            }
            let last = batch.frames.last().map(|(s, _)| *s);
            for (seq, record) in batch.frames {
                Frame::Event { seq, record }.encode(&mut buf);
            }
            if !buf.is_empty() {
                if let Err(e) = conn.write_all(&buf).and_then(|()| conn.flush()) {
                    log(&format!("host audit connection: {e}; reconnecting"));
                    break;
                }
                buf.clear();
            }
            sent_drops = batch.kernel_drops;
            sent_upto = last.unwrap_or(sent_upto);
        }
        // A relay with no monitor behind it accepts and closes at once: wait before
        // the next attempt as if the connect had failed.
        if opened.elapsed() < Duration::from_secs(2) {
            if was_up {
                log("host closed the audit connection at once (monitor down?); queueing");
                was_up = false;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        } else {
            backoff = Duration::from_millis(100);
            if !was_up {
                log("host audit connection up again");
                was_up = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_full_queue_discards_the_oldest_and_keeps_numbering() {
        let q = Queue::new(300);
        for i in 0..5u8 {
            q.push(&[i; 96]);
        }
        // 3 records fit: 1 and 2 were discarded.
        assert_eq!(q.discarded(), 2);
        let seqs = |b: Batch| b.frames.iter().map(|(s, _)| *s).collect::<Vec<u64>>();
        let b = q.peek_after(0, 10, 0, Duration::ZERO);
        assert_eq!(b.frames[0].1[0], 2);
        assert_eq!(seqs(b), [3, 4, 5]);
        assert_eq!(seqs(q.peek_after(3, 10, 0, Duration::ZERO)), [4, 5]);
        q.acknowledge(4);
        assert_eq!(seqs(q.peek_after(0, 10, 0, Duration::ZERO)), [5]);
        assert_eq!(q.len(), 1);
    }

    /// Reads frames from the host's end until `n` events arrived.
    fn events(host: &mut UnixStream, n: usize) -> Vec<Frame> {
        let mut frames = Vec::new();
        while frames
            .iter()
            .filter(|f| matches!(f, Frame::Event { .. }))
            .count()
            < n
        {
            frames.push(Frame::read_from(host).expect("frame").expect("not the end"));
        }
        frames
    }

    #[test]
    fn unacknowledged_records_are_sent_again_and_acks_release_them() {
        let q = Arc::new(Queue::new(1 << 20));
        for i in 0..10u8 {
            q.push(&[i; 96]);
        }
        q.set_kernel_drops(3);
        let (conns_tx, conns_rx) = std::sync::mpsc::channel::<UnixStream>();
        let q2 = Arc::clone(&q);
        std::thread::spawn(move || {
            ship(
                &q2,
                "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                || {
                    let (host, guest) = UnixStream::pair()?;
                    conns_tx.send(host).map_err(std::io::Error::other)?;
                    Ok((guest.try_clone()?, guest))
                },
                |_| {},
            )
        });
        let seqs = |frames: &[Frame]| {
            frames
                .iter()
                .filter_map(|f| match f {
                    Frame::Event { seq, .. } => Some(*seq),
                    _ => None,
                })
                .collect::<Vec<u64>>()
        };
        // First connection: everything arrives, 1..=4 are acknowledged, then the host
        // goes away.
        let mut host = conns_rx.recv().expect("connection 1");
        let frames = events(&mut host, 10);
        assert!(matches!(frames[0], Frame::Hello { .. }));
        assert_eq!(frames[1], Frame::Drops { total: 3 });
        assert_eq!(seqs(&frames), (1..=10).collect::<Vec<u64>>());
        host.write_all(&4u64.to_le_bytes()).expect("ack");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while q.len() != 6 {
            assert!(std::time::Instant::now() < deadline, "ack not applied");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(host);
        // Second connection: hello and drop total again, and 5..=10 again.
        let mut host = conns_rx.recv().expect("connection 2");
        let frames = events(&mut host, 6);
        assert!(matches!(frames[0], Frame::Hello { .. }));
        assert_eq!(frames[1], Frame::Drops { total: 3 });
        assert_eq!(seqs(&frames), (5..=10).collect::<Vec<u64>>());
        // New records follow on the same connection.
        q.push(&[11; 96]);
        q.notify();
        assert_eq!(seqs(&events(&mut host, 1)), [11]);
        host.write_all(&11u64.to_le_bytes()).expect("ack");
        while !q.is_empty() {
            assert!(std::time::Instant::now() < deadline, "ack not applied");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
