//! `novacron events`: follows the server-sent event stream, one line per
//! event, until Ctrl-C or the server closes it.

use novacron_api::events::{Event, EventKind, Lagged};

use crate::args::EventsArgs;
use crate::ctx::{word, Ctx};
use crate::units::{iso, query};
use crate::CliError;

/// One event of the stream, read into the API's types.
enum Item {
    /// A fleet event.
    Fleet(Box<Event>),
    /// The client fell behind.
    Lagged(Lagged),
    /// Anything this build does not know: shown as it came.
    Other {
        /// The SSE event name.
        name: String,
        /// Its data.
        data: String,
    },
}

/// Follows `GET /v1/events`.
pub async fn run(ctx: &mut Ctx, args: EventsArgs) -> Result<(), CliError> {
    let host = match &args.host {
        Some(h) => Some(ctx.host_id(h).await?.to_string()),
        None => None,
    };
    let vm = match &args.vm {
        Some(v) => Some(ctx.vm_id(v).await?.0.to_string()),
        None => None,
    };
    let path = format!("/v1/events{}", query(&[("host", host), ("vm", vm)]));
    // Opening the stream is bounded by the client's timeout; events then
    // come as they come.
    let mut stream = ctx.api.stream(&path).await?;
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
        if ctx.json() {
            ctx.emit(&format!("{}\n", ev.data.trim_end()))?;
            continue;
        }
        let item = if ev.event == "lagged" {
            serde_json::from_str(&ev.data).map(Item::Lagged).ok()
        } else {
            serde_json::from_str(&ev.data)
                .map(|e| Item::Fleet(Box::new(e)))
                .ok()
        }
        .unwrap_or(Item::Other {
            name: ev.event.clone(),
            data: ev.data.clone(),
        });
        let line = match &item {
            Item::Fleet(e) => format!(
                "{}  {:<9}  {:<24}  {}",
                iso(e.at_ms),
                e.kind.as_str(),
                subject(ctx, e).await,
                summary(e)
            ),
            Item::Lagged(l) => format!(
                "-  {:<9}  {:<24}  missed {} events (this client fell behind the stream)",
                "lagged", "-", l.missed
            ),
            Item::Other { name, data } => format!("-  {name:<9}  {:<24}  {data}", "-"),
        };
        ctx.emit(&format!("{}\n", line.trim_end()))?;
    }
}

/// What happened, for people.
fn summary(e: &Event) -> String {
    match (&e.kind, &e.operation) {
        (EventKind::Operation, Some(op)) => {
            let mut s = format!("{} {}%", word(&op.state), op.progress.percent);
            if !e.message.is_empty() {
                s.push_str(&format!(": {}", e.message));
            }
            s
        }
        _ => e.message.clone(),
    }
}

/// What an event is about, by name where one is known.
async fn subject(ctx: &mut Ctx, e: &Event) -> String {
    match e.kind {
        EventKind::Vm => match e.vm {
            Some(vm) => format!("vm {}", ctx.vm_label(vm).await),
            None => "-".into(),
        },
        EventKind::Host => match e.host {
            Some(h) => format!("host {}", ctx.host_label(h).await),
            None => "-".into(),
        },
        EventKind::Operation => match &e.operation {
            Some(op) => {
                let kind = word(&op.kind);
                if let Some(vm) = op.vm {
                    format!("{kind} {}", ctx.vm_label(vm).await)
                } else if let Some(h) = op.host {
                    format!("{kind} {}", ctx.host_label(h).await)
                } else {
                    format!("op {}", op.id)
                }
            }
            None => "-".into(),
        },
        EventKind::Ha => match (e.vm, e.host) {
            (Some(vm), _) => format!("ha vm {}", ctx.vm_label(vm).await),
            (None, Some(h)) => format!("ha host {}", ctx.host_label(h).await),
            (None, None) => "ha fleet".into(),
        },
        EventKind::Burst => match e.vm {
            Some(vm) => format!("burst vm {}", ctx.vm_label(vm).await),
            None => "burst fleet".into(),
        },
    }
}
