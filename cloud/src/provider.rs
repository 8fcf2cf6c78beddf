//! The provider interface: what the burst broker asks of a cloud.
//!
//! Every call is one request to the cloud, without retries of its own: the
//! broker owns retries (capped, jittered backoff, shown on the VM) and must
//! see every throttle and server error to do that. Errors are classified by
//! [`ProviderError`]; a driver maps its cloud's error codes onto it.
//!
//! Idempotency does not rest on the cloud: [`LaunchSpec::launch_id`] is sent
//! as the launch's client token *and* as the [`crate::TAG_LAUNCH`] tag, and
//! the broker looks the tag up with [`Provider::list_by_tag`] before it ever
//! retries a launch (emulators and retried requests have been seen ignoring
//! client tokens).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use crate::types::InstanceType;

/// What a provider call returns: a boxed future, so the broker can hold any
/// provider as `Arc<dyn Provider>`.
pub type ProviderFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ProviderError>> + Send + 'a>>;

/// One instance to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The launch decision's id: the client token and the
    /// [`crate::TAG_LAUNCH`] tag (at most 64 ASCII characters).
    pub launch_id: String,
    /// The instance type (e.g. `t3.micro`).
    pub instance_type: String,
    /// The machine image (e.g. `ami-…`).
    pub image: String,
    /// User data, as the VM's cloud-init gave it (the driver encodes it).
    pub user_data: Option<String>,
    /// The subnet to launch into (the account's default when absent).
    pub subnet: Option<String>,
    /// Security groups (the default when empty).
    pub security_groups: Vec<String>,
    /// An SSH key pair's name.
    pub key_name: Option<String>,
    /// Tags put on the instance at launch: at least [`crate::TAG_VM`],
    /// [`crate::TAG_FLEET`], [`crate::TAG_LAUNCH`] and `Name`.
    pub tags: BTreeMap<String, String>,
}

/// An instance's state as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Booting.
    Pending,
    /// Running (and billed).
    Running,
    /// Stopping.
    Stopping,
    /// Stopped (not billed for compute).
    Stopped,
    /// Terminating.
    ShuttingDown,
    /// Terminated (kept visible by the cloud for a while).
    Terminated,
    /// A state this interface does not know.
    Other(String),
}

impl InstanceState {
    /// Whether the instance is billed for compute in this state (AWS bills
    /// pending → running and stopping-for-hibernate; we count running only).
    pub fn billed(&self) -> bool {
        matches!(self, Self::Running)
    }

    /// Whether the instance is gone or on its way out.
    pub fn ended(&self) -> bool {
        matches!(self, Self::ShuttingDown | Self::Terminated)
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::ShuttingDown => "shutting-down",
            Self::Terminated => "terminated",
            Self::Other(s) => s,
        })
    }
}

/// One instance, as described by the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The instance id (e.g. `i-0abc…`).
    pub id: String,
    /// Its type.
    pub instance_type: String,
    /// Its image.
    pub image: String,
    /// Its state.
    pub state: InstanceState,
    /// Its private address, when it has one.
    pub private_ip: Option<String>,
    /// Its public address, when it has one.
    pub public_ip: Option<String>,
    /// Launch time, Unix ms, when reported.
    pub launched_ms: Option<u64>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// A provider call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The cloud asked us to slow down (EC2 `RequestLimitExceeded`,
    /// `Throttling`): retry later.
    #[error("throttled by the provider: {0}")]
    Throttled(String),
    /// A server error, a timeout or a broken connection: retry later (a
    /// launch only after looking its tag up).
    #[error("provider unavailable: {0}")]
    Transient(String),
    /// The request cannot succeed as it is (a bad image, not authorized,
    /// no capacity for the type, an invalid parameter): do not retry.
    #[error("{code}: {message}")]
    Permanent {
        /// The cloud's error code (e.g. `InvalidAMIID.NotFound`).
        code: String,
        /// The cloud's message.
        message: String,
    },
}

impl ProviderError {
    /// Whether the same call may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Throttled(_) | Self::Transient(_))
    }
}

/// A cloud the burst broker can launch instances in.
///
/// Calls do not retry (see the module header). [`Provider::describe`] leaves
/// out instances the cloud does not know (it is not an error), and includes
/// terminated ones while the cloud still lists them.
pub trait Provider: Send + Sync {
    /// The provider's name in the server's config (e.g. `aws`).
    fn name(&self) -> &str;
    /// The region it launches in (e.g. `us-east-1`).
    fn region(&self) -> &str;
    /// The instance types it may launch, with this region's prices.
    fn instance_types(&self) -> &[InstanceType];
    /// Launches one instance.
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> ProviderFuture<'a, Instance>;
    /// Describes instances by id.
    fn describe<'a>(&'a self, ids: &'a [String]) -> ProviderFuture<'a, Vec<Instance>>;
    /// Every instance (in any state the cloud still lists) whose tag `key`
    /// has the value `value`.
    fn list_by_tag<'a>(&'a self, key: &'a str, value: &'a str) -> ProviderFuture<'a, Vec<Instance>>;
    /// Starts a stopped instance.
    fn start<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()>;
    /// Stops a running instance.
    fn stop<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()>;
    /// Terminates an instance (terminating one that is gone succeeds).
    fn terminate<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()>;
}
