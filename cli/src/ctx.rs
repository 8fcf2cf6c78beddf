//! What every command needs: the API client, the output format, printing,
//! and turning the ids or names people type into ids.

use std::collections::HashMap;
use std::io::Write;

use hyper::Method;
use novacron_api::client::{ApiClient, ClientError};
use serde_json::Value;

use crate::args::Output;
use crate::units::{enc, query};
use crate::CliError;

/// Page size used when following `next` to the end.
pub const PAGE: u32 = 1000;

/// A paged list in the API: where, under which key, and the query
/// parameter that takes the previous page's `next`.
#[derive(Debug)]
pub struct Listing {
    /// The path.
    pub path: &'static str,
    /// The key of the entries in the reply.
    pub key: &'static str,
    /// The cursor parameter.
    pub cursor: &'static str,
}

/// `GET /v1/vms`: by id, `after`.
pub const VMS: Listing = Listing {
    path: "/v1/vms",
    key: "vms",
    cursor: "after",
};
/// `GET /v1/operations`: newest first, `before`.
pub const OPERATIONS: Listing = Listing {
    path: "/v1/operations",
    key: "operations",
    cursor: "before",
};
/// `GET /v1/audit`: newest first, `before` (a sequence number).
pub const AUDIT: Listing = Listing {
    path: "/v1/audit",
    key: "entries",
    cursor: "before",
};

/// A page's `next` cursor (an id or a sequence number), if more follow.
fn next_cursor(page: &Value) -> Option<String> {
    match &page["next"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The state shared by a command's steps.
#[derive(Debug)]
pub struct Ctx {
    /// The API.
    pub api: ApiClient,
    /// Table or JSON.
    pub output: Output,
    hosts: Option<Vec<Value>>,
    vm_names: HashMap<String, String>,
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

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        Ok(self.api.call(Method::GET, path, None).await?)
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, CliError> {
        Ok(self.api.call(Method::POST, path, Some(body)).await?)
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<Value, CliError> {
        Ok(self.api.call(Method::DELETE, path, None).await?)
    }

    /// Writes `text` to stdout as is.
    pub fn emit(&self, text: &str) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(CliError::Stdout)
    }

    /// Prints `v` as pretty JSON.
    pub fn print_json(&self, v: &Value) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
        self.emit(&format!("{text}\n"))
    }

    /// Prints `v` as JSON in JSON mode, else the line `people` says.
    pub fn report(&self, v: &Value, people: impl FnOnce() -> String) -> Result<(), CliError> {
        if self.json() {
            self.print_json(v)
        } else {
            self.emit(&format!("{}\n", people()))
        }
    }

    /// Every page of a paged list (`page` entries per request). Returns
    /// `{key: [...all], "next": null}`.
    pub async fn all_pages(
        &self,
        l: &Listing,
        extra: &[(&str, Option<String>)],
        page: u32,
    ) -> Result<Value, CliError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q: Vec<(&str, Option<String>)> = extra.to_vec();
            q.push(("limit", Some(page.to_string())));
            q.push((l.cursor, cursor.clone()));
            let page = self.get(&format!("{}{}", l.path, query(&q))).await?;
            items.extend(page[l.key].as_array().cloned().unwrap_or_default());
            match next_cursor(&page) {
                Some(n) if Some(&n) != cursor.as_ref() => cursor = Some(n),
                _ => break,
            }
        }
        let mut out = serde_json::Map::new();
        out.insert(l.key.to_string(), Value::Array(items));
        out.insert("next".into(), Value::Null);
        Ok(Value::Object(out))
    }

    /// A paged list: one page of at most `limit` entries, or with `all`
    /// every page (`limit` per request). In table mode, says on stderr when
    /// more entries follow.
    pub async fn list(
        &self,
        l: &Listing,
        extra: &[(&str, Option<String>)],
        limit: Option<u32>,
        all: bool,
    ) -> Result<Value, CliError> {
        if all {
            return self.all_pages(l, extra, limit.unwrap_or(PAGE)).await;
        }
        let mut q: Vec<(&str, Option<String>)> = extra.to_vec();
        q.push(("limit", limit.map(|l| l.to_string())));
        let v = self.get(&format!("{}{}", l.path, query(&q))).await?;
        if !self.json() && next_cursor(&v).is_some() {
            eprintln!("novacron: more {} follow; pass --all to list them all", l.key);
        }
        Ok(v)
    }

    /// Every host (fetched once per command).
    pub async fn hosts(&mut self) -> Result<&[Value], CliError> {
        if self.hosts.is_none() {
            let v = self.get("/v1/hosts").await?;
            let hosts = v["hosts"]
                .as_array()
                .cloned()
                .ok_or(CliError::Unexpected("hosts list"))?;
            self.hosts = Some(hosts);
        }
        Ok(self.hosts.as_deref().unwrap_or_default())
    }

    /// The host with this id or exact name.
    pub async fn resolve_host(&mut self, arg: &str) -> Result<Value, CliError> {
        let want_id = arg
            .parse::<novacron_shared::ids::HostId>()
            .ok()
            .map(|i| i.to_string());
        let hosts = self.hosts().await?;
        if let Some(h) = hosts
            .iter()
            .find(|h| want_id.is_some() && h["id"].as_str() == want_id.as_deref())
        {
            return Ok(h.clone());
        }
        let named: Vec<&Value> = hosts.iter().filter(|h| h["name"] == arg).collect();
        match named.as_slice() {
            [] => Err(CliError::NoHost(arg.to_string())),
            [h] => Ok((*h).clone()),
            many => Err(CliError::AmbiguousHost {
                name: arg.to_string(),
                ids: many.iter().map(|h| text(&h["id"])).collect(),
            }),
        }
    }

    /// The id of the host with this id or exact name.
    pub async fn host_id(&mut self, arg: &str) -> Result<String, CliError> {
        let h = self.resolve_host(arg).await?;
        h["id"]
            .as_str()
            .map(str::to_string)
            .ok_or(CliError::Unexpected("host id"))
    }

    /// A host's name for people (its id when unknown).
    pub async fn host_label(&mut self, id: &str) -> String {
        match self.hosts().await {
            Ok(hosts) => hosts
                .iter()
                .find(|h| h["id"] == id)
                .and_then(|h| h["name"].as_str())
                .unwrap_or(id)
                .to_string(),
            Err(_) => id.to_string(),
        }
    }

    /// The VM (as `GET /v1/vms/{id}` shows it) with this id or exact name.
    /// An id that names no VM is tried as a name too (names may be hex).
    pub async fn resolve_vm(&mut self, arg: &str) -> Result<Value, CliError> {
        if let Ok(id) = arg.parse::<novacron_shared::ids::VmId>() {
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
                (VMS.cursor, after.clone()),
            ]);
            let page = self.get(&format!("{}{q}", VMS.path)).await?;
            let vms = page["vms"].as_array().ok_or(CliError::Unexpected("VM list"))?;
            if let Some(v) = vms.iter().find(|v| v["vm"]["spec"]["name"] == arg) {
                return Ok(v.clone());
            }
            match next_cursor(&page) {
                Some(n) if Some(&n) != after.as_ref() => after = Some(n),
                _ => return Err(CliError::NoVm(arg.to_string())),
            }
        }
    }

    /// The id of the VM with this id or exact name, and its name.
    pub async fn vm_id(&mut self, arg: &str) -> Result<(String, String), CliError> {
        let v = self.resolve_vm(arg).await?;
        let id = v["vm"]["id"]
            .as_str()
            .ok_or(CliError::Unexpected("VM id"))?
            .to_string();
        let name = text(&v["vm"]["spec"]["name"]);
        self.vm_names.insert(id.clone(), name.clone());
        Ok((id, name))
    }

    /// A VM's name for people (its id when unknown or gone).
    pub async fn vm_label(&mut self, id: &str) -> String {
        if let Some(n) = self.vm_names.get(id) {
            return n.clone();
        }
        let name = match self.get(&format!("/v1/vms/{}", enc(id))).await {
            Ok(v) => v["vm"]["spec"]["name"].as_str().unwrap_or(id).to_string(),
            Err(_) => id.to_string(),
        };
        self.vm_names.insert(id.to_string(), name.clone());
        name
    }
}

/// A JSON value for a table cell: strings bare, null as `-`.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A state name for people: `Running` → `running`, `ShuttingDown` →
/// `shutting-down`.
pub fn state(v: &Value) -> String {
    let Some(s) = v.as_str() else {
        return text(v);
    };
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells() {
        assert_eq!(text(&json!(null)), "-");
        assert_eq!(text(&json!("a")), "a");
        assert_eq!(text(&json!(3)), "3");
        assert_eq!(state(&json!("ShuttingDown")), "shutting-down");
        assert_eq!(state(&json!("running")), "running");
        assert_eq!(state(&json!(null)), "-");
    }
}
