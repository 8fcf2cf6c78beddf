//! `novacron events`: follows the server-sent event stream, one line per
//! event, until Ctrl-C or the server closes it.

use std::time::Duration;

use serde_json::Value;

use crate::args::EventsArgs;
use crate::ctx::{text, Ctx};
use crate::units::{iso, query};
use crate::CliError;

/// Follows `GET /v1/events`.
pub async fn run(ctx: &mut Ctx, args: EventsArgs) -> Result<(), CliError> {
    let host = match &args.host {
        Some(h) => Some(ctx.host_id(h).await?),
        None => None,
    };
    let vm = match &args.vm {
        Some(v) => Some(ctx.vm_id(v).await?.0),
        None => None,
    };
    let path = format!("/v1/events{}", query(&[("host", host), ("vm", vm)]));
    let api = ctx.api.clone().with_timeout(Duration::from_secs(30));
    let mut stream = api.stream(&path).await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let ev = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            ev = stream.next() => ev?,
        };
        let Some(ev) = ev else {
            eprintln!("novacron: the server closed the event stream");
            return Ok(());
        };
        let data: Value = match serde_json::from_str(&ev.data) {
            Ok(d) => d,
            Err(_) => Value::String(ev.data.clone()),
        };
        let line = if ctx.json() {
            data.to_string()
        } else {
            let subject = subject(ctx, &ev.event, &data).await;
            format!(
                "{}  {:<9}  {:<24}  {}",
                data["at_ms"].as_u64().map(iso).unwrap_or_else(|| "-".into()),
                ev.event,
                subject,
                summary(&ev.event, &data),
            )
        };
        ctx.emit(&format!("{}\n", line.trim_end()))?;
    }
}

/// What happened, for people.
fn summary(kind: &str, data: &Value) -> String {
    let message = data["message"].as_str().unwrap_or_default();
    match kind {
        "operation" => {
            let op = &data["operation"];
            let mut s = text(&op["state"]);
            if let Some(p) = op["progress"]["percent"].as_u64() {
                s.push_str(&format!(" {p}%"));
            }
            if !message.is_empty() {
                s.push_str(&format!(": {message}"));
            }
            s
        }
        "lagged" => format!(
            "missed {} events (this client fell behind the stream)",
            text(&data["missed"])
        ),
        _ => message.to_string(),
    }
}

/// What an event is about, by name where one is known.
async fn subject(ctx: &mut Ctx, kind: &str, data: &Value) -> String {
    let id = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_string),
            _ => None,
        }
    };
    match kind {
        "vm" => match id(&data["vm"]) {
            Some(vm) => format!("vm {}", ctx.vm_label(&vm).await),
            None => "-".into(),
        },
        "host" => match id(&data["host"]) {
            Some(h) => format!("host {}", ctx.host_label(&h).await),
            None => "-".into(),
        },
        "operation" => {
            let op = &data["operation"];
            let kind = op["kind"].as_str().unwrap_or("op");
            if let Some(vm) = op["vm"].as_str() {
                format!("{kind} {}", ctx.vm_label(vm).await)
            } else if let Some(h) = op["host"].as_str() {
                format!("{kind} {}", ctx.host_label(h).await)
            } else {
                match id(op) {
                    Some(op) => format!("op {op}"),
                    None => text(op),
                }
            }
        }
        _ => "-".into(),
    }
}
