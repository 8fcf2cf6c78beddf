//! The libvirt driver: one OS thread owns the libvirt connection (the
//! `virt` handles are not `Send`), jobs reach it over a channel, and every
//! call from async code has a timeout, so a hung libvirtd never freezes the
//! agent's runtime or its heartbeats.
//!
//! Layering (each imports only those below it): `error` (the one libvirt
//! error) at the bottom; `vmops` (blocking operations on one connection);
//! `migrate` (live migration on threads and connections of its own, built
//! on `vmops`); this module on top, which owns the driver thread and
//! dispatches jobs to `vmops` and `migrate`. Nothing below imports it.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use novacron_shared::clock::Clock;
use novacron_shared::ids::VmId;
use novacron_shared::protocol::{Capacity, Inventory, VmObserved};
use novacron_shared::spec::DesiredVm;
use tokio::sync::{mpsc, oneshot};
use virt::connect::Connect;

use crate::error::HvError;
use crate::events::{self, LifecycleEvent};
use crate::migrate::{self, MigrateRequest, Progress};
use crate::vmops::{self, Defined, HostSetup, ObservedVm, Storage};

type Job = Box<dyn FnOnce(&mut Driver) + Send>;

/// At most this many abandoned (hung) driver threads at once; past that a
/// timed-out call does not start yet another thread, so a libvirtd that
/// hangs for hours costs a bounded number of threads.
pub const MAX_STUCK_THREADS: i64 = 2;

/// The current driver thread: its queue and whether it was abandoned.
#[derive(Debug)]
struct Worker {
    jobs: std_mpsc::Sender<Job>,
    abandoned: Arc<std::sync::atomic::AtomicBool>,
}

/// Handle to the libvirt driver thread.
#[derive(Debug, Clone)]
pub struct Hypervisor {
    worker: Arc<Mutex<Worker>>,
    stuck: Arc<std::sync::atomic::AtomicI64>,
    uri: String,
    timeout: Duration,
    setup: Arc<HostSetup>,
    sink: mpsc::UnboundedSender<LifecycleEvent>,
    /// Driver threads abandoned because a call hung.
    pub abandoned: Arc<std::sync::atomic::AtomicU64>,
    departures: Arc<Mutex<HashMap<VmId, Departure>>>,
    clock: Clock,
    storage: Storage,
}

/// A VM live-migrating away from this host: the reconciler leaves it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// The migration runs.
    Leaving,
    /// It finished: the VM runs on the target. Until the server's desired
    /// state stops listing the VM here, it must not be recreated.
    Left,
}

/// State owned by the driver thread.
pub struct Driver {
    uri: String,
    conn: Option<Connect>,
    sink: mpsc::UnboundedSender<LifecycleEvent>,
    setup: Arc<HostSetup>,
    /// Connections opened so far (a change means libvirtd restarted or the
    /// driver thread was replaced: state must be re-read).
    pub connects: u64,
}

impl Driver {
    /// The live connection, (re)connecting and re-registering for events
    /// if needed.
    pub fn conn(&mut self) -> Result<&Connect, HvError> {
        let alive = self.conn.as_ref().is_some_and(|c| c.is_alive().unwrap_or(false));
        if !alive {
            // Dropping the old handle closes it (and its event registration).
            self.conn = None;
            let c = Connect::open(Some(&self.uri)).map_err(|e| HvError::Connect {
                uri: self.uri.clone(),
                message: e.to_string(),
            })?;
            if let Err(e) = events::register(&c, self.sink.clone()) {
                tracing::warn!(error = %e, "cannot register for libvirt events; changes will show on the next resync");
            }
            // Keepalive: a dead libvirtd is noticed within ~15 s even when idle.
            let _ = c.set_keep_alive(5, 3);
            self.connects += 1;
            tracing::info!(uri = %self.uri, connects = self.connects, "connected to libvirt");
            self.conn = Some(c);
        }
        self.conn.as_ref().ok_or(HvError::Gone)
    }

    /// The connection and the host setup.
    pub fn parts(&mut self) -> Result<(&Connect, &HostSetup), HvError> {
        self.conn()?;
        match &self.conn {
            Some(c) => Ok((c, &self.setup)),
            None => Err(HvError::Gone),
        }
    }
}

fn spawn_driver(
    uri: &str,
    setup: Arc<HostSetup>,
    sink: mpsc::UnboundedSender<LifecycleEvent>,
    connects: u64,
    stuck: Arc<std::sync::atomic::AtomicI64>,
) -> Result<Worker, HvError> {
    let (tx, rx) = std_mpsc::channel::<Job>();
    let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = abandoned.clone();
    let mut d = Driver {
        uri: uri.to_string(),
        conn: None,
        sink,
        setup,
        connects,
    };
    std::thread::Builder::new()
        .name("libvirt".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                job(&mut d);
            }
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                stuck.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                tracing::info!("an abandoned libvirt driver thread finished its call and exited");
            }
        })
        .map_err(|e| HvError::Connect {
            uri: uri.to_string(),
            message: format!("cannot start the driver thread: {e}"),
        })?;
    Ok(Worker { jobs: tx, abandoned })
}

impl Hypervisor {
    /// Starts the driver thread for `uri` on the system clock; see
    /// [`Hypervisor::start_with_clock`].
    pub fn start(
        uri: &str,
        timeout: Duration,
        setup: HostSetup,
    ) -> Result<(Self, mpsc::UnboundedReceiver<LifecycleEvent>), HvError> {
        Self::start_with_clock(uri, timeout, setup, Clock::system())
    }

    /// Starts the driver thread for `uri`; calls time out after `timeout`
    /// (tokio timers) and migrations read the time from `clock`.
    /// Lifecycle events arrive on the returned receiver.
    pub fn start_with_clock(
        uri: &str,
        timeout: Duration,
        setup: HostSetup,
        clock: Clock,
    ) -> Result<(Self, mpsc::UnboundedReceiver<LifecycleEvent>), HvError> {
        events::start_event_loop().map_err(|message| HvError::Connect {
            uri: uri.to_string(),
            message: format!("cannot start the libvirt event loop: {message}"),
        })?;
        let (sink, events) = mpsc::unbounded_channel();
        let setup = Arc::new(setup);
        let stuck = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let worker = spawn_driver(uri, setup.clone(), sink.clone(), 0, stuck.clone())?;
        Ok((
            Self {
                worker: Arc::new(Mutex::new(worker)),
                stuck,
                uri: uri.to_string(),
                timeout,
                setup,
                sink,
                abandoned: Arc::default(),
                departures: Arc::default(),
                clock,
                storage: Storage::Local,
            },
            events,
        ))
    }

    /// VMs the reconciler must not touch: those this agent is migrating
    /// away (or moved while the desired state still lists them here) and
    /// those the server says are migrating.
    /// A departed VM is forgotten once `desired` no longer lists it.
    pub fn hands_off(&self, desired: &[VmId], migrating: &[VmId]) -> HashSet<VmId> {
        let mut d = self.departures.lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|id, state| *state == Departure::Leaving || desired.contains(id));
        d.keys().chain(migrating).copied().collect()
    }

    /// Live-migrates a VM peer to peer (see [`crate::migrate`]); the
    /// reconciler leaves it alone meanwhile. Progress goes to `progress`.
    pub async fn migrate(
        &self,
        req: MigrateRequest,
        progress: mpsc::UnboundedSender<Progress>,
    ) -> Result<(), HvError> {
        let vm = req.vm;
        {
            let mut d = self.departures.lock().unwrap_or_else(|p| p.into_inner());
            if d.get(&vm) == Some(&Departure::Leaving) {
                return Err(HvError::Invalid(format!("VM {vm} is already migrating")));
            }
            d.insert(vm, Departure::Leaving);
        }
        let r = migrate::run(self.clock.clone(), self.uri.clone(), req, progress).await;
        let mut d = self.departures.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_ok() {
            d.insert(vm, Departure::Left);
        } else {
            d.remove(&vm);
        }
        r
    }

    /// This driver on a pool shared with other hosts (or not): set once,
    /// before the handle is cloned.
    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// The wire form of an observation of this host: with a shared pool,
    /// its directory names the shared storage.
    pub fn to_inventory(&self, capacity: Capacity, vms: &[ObservedVm]) -> Inventory {
        let mut inv = to_inventory(&self.uri, self.setup.migration_uri.clone(), capacity, vms);
        inv.labels = self.setup.labels.clone();
        inv.shared_storage = (self.storage == Storage::Shared).then(|| self.setup.pool_path.clone());
        // The locks live on the shared pool's files: its path is the lock space.
        inv.disk_locks = inv.shared_storage.clone().filter(|_| self.setup.disk_locks);
        inv
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The host setup.
    pub fn setup(&self) -> &HostSetup {
        &self.setup
    }

    /// Runs `f` on the driver thread, with the default timeout.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Driver) -> Result<R, HvError> + Send + 'static,
    ) -> Result<R, HvError> {
        self.call_within(self.timeout, f).await
    }

    /// Runs `f` on the driver thread. When it does not answer in time the
    /// thread is presumed hung: it is abandoned (it ends once its call
    /// returns, if ever) and a fresh thread with a fresh connection takes
    /// the following calls, so one hung call never blocks the next.
    pub async fn call_within<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut Driver) -> Result<R, HvError> + Send + 'static,
    ) -> Result<R, HvError> {
        use std::sync::atomic::Ordering;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |d| {
            // A caller that gave up (timed out) must not have its operation
            // run late, after the thread it queued on comes unstuck.
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(f(d));
        });
        let mine = {
            let w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
            w.jobs.send(job).map_err(|_| HvError::Gone)?;
            w.abandoned.clone()
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(HvError::Gone),
            Err(_) => {
                let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
                if !Arc::ptr_eq(&mine, &w.abandoned) || mine.load(Ordering::SeqCst) {
                    // Another caller already replaced the thread we queued on.
                    return Err(HvError::Timeout(timeout));
                }
                if self.stuck.load(Ordering::SeqCst) >= MAX_STUCK_THREADS {
                    tracing::warn!(uri = %self.uri, ?timeout, "libvirt still hung; not starting another driver thread");
                    return Err(HvError::Timeout(timeout));
                }
                let n = self.abandoned.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(uri = %self.uri, ?timeout, abandoned = n, "libvirt call hung; replacing the driver thread");
                w.abandoned.store(true, Ordering::SeqCst);
                self.stuck.fetch_add(1, Ordering::SeqCst);
                // A large connect count marks the new thread's connections as
                // new, so the reconciler re-reads everything.
                *w = spawn_driver(
                    &self.uri,
                    self.setup.clone(),
                    self.sink.clone(),
                    n << 32,
                    self.stuck.clone(),
                )?;
                Err(HvError::Timeout(timeout))
            }
        }
    }

    /// Connects if needed; returns the connection counter (it changes when
    /// libvirt was reconnected).
    pub async fn ping(&self) -> Result<u64, HvError> {
        self.call(|d| {
            d.conn()?;
            Ok(d.connects)
        })
        .await
    }

    /// Capacity and every domain, as the reconciler needs them.
    pub async fn observe(&self) -> Result<(Capacity, Vec<ObservedVm>), HvError> {
        self.call(|d| {
            let (c, s) = d.parts()?;
            vmops::observe(c, s)
        })
        .await
    }

    /// Capacity and every domain with its state, for the server.
    pub async fn inventory(&self) -> Result<Inventory, HvError> {
        let (capacity, vms) = self.observe().await?;
        Ok(self.to_inventory(capacity, &vms))
    }

    /// Defines or updates a VM.
    pub async fn define(&self, vm: DesiredVm) -> Result<Defined, HvError> {
        let storage = self.storage;
        self.call(move |d| {
            let (c, s) = d.parts()?;
            vmops::define_on(c, s, storage, &vm)
        })
        .await
    }

    /// Runs a one-VM operation on the driver thread.
    async fn vm_op(
        &self,
        id: VmId,
        f: impl FnOnce(&Connect, &HostSetup, VmId) -> Result<(), HvError> + Send + 'static,
    ) -> Result<(), HvError> {
        self.call(move |d| {
            let (c, s) = d.parts()?;
            f(c, s, id)
        })
        .await
    }

    /// Starts (or resumes) a VM.
    pub async fn start_vm(&self, id: VmId) -> Result<(), HvError> {
        self.vm_op(id, |c, _, id| vmops::start(c, id)).await
    }

    /// Powers a VM off at once.
    pub async fn destroy(&self, id: VmId) -> Result<(), HvError> {
        self.vm_op(id, |c, _, id| vmops::destroy(c, id)).await
    }

    /// Reboots a VM.
    pub async fn reboot(&self, id: VmId) -> Result<(), HvError> {
        self.vm_op(id, |c, _, id| vmops::reboot(c, id)).await
    }

    /// Pauses a VM.
    pub async fn suspend(&self, id: VmId) -> Result<(), HvError> {
        self.vm_op(id, |c, _, id| vmops::suspend(c, id)).await
    }

    /// Resumes a VM.
    pub async fn resume(&self, id: VmId) -> Result<(), HvError> {
        self.vm_op(id, |c, _, id| vmops::resume(c, id)).await
    }

    /// Graceful shutdown: ACPI power button, then a hard power-off when
    /// the guest has not stopped after `grace`. Returns whether it had to
    /// force it.
    pub async fn shutdown(&self, id: VmId, grace: Duration) -> Result<bool, HvError> {
        let asked = self
            .call(move |d| {
                let (c, _) = d.parts()?;
                vmops::request_shutdown(c, id)
            })
            .await?;
        if !asked {
            return Ok(false);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(vmops::SHUTDOWN_POLL).await;
            if self.call(move |d| vmops::is_off(d.conn()?, id)).await? {
                return Ok(false);
            }
        }
        tracing::warn!(vm = %id, ?grace, "guest did not shut down in time; powering it off");
        self.destroy(id).await?;
        Ok(true)
    }

    /// Removes an HA VM that now runs elsewhere (its volumes too unless
    /// `keep_disks`).
    pub async fn depart(&self, uuid: String, keep_disks: bool) -> Result<Vec<String>, HvError> {
        self.call(move |d| {
            let (c, s) = d.parts()?;
            vmops::depart(c, s, &uuid, keep_disks)
        })
        .await
    }

    /// Rewrites a domain's HA flag and epoch.
    pub async fn retag(&self, vm: DesiredVm) -> Result<(), HvError> {
        self.call(move |d| vmops::retag(d.conn()?, &vm)).await
    }

    /// Removes a VM with its volumes and snapshot metadata.
    pub async fn remove(&self, uuid: String) -> Result<Vec<String>, HvError> {
        self.call(move |d| {
            let (c, s) = d.parts()?;
            vmops::remove(c, s, &uuid)
        })
        .await
    }

    /// Takes a snapshot.
    pub async fn snapshot_create(&self, id: VmId, name: String) -> Result<(), HvError> {
        self.vm_op(id, move |c, _, id| vmops::snapshot_create(c, id, &name))
            .await
    }

    /// Reverts to a snapshot.
    pub async fn snapshot_revert(&self, id: VmId, name: String) -> Result<(), HvError> {
        self.vm_op(id, move |c, _, id| vmops::snapshot_revert(c, id, &name))
            .await
    }

    /// Deletes a snapshot.
    pub async fn snapshot_delete(&self, id: VmId, name: String) -> Result<(), HvError> {
        self.vm_op(id, move |c, _, id| vmops::snapshot_delete(c, id, &name))
            .await
    }

    /// Grows a disk.
    pub async fn resize_disk(&self, id: VmId, disk: String, size_mib: u64) -> Result<(), HvError> {
        self.vm_op(id, move |c, s, id| vmops::resize_disk(c, s, id, &disk, size_mib))
            .await
    }
}

/// The wire form of an observation.
pub fn to_inventory(
    uri: &str,
    migration_uri: Option<String>,
    capacity: Capacity,
    vms: &[ObservedVm],
) -> Inventory {
    Inventory {
        migration_uri,
        labels: Default::default(),
        shared_storage: None,
        disk_locks: None,
        witness: None,
        capacity,
        hypervisor: uri.to_string(),
        vms: vms
            .iter()
            .map(|v| VmObserved {
                name: v.name.clone(),
                uuid: v.uuid.clone(),
                state: v.state,
                managed: v.meta.is_some(),
                snapshots: v.snapshots.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_hv(uri: &str, timeout: Duration) -> (Hypervisor, mpsc::UnboundedReceiver<LifecycleEvent>) {
        let dir = std::env::temp_dir().join(format!("novacron-hv-test-{}", VmId::random()));
        let setup = HostSetup {
            pool: "novacron".into(),
            pool_path: dir.to_string_lossy().into_owned(),
            console_dir: dir.to_string_lossy().into_owned(),
            virt_type: None,
            migration_uri: None,
            labels: Default::default(),
            host_name: "test-host".into(),
            disk_locks: false,
        };
        Hypervisor::start(uri, timeout, setup).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits (on the system clock: these tests hang real driver threads)
    /// until every abandoned thread has exited; fails after five seconds.
    async fn wait_until_unstuck(hv: &Hypervisor) {
        use std::sync::atomic::Ordering;
        let clock = Clock::system();
        let deadline = clock.now() + Duration::from_secs(5);
        while hv.stuck.load(Ordering::SeqCst) > 0 && clock.now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            hv.stuck.load(Ordering::SeqCst),
            0,
            "abandoned driver threads never exited"
        );
    }

    #[tokio::test]
    async fn inventory_from_the_test_driver() {
        let (hv, _ev) = test_hv("test:///default", Duration::from_secs(10));
        let inv = hv.inventory().await.unwrap_or_else(|e| panic!("{e}"));
        // test:///default has one running domain called "test" on a 16-CPU node.
        assert_eq!(inv.capacity.cpus, 16);
        assert_eq!(inv.vms.len(), 1);
        assert_eq!(inv.vms[0].name, "test");
        assert_eq!(inv.vms[0].state, novacron_shared::protocol::VmState::Running);
    }

    #[tokio::test]
    async fn unreachable_libvirt_is_a_clear_error() {
        let (hv, _ev) = test_hv("qemu+tcp://127.0.0.1:1/system", Duration::from_secs(10));
        let e = hv.inventory().await.unwrap_err();
        assert!(matches!(e, HvError::Connect { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_hung_call_times_out_and_the_driver_stays_usable() {
        let (hv, _ev) = test_hv("test:///default", Duration::from_secs(2));
        // A call that never returns while `release` lives.
        let (release, hang) = std_mpsc::channel::<()>();
        let e = hv
            .call_within(Duration::from_millis(200), move |_| {
                let _ = hang.recv();
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(e, HvError::Timeout(_)), "{e}");
        assert_eq!(hv.abandoned.load(std::sync::atomic::Ordering::Relaxed), 1);
        // The old thread is still stuck; a fresh one serves the next call
        // (it would time out if it queued behind the hung one).
        let inv = hv.inventory().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inv.vms.len(), 1);
        drop(release);
    }

    #[tokio::test]
    async fn a_long_hang_costs_a_bounded_number_of_threads() {
        let (hv, _ev) = test_hv("test:///default", Duration::from_secs(2));
        let (release, hang) = std_mpsc::channel::<()>();
        let hang = Arc::new(Mutex::new(hang));
        for _ in 0..5 {
            let h = hang.clone();
            let e = hv
                .call_within(Duration::from_millis(100), move |_| {
                    let _ = h.lock().map(|r| r.recv());
                    Ok(())
                })
                .await
                .unwrap_err();
            assert!(matches!(e, HvError::Timeout(_)), "{e}");
        }
        use std::sync::atomic::Ordering;
        assert_eq!(hv.abandoned.load(Ordering::SeqCst), MAX_STUCK_THREADS as u64);
        assert_eq!(hv.stuck.load(Ordering::SeqCst), MAX_STUCK_THREADS);
        // libvirt answers again: the stuck threads finish and exit.
        drop(release);
        wait_until_unstuck(&hv).await;
    }

    #[tokio::test]
    async fn a_call_that_timed_out_never_runs_late() {
        let (hv, _ev) = test_hv("test:///default", Duration::from_secs(2));
        let (release, hang) = std_mpsc::channel::<()>();
        let first = {
            let hv = hv.clone();
            tokio::spawn(async move {
                hv.call_within(Duration::from_millis(300), move |_| {
                    let _ = hang.recv();
                    Ok(())
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Queued behind the hung call; its caller gives up first.
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        let e = hv
            .call_within(Duration::from_millis(100), move |_| {
                r.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(e, HvError::Timeout(_)), "{e}");
        assert!(first.await.is_ok_and(|r| r.is_err()));
        // Unstick the old thread and let it drain its queue and exit.
        drop(release);
        wait_until_unstuck(&hv).await;
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "a job whose caller gave up ran late"
        );
    }
}
