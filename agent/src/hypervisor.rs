//! The libvirt driver: one OS thread owns the libvirt connection (the
//! `virt` handles are not `Send`), jobs reach it over a channel, and every
//! call from async code has a timeout, so a hung libvirtd never freezes the
//! agent's runtime or its heartbeats.

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use novacron_shared::protocol::{Capacity, Inventory, VmObserved, VmState};
use tokio::sync::oneshot;
use virt::connect::Connect;
use virt::domain::DomainState;
use virt::enumutil::Enum;

/// A libvirt call failed.
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    /// libvirt could not be reached.
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// A libvirt call failed.
    #[error("libvirt {op} failed: {message}")]
    Call {
        /// Which call.
        op: &'static str,
        /// libvirt's message.
        message: String,
    },
    /// The call did not finish in time (libvirtd slow or hung).
    #[error("libvirt did not answer within {0:?}")]
    Timeout(Duration),
    /// The driver thread is gone.
    #[error("the libvirt driver thread stopped")]
    Gone,
}

type Job = Box<dyn FnOnce(&mut Driver) + Send>;

/// Handle to the libvirt driver thread.
#[derive(Debug, Clone)]
pub struct Hypervisor {
    jobs: std_mpsc::Sender<Job>,
    uri: String,
    timeout: Duration,
}

/// State owned by the driver thread.
pub struct Driver {
    uri: String,
    conn: Option<Connect>,
}

impl Driver {
    /// The live connection, (re)connecting if needed.
    pub fn conn(&mut self) -> Result<&Connect, HvError> {
        let alive = self.conn.as_ref().is_some_and(|c| c.is_alive().unwrap_or(false));
        if !alive {
            // Dropping the old handle closes it.
            self.conn = None;
            let c = Connect::open(Some(&self.uri)).map_err(|e| HvError::Connect {
                uri: self.uri.clone(),
                message: e.to_string(),
            })?;
            tracing::info!(uri = %self.uri, "connected to libvirt");
            self.conn = Some(c);
        }
        self.conn.as_ref().ok_or(HvError::Gone)
    }
}

fn call_err(op: &'static str) -> impl Fn(virt::error::Error) -> HvError {
    move |e| HvError::Call {
        op,
        message: e.to_string(),
    }
}

impl Hypervisor {
    /// Starts the driver thread for `uri`; calls time out after `timeout`.
    pub fn start(uri: &str, timeout: Duration) -> Result<Self, HvError> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let thread_uri = uri.to_string();
        std::thread::Builder::new()
            .name("libvirt".into())
            .spawn(move || {
                let mut d = Driver {
                    uri: thread_uri,
                    conn: None,
                };
                while let Ok(job) = rx.recv() {
                    job(&mut d);
                }
            })
            .map_err(|e| HvError::Connect {
                uri: uri.to_string(),
                message: format!("cannot start the driver thread: {e}"),
            })?;
        Ok(Self {
            jobs: tx,
            uri: uri.to_string(),
            timeout,
        })
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `f` on the driver thread, with the timeout.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Driver) -> Result<R, HvError> + Send + 'static,
    ) -> Result<R, HvError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |d| {
                let _ = tx.send(f(d));
            }))
            .map_err(|_| HvError::Gone)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(HvError::Gone),
            Err(_) => Err(HvError::Timeout(self.timeout)),
        }
    }

    /// Capacity and every domain with its state.
    pub async fn inventory(&self) -> Result<Inventory, HvError> {
        let uri = self.uri.clone();
        self.call(move |d| {
            let c = d.conn()?;
            let info = c.node_info().map_err(call_err("node_info"))?;
            let domains = c.list_all_domains(0).map_err(call_err("list_all_domains"))?;
            let mut vms = Vec::with_capacity(domains.len());
            for dom in domains {
                let name = dom.name().map_err(call_err("domain name"))?;
                let uuid = dom.uuid_string().map_err(call_err("domain uuid"))?;
                let state = match dom.state() {
                    Ok((Enum::Known(s), _)) => map_state(s),
                    Ok((Enum::Unknown(_), _)) => VmState::Unknown,
                    Err(e) => return Err(call_err("domain state")(e)),
                };
                vms.push(VmObserved { name, uuid, state });
            }
            vms.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(Inventory {
                capacity: Capacity {
                    cpus: info.cpus,
                    memory_mib: info.memory / 1024,
                },
                hypervisor: uri,
                vms,
            })
        })
        .await
    }
}

fn map_state(s: DomainState) -> VmState {
    match s {
        DomainState::Running | DomainState::Blocked => VmState::Running,
        DomainState::Paused => VmState::Paused,
        DomainState::Shutdown => VmState::ShuttingDown,
        DomainState::Shutoff => VmState::Stopped,
        DomainState::Crashed => VmState::Crashed,
        DomainState::PMSuspended => VmState::Suspended,
        DomainState::NoState => VmState::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inventory_from_the_test_driver() {
        let hv =
            Hypervisor::start("test:///default", Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
        let inv = hv.inventory().await.unwrap_or_else(|e| panic!("{e}"));
        // test:///default has one running domain called "test" on a 16-CPU node.
        assert_eq!(inv.capacity.cpus, 16);
        assert_eq!(inv.vms.len(), 1);
        assert_eq!(inv.vms[0].name, "test");
        assert_eq!(inv.vms[0].state, VmState::Running);
    }

    #[tokio::test]
    async fn unreachable_libvirt_is_a_clear_error() {
        let hv = Hypervisor::start("qemu+tcp://127.0.0.1:1/system", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        let e = hv.inventory().await.unwrap_err();
        assert!(matches!(e, HvError::Connect { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_hung_call_times_out_and_the_driver_stays_usable() {
        let hv = Hypervisor::start("test:///default", Duration::from_millis(200))
            .unwrap_or_else(|e| panic!("{e}"));
        let e = hv
            .call(|_| {
                std::thread::sleep(Duration::from_millis(600));
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(e, HvError::Timeout(_)), "{e}");
        // The slow job finishes; the next call goes through.
        let hv2 = Hypervisor {
            timeout: Duration::from_secs(10),
            ..hv
        };
        assert!(hv2.inventory().await.is_ok());
    }
}
