//! What every command needs: the API client, the output format, printing,
//! paging, and turning the ids or names people type into ids. Replies are
//! read into the API's types (`novacron_api`).

use std::collections::HashMap;
use std::io::Write;

use hyper::Method;
use novacron_api::audit::{AuditEntry, AuditList};
use novacron_api::client::{ApiClient, ClientError};
use novacron_api::hosts::{Host, HostList};
use novacron_api::operations::{Operation, OperationList};
use novacron_api::vms::{Vm, VmList};
use novacron_api::Empty;
use novacron_shared::ids::{HostId, VmId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::args::Output;
use crate::units::{enc, query};
use crate::CliError;

/// Page size used when following `next` to the end.
pub const PAGE: u32 = 1000;

/// A paged list of the API: where it is, the query parameter that takes
/// the previous page's `next`, and how to take a page apart.
pub trait Page: DeserializeOwned + Serialize {
    /// One entry.
    type Item;
    /// The path.
    const PATH: &'static str;
    /// The cursor parameter.
    const CURSOR: &'static str;
    /// What the entries are, for people (`VMs`).
    const WHAT: &'static str;
    /// The next page's cursor, if more follow.
    fn next_cursor(&self) -> Option<String>;
    /// The entries.
    fn items(self) -> Vec<Self::Item>;
    /// A page holding `items` with no next page.
    fn whole(items: Vec<Self::Item>) -> Self;
}

/// `GET /v1/vms`: by id, `after`.
impl Page for VmList {
    type Item = Vm;
    const PATH: &'static str = "/v1/vms";
    const CURSOR: &'static str = "after";
    const WHAT: &'static str = "vms";
    fn next_cursor(&self) -> Option<String> {
        self.next.map(|n| n.to_string())
    }
    fn items(self) -> Vec<Vm> {
        self.vms
    }
    fn whole(vms: Vec<Vm>) -> Self {
        Self { vms, next: None }
    }
}

/// `GET /v1/operations`: newest first, `before`.
impl Page for OperationList {
    type Item = Operation;
    const PATH: &'static str = "/v1/operations";
    const CURSOR: &'static str = "before";
    const WHAT: &'static str = "operations";
    fn next_cursor(&self) -> Option<String> {
        self.next.map(|n| n.to_string())
    }
    fn items(self) -> Vec<Operation> {
        self.operations
    }
    fn whole(operations: Vec<Operation>) -> Self {
        Self {
            operations,
            next: None,
        }
    }
}

/// `GET /v1/audit`: newest first, `before` (a sequence number).
impl Page for AuditList {
    type Item = AuditEntry;
    const PATH: &'static str = "/v1/audit";
    const CURSOR: &'static str = "before";
    const WHAT: &'static str = "entries";
    fn next_cursor(&self) -> Option<String> {
        self.next.map(|n| n.to_string())
    }
    fn items(self) -> Vec<AuditEntry> {
        self.entries
    }
    fn whole(entries: Vec<AuditEntry>) -> Self {
        Self { entries, next: None }
    }
}

/// The state shared by a command's steps.
#[derive(Debug)]
pub struct Ctx {
    /// The API.
    pub api: ApiClient,
    /// Table or JSON.
    pub output: Output,
    hosts: Option<Vec<Host>>,
    vm_names: HashMap<VmId, String>,
}

impl Ctx {
    /// A context over `api` printing in `output`.
    pub fn new(api: ApiClient, output: Output) -> Self {
        Self {
            api,
            output,
            hosts: None,
            vm_names: HashMap::new(),
        }
    }

    /// Whether the output is JSON.
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }

    /// `GET path`, read into `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        Ok(self.api.get(path).await?)
    }

    /// `POST path` with the typed body, read into `T`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, CliError> {
        Ok(self.api.send(Method::POST, path, Some(body)).await?)
    }

    /// `POST path` with an empty body, read into `T`.
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.post(path, &Empty {}).await
    }

    /// `DELETE path`, read into `T`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        Ok(self.api.send(Method::DELETE, path, None::<&Empty>).await?)
    }

    /// Writes `text` to stdout as is.
    pub fn emit(&self, text: &str) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(CliError::Stdout)
    }

    /// Prints `v` as pretty JSON.
    pub fn print_json<T: Serialize>(&self, v: &T) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(v).map_err(|e| CliError::Stdout(e.into()))?;
        self.emit(&format!("{text}\n"))
    }

    /// Prints `v` as JSON in JSON mode, else the line `people` says.
    pub fn report<T: Serialize>(&self, v: &T, people: impl FnOnce() -> String) -> Result<(), CliError> {
        if self.json() {
            self.print_json(v)
        } else {
            self.emit(&format!("{}\n", people()))
        }
    }

    /// Every page of a paged list (`page` entries per request), as one
    /// page with no `next`.
    pub async fn all_pages<P: Page>(
        &self,
        extra: &[(&str, Option<String>)],
        page: u32,
    ) -> Result<P, CliError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q: Vec<(&str, Option<String>)> = extra.to_vec();
            q.push(("limit", Some(page.to_string())));
            q.push((P::CURSOR, cursor.clone()));
            let got: P = self.get(&format!("{}{}", P::PATH, query(&q))).await?;
            let next = got.next_cursor();
            items.extend(got.items());
            match next {
                Some(n) if Some(&n) != cursor.as_ref() => cursor = Some(n),
                _ => break,
            }
        }
        Ok(P::whole(items))
    }

    /// A paged list: one page of at most `limit` entries, or with `all`
    /// every page (`limit` per request). In table mode, says on stderr when
    /// more entries follow.
    pub async fn list<P: Page>(
        &self,
        extra: &[(&str, Option<String>)],
        limit: Option<u32>,
        all: bool,
    ) -> Result<P, CliError> {
        if all {
            return self.all_pages(extra, limit.unwrap_or(PAGE)).await;
        }
        let mut q: Vec<(&str, Option<String>)> = extra.to_vec();
        q.push(("limit", limit.map(|l| l.to_string())));
        let v: P = self.get(&format!("{}{}", P::PATH, query(&q))).await?;
        if !self.json() && v.next_cursor().is_some() {
            eprintln!("novacron: more {} follow; pass --all to list them all", P::WHAT);
        }
        Ok(v)
    }

    /// Every host (fetched once per command).
    pub async fn hosts(&mut self) -> Result<&[Host], CliError> {
        if self.hosts.is_none() {
            let v: HostList = self.get("/v1/hosts").await?;
            self.hosts = Some(v.hosts);
        }
        Ok(self.hosts.as_deref().unwrap_or_default())
    }

    /// The host with this id or exact name.
    pub async fn resolve_host(&mut self, arg: &str) -> Result<Host, CliError> {
        let want_id = arg.parse::<HostId>().ok();
        let hosts = self.hosts().await?;
        if let Some(h) = hosts.iter().find(|h| Some(h.id) == want_id) {
            return Ok(h.clone());
        }
        let named: Vec<&Host> = hosts.iter().filter(|h| h.name == arg).collect();
        match named.as_slice() {
            [] => Err(CliError::NoHost(arg.to_string())),
            [h] => Ok((*h).clone()),
            many => Err(CliError::AmbiguousHost {
                name: arg.to_string(),
                ids: many.iter().map(|h| h.id.to_string()).collect(),
            }),
        }
    }

    /// The id of the host with this id or exact name.
    pub async fn host_id(&mut self, arg: &str) -> Result<HostId, CliError> {
        Ok(self.resolve_host(arg).await?.id)
    }

    /// A host's name for people (its id when unknown).
    pub async fn host_label(&mut self, id: HostId) -> String {
        match self.hosts().await {
            Ok(hosts) => hosts
                .iter()
                .find(|h| h.id == id)
                .map_or_else(|| id.to_string(), |h| h.name.clone()),
            Err(_) => id.to_string(),
        }
    }

    /// The name for people of a VM's host (`-` when it is on none).
    pub async fn vm_host_label(&mut self, vm: &Vm) -> String {
        match vm.placement.host() {
            Some(h) => self.host_label(h).await,
            None => "-".into(),
        }
    }

    /// The VM (as `GET /v1/vms/{id}` shows it) with this id or exact name.
    /// An id that names no VM is tried as a name too (names may be hex).
    pub async fn resolve_vm(&mut self, arg: &str) -> Result<Vm, CliError> {
        if let Ok(id) = arg.parse::<VmId>() {
            match self.get(&format!("/v1/vms/{id}")).await {
                Ok(v) => return Ok(v),
                Err(CliError::Api(ClientError::Refused { status: 404, .. })) => {}
                Err(e) => return Err(e),
            }
        }
        let mut after: Option<String> = None;
        loop {
            let q = query(&[
                ("name_prefix", Some(arg.to_string())),
                ("limit", Some(PAGE.to_string())),
                (VmList::CURSOR, after.clone()),
            ]);
            let page: VmList = self.get(&format!("{}{q}", VmList::PATH)).await?;
            let next = page.next_cursor();
            if let Some(v) = page.vms.into_iter().find(|v| v.vm.spec.name == arg) {
                return Ok(v);
            }
            match next {
                Some(n) if Some(&n) != after.as_ref() => after = Some(n),
                _ => return Err(CliError::NoVm(arg.to_string())),
            }
        }
    }

    /// The id of the VM with this id or exact name, and its name.
    pub async fn vm_id(&mut self, arg: &str) -> Result<(VmId, String), CliError> {
        let v = self.resolve_vm(arg).await?;
        let (id, name) = (v.vm.id, v.vm.spec.name);
        self.vm_names.insert(id, name.clone());
        Ok((id, name))
    }

    /// A VM's name for people (its id when unknown or gone).
    pub async fn vm_label(&mut self, id: VmId) -> String {
        if let Some(n) = self.vm_names.get(&id) {
            return n.clone();
        }
        let name = match self.get::<Vm>(&format!("/v1/vms/{}", enc(&id.to_string()))).await {
            Ok(v) => v.vm.spec.name,
            Err(_) => id.to_string(),
        };
        self.vm_names.insert(id, name.clone());
        name
    }
}

/// An optional value for a table cell: `-` when absent.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// An enum's JSON name for people: `shutting_down` → `shutting-down`.
pub fn word<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s.replace('_', "-"),
        Ok(other) => other.to_string(),
        Err(_) => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_shared::protocol::VmState;

    #[test]
    fn cells() {
        assert_eq!(opt(None::<u8>), "-");
        assert_eq!(opt(Some(3)), "3");
        assert_eq!(word(&VmState::ShuttingDown), "shutting-down");
        assert_eq!(word(&VmState::Running), "running");
    }
}
