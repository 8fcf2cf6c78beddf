//! A stand-in cloud for the broker's unit tests — named as such: these
//! tests step the broker on a manual clock and script a failure for one
//! exact call, which no external emulator can follow (moto keeps real
//! time). The real EC2 peer (moto, behind a fault proxy) is in the
//! end-to-end tests (`tests/burst.rs`).
//!
//! Like moto, it ignores client tokens (every launch makes an instance).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use novacron_cloud::{
    Instance, InstanceState, InstanceType, LaunchSpec, Provider, ProviderError, ProviderFuture,
};

/// Which call a scripted fault answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Launch,
    Describe,
    /// `list_by_tag` for a launch id.
    LookupLaunch,
    /// `list_by_tag` for anything else (the fleet's orphans).
    List,
    Start,
    Stop,
    Terminate,
}

/// A scripted fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The call fails with this error and does nothing.
    Fail(ProviderError),
    /// The call takes effect, then its answer is lost (this error).
    Lost(ProviderError),
}

#[derive(Default)]
pub struct ScriptedCloud {
    pub types: Vec<InstanceType>,
    pub instances: Mutex<BTreeMap<String, Instance>>,
    pub faults: Mutex<VecDeque<(Call, Fault)>>,
    pub calls: Mutex<Vec<Call>>,
    next: Mutex<u32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ScriptedCloud {
    pub fn new() -> Self {
        Self {
            types: novacron_cloud::InstanceTypes::shipped().in_region("us-east-1"),
            ..Self::default()
        }
    }

    /// Fails the next `call` with `fault`.
    pub fn fault(&self, call: Call, fault: Fault) {
        lock(&self.faults).push_back((call, fault));
    }

    /// Instances not terminated.
    pub fn live(&self) -> Vec<Instance> {
        lock(&self.instances)
            .values()
            .filter(|i| !i.state.ended())
            .cloned()
            .collect()
    }

    /// How many times `call` was made.
    pub fn count(&self, call: Call) -> usize {
        lock(&self.calls).iter().filter(|c| **c == call).count()
    }

    /// Makes an instance behind the broker's back.
    pub fn add(&self, tags: &[(&str, &str)]) -> String {
        let id = self.new_id();
        lock(&self.instances).insert(
            id.clone(),
            Instance {
                id: id.clone(),
                instance_type: "t3.micro".into(),
                image: "ami-1".into(),
                state: InstanceState::Running,
                private_ip: Some("10.0.0.9".into()),
                public_ip: None,
                launched_ms: None,
                tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            },
        );
        id
    }

    /// Sets an instance's state behind the broker's back.
    pub fn set_state(&self, id: &str, s: InstanceState) {
        if let Some(i) = lock(&self.instances).get_mut(id) {
            i.state = s;
        }
    }

    fn new_id(&self) -> String {
        let mut n = lock(&self.next);
        *n += 1;
        format!("i-{:08x}", *n)
    }

    /// The scripted fault for `call`, if the next one is for it.
    fn take(&self, call: Call) -> Option<Fault> {
        lock(&self.calls).push(call);
        let mut f = lock(&self.faults);
        if f.front().is_some_and(|(c, _)| *c == call) {
            return f.pop_front().map(|(_, x)| x);
        }
        None
    }

    fn run<T>(&self, call: Call, effect: impl FnOnce() -> T) -> Result<T, ProviderError> {
        match self.take(call) {
            Some(Fault::Fail(e)) => Err(e),
            Some(Fault::Lost(e)) => {
                effect();
                Err(e)
            }
            None => Ok(effect()),
        }
    }
}

impl Provider for ScriptedCloud {
    fn name(&self) -> &str {
        "aws"
    }
    fn region(&self) -> &str {
        "us-east-1"
    }
    fn instance_types(&self) -> &[InstanceType] {
        &self.types
    }
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> ProviderFuture<'a, Instance> {
        Box::pin(async move {
            self.run(Call::Launch, || {
                let i = Instance {
                    id: self.new_id(),
                    instance_type: spec.instance_type.clone(),
                    image: spec.image.clone(),
                    state: InstanceState::Running,
                    private_ip: Some("10.0.0.1".into()),
                    public_ip: None,
                    launched_ms: None,
                    tags: spec.tags.clone(),
                };
                lock(&self.instances).insert(i.id.clone(), i.clone());
                i
            })
        })
    }
    fn describe<'a>(&'a self, ids: &'a [String]) -> ProviderFuture<'a, Vec<Instance>> {
        Box::pin(async move {
            self.run(Call::Describe, || {
                let all = lock(&self.instances);
                ids.iter().filter_map(|i| all.get(i).cloned()).collect()
            })
        })
    }
    fn list_by_tag<'a>(&'a self, key: &'a str, value: &'a str) -> ProviderFuture<'a, Vec<Instance>> {
        Box::pin(async move {
            let call = if key == novacron_cloud::TAG_LAUNCH {
                Call::LookupLaunch
            } else {
                Call::List
            };
            self.run(call, || {
                lock(&self.instances)
                    .values()
                    .filter(|i| i.tags.get(key).is_some_and(|v| v == value))
                    .cloned()
                    .collect()
            })
        })
    }
    fn start<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(async move { self.run(Call::Start, || self.set_state(id, InstanceState::Running)) })
    }
    fn stop<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(async move { self.run(Call::Stop, || self.set_state(id, InstanceState::Stopped)) })
    }
    fn terminate<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(async move { self.run(Call::Terminate, || self.set_state(id, InstanceState::Terminated)) })
    }
}
