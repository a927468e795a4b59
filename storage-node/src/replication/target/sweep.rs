//! Sweeping the cluster for leftover replicas: replicas of a volume that no
//! settled config names any more, left by a target that stopped before it
//! deleted the replicas it replaced or moved, or on a node that was down
//! then (`VolumeReport::leftovers_of` says which are safe to delete).
//!
//! A look asks every node for everything it holds, so one node's targets
//! share their looks: a [`Sweeper`] per node keeps when each target is due,
//! and one survey of the cluster serves every target due within a few
//! seconds of each other (`SHARE_WINDOW`). Per-target looks cost volumes × nodes calls each
//! minute, and a node that opened many targets at once asked every node as
//! many times in its first seconds.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{random_fraction, VolumeTarget};
use crate::cluster::{volumes, Discovery};

/// When a target is first swept after it opens: soon, but late enough that
/// the targets a node opens together (at its start) share the look.
const FIRST_SWEEP_AFTER: Duration = Duration::from_secs(5);
/// How often a target is swept once a sweep settled (plus up to a fifth,
/// at random, so nodes started together do not look in step).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// The wait after a sweep that could not settle (the config was changing, a
/// node did not answer), doubling up to `SWEEP_EVERY`.
const SWEEP_FIRST_RETRY: Duration = Duration::from_secs(10);
/// Targets due within this much of a survey are swept with it.
const SHARE_WINDOW: Duration = Duration::from_secs(5);

/// The sweeps of one node's targets.
pub struct Sweeper {
    discovery: Discovery,
    targets: Mutex<Vec<Swept>>,
    /// Raised when a target is added, so the sweeping task looks at its
    /// due time.
    added: Notify,
    /// Whether the sweeping task runs; it ends when no target is left.
    running: AtomicBool,
}

struct Swept {
    target: Weak<VolumeTarget>,
    due: Instant,
    retry: Duration,
}

impl Swept {
    /// The target, while it still serves (not dropped, fenced or closed).
    fn serving(&self) -> Option<Arc<VolumeTarget>> {
        self.target
            .upgrade()
            .filter(|target| !target.is_fenced() && !target.is_closed())
    }
}

impl fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let targets = self.targets.lock().expect("sweeper lock").len();
        f.debug_struct("Sweeper")
            .field("discovery", &self.discovery)
            .field("targets", &targets)
            .finish()
    }
}

/// What one survey found: every volume, or nothing when the cluster could
/// not be found or no node answered.
type Sweep = Result<Vec<volumes::VolumeReport>, ()>;

impl Sweeper {
    pub fn new(discovery: Discovery) -> Arc<Sweeper> {
        Arc::new(Sweeper {
            discovery,
            targets: Mutex::new(Vec::new()),
            added: Notify::new(),
            running: AtomicBool::new(false),
        })
    }

    /// Sweeps for `target` soon, then every minute (sooner while a sweep
    /// cannot settle) until the target is fenced, closed or dropped.
    pub(super) fn add(self: &Arc<Self>, target: &Arc<VolumeTarget>) {
        let mut targets = self.targets.lock().expect("sweeper lock");
        targets.push(Swept {
            target: Arc::downgrade(target),
            due: Instant::now() + FIRST_SWEEP_AFTER,
            retry: SWEEP_FIRST_RETRY,
        });
        // Checked under the lock the task ends under: a target added as it
        // ends gets a new task.
        if !self.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().run());
        }
        drop(targets);
        self.added.notify_one();
    }

    async fn run(self: Arc<Self>) {
        // Should the task panic, the next target added starts a new one.
        let _restart = RestartOnPanic(&self.running);
        loop {
            let Some(next) = self.next_due() else { return };
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.added.notified() => continue,
            }
            let due = self.take_due();
            if due.is_empty() {
                continue;
            }
            due[0].local.pool().metrics().leftover_surveys.inc();
            let survey = self.survey().await;
            for target in due {
                let settled = sweep(&target, &survey).await;
                self.reschedule(&target, settled);
            }
        }
    }

    /// The earliest due time, after dropping targets that are gone; None
    /// (and the task marked as ended) when none is left.
    fn next_due(&self) -> Option<Instant> {
        let mut targets = self.targets.lock().expect("sweeper lock");
        targets.retain(|swept| swept.serving().is_some());
        let next = targets.iter().map(|swept| swept.due).min();
        if next.is_none() {
            self.running.store(false, Ordering::Release);
        }
        next
    }

    /// The targets due now or within `SHARE_WINDOW`.
    fn take_due(&self) -> Vec<Arc<VolumeTarget>> {
        let horizon = Instant::now() + SHARE_WINDOW;
        self.targets
            .lock()
            .expect("sweeper lock")
            .iter()
            .filter(|swept| swept.due <= horizon)
            .filter_map(Swept::serving)
            .collect()
    }

    async fn survey(&self) -> Sweep {
        let cluster = self.discovery.cluster().await.map_err(|_| ())?;
        volumes::list(&cluster).await.map_err(|_| ())
    }

    fn reschedule(&self, target: &Arc<VolumeTarget>, settled: bool) {
        let now = Instant::now();
        let mut targets = self.targets.lock().expect("sweeper lock");
        let Some(swept) = targets
            .iter_mut()
            .find(|swept| std::ptr::eq(swept.target.as_ptr(), Arc::as_ptr(target)))
        else {
            return;
        };
        if settled {
            swept.due = now + SWEEP_EVERY + SWEEP_EVERY.mul_f64(random_fraction() * 0.2);
            swept.retry = SWEEP_FIRST_RETRY;
        } else {
            swept.due = now + swept.retry;
            swept.retry = (swept.retry * 2).min(SWEEP_EVERY);
        }
    }
}

struct RestartOnPanic<'a>(&'a AtomicBool);

impl Drop for RestartOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(false, Ordering::Release);
        }
    }
}

/// Deletes `target`'s leftovers that `survey` found; whether none is left.
async fn sweep(target: &VolumeTarget, survey: &Sweep) -> bool {
    let Ok(volumes) = survey else { return false };
    let Some(volume) = volumes.iter().find(|v| v.name == target.volume()) else {
        return false;
    };
    volumes::delete_leftovers(volume, target.volume_uid, target.epoch()).await
}
