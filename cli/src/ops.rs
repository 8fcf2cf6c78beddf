//! `novacron migrate` and `novacron operations ...`: long-running
//! operations, and waiting for them with a one-line progress status.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde_json::{json, Value};

use crate::args::{MigrateArgs, OperationsCommand};
use crate::ctx::{text, Ctx};
use crate::table::{fields, Table};
use crate::units::{ago, enc, now_ms, when};
use crate::CliError;

/// How often `wait` asks for the operation.
const POLL: Duration = Duration::from_millis(500);

/// Runs an `operations` subcommand.
pub async fn run(ctx: &mut Ctx, command: OperationsCommand) -> Result<(), CliError> {
    match command {
        OperationsCommand::List(p) => {
            let v = ctx.list(&crate::ctx::OPERATIONS, &[], p.limit, p.all).await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            let ops = v["operations"]
                .as_array()
                .ok_or(CliError::Unexpected("operations list"))?;
            let mut rows = Vec::new();
            for op in ops {
                rows.push((op.clone(), Row::of(ctx, op).await));
            }
            ctx.emit(&table(&rows, now_ms()))
        }
        OperationsCommand::Show { op } => {
            let v = ctx.get(&format!("/v1/operations/{}", enc(&op))).await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            let row = Row::of(ctx, &v).await;
            ctx.emit(&show(&v, &row, now_ms()))
        }
        OperationsCommand::Wait { op } => wait_and_report(ctx, &op).await,
    }
}

/// `migrate VM [--to H] [--wait]`.
pub async fn migrate(ctx: &mut Ctx, args: MigrateArgs) -> Result<(), CliError> {
    let (id, name) = ctx.vm_id(&args.vm).await?;
    let body = match &args.to {
        Some(h) => json!({"host": ctx.host_id(h).await?}),
        None => json!({}),
    };
    let v = ctx.post(&format!("/v1/vms/{id}/migrate"), body).await?;
    let op = &v["operation"];
    let op_id = op["id"]
        .as_str()
        .ok_or(CliError::Unexpected("operation id"))?
        .to_string();
    let to = match op["target"].as_str() {
        Some(t) => format!(" to host {}", ctx.host_label(t).await),
        None => String::new(),
    };
    if args.wait {
        eprintln!("migrating VM {name}{to}: operation {op_id}");
        return wait_and_report(ctx, &op_id).await;
    }
    ctx.report(&v, || {
        format!(
            "migrating VM {name}{to}: operation {op_id}\nfollow it with: novacron operations wait {op_id}"
        )
    })
}

/// Waits for an operation to end, then prints it (a line, or its JSON)
/// and fails if it failed.
pub async fn wait_and_report(ctx: &mut Ctx, op_id: &str) -> Result<(), CliError> {
    let op = wait(ctx, op_id).await?;
    let failed = op["state"] == "failed";
    if ctx.json() {
        ctx.print_json(&op)?;
    } else if !failed {
        let row = Row::of(ctx, &op).await;
        ctx.emit(&format!("operation {op_id} ({}) succeeded\n", row.what()))?;
    }
    if failed {
        return Err(CliError::OperationFailed {
            id: op_id.to_string(),
            error: op["error"].as_str().unwrap_or("no reason given").to_string(),
        });
    }
    Ok(())
}

/// Polls an operation until it succeeds or fails, showing its progress on
/// stderr: one line rewritten in place on a terminal, a line per change
/// otherwise.
async fn wait(ctx: &Ctx, op_id: &str) -> Result<Value, CliError> {
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let path = format!("/v1/operations/{}", enc(op_id));
    loop {
        let op = ctx.get(&path).await?;
        let line = status_line(&op);
        if line != last {
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r\x1b[2K{line}")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
            last = line;
        }
        if matches!(op["state"].as_str(), Some("succeeded" | "failed")) {
            if tty {
                eprintln!();
            }
            return Ok(op);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `running  42%  copying memory`.
fn status_line(op: &Value) -> String {
    let mut s = format!("{} {}", text(&op["kind"]), text(&op["state"]));
    if let Some(p) = op["progress"]["percent"].as_u64() {
        s.push_str(&format!(" {p:>3}%"));
    }
    if let Some(m) = op["progress"]["message"].as_str().filter(|m| !m.is_empty()) {
        s.push_str(&format!("  {m}"));
    }
    if let Some(e) = op["error"].as_str() {
        s.push_str(&format!("  error: {e}"));
    }
    s
}

/// An operation with the names of what it concerns.
#[derive(Debug)]
struct Row {
    vm: Option<String>,
    host: Option<String>,
    target: Option<String>,
}

impl Row {
    async fn of(ctx: &mut Ctx, op: &Value) -> Row {
        let vm = match op["vm"].as_str() {
            Some(id) => Some(ctx.vm_label(id).await),
            None => None,
        };
        let host = match op["host"].as_str() {
            Some(id) => Some(ctx.host_label(id).await),
            None => None,
        };
        let target = match op["target"].as_str() {
            Some(id) => Some(ctx.host_label(id).await),
            None => None,
        };
        Row { vm, host, target }
    }

    /// `VM web-1 from hv-1 to hv-2`, `host hv-1`.
    fn what(&self) -> String {
        let mut parts = Vec::new();
        match (&self.vm, &self.host) {
            (Some(vm), Some(h)) => parts.push(format!("VM {vm} from {h}")),
            (Some(vm), None) => parts.push(format!("VM {vm}")),
            (None, Some(h)) => parts.push(format!("host {h}")),
            (None, None) => {}
        }
        if let Some(t) = &self.target {
            parts.push(format!("to {t}"));
        }
        parts.join(" ")
    }
}

fn table(rows: &[(Value, Row)], now: u64) -> String {
    let mut t = Table::new(&["ID", "KIND", "STATE", ">PROGRESS", "WHAT", "UPDATED", "MESSAGE"]);
    for (op, row) in rows {
        t.row(vec![
            text(&op["id"]),
            text(&op["kind"]),
            text(&op["state"]),
            op["progress"]["percent"]
                .as_u64()
                .map(|p| format!("{p}%"))
                .unwrap_or_else(|| "-".into()),
            row.what(),
            op["updated_ms"]
                .as_u64()
                .map(|ms| ago(ms, now))
                .unwrap_or_else(|| "-".into()),
            op["error"]
                .as_str()
                .or_else(|| op["progress"]["message"].as_str())
                .unwrap_or("")
                .to_string(),
        ]);
    }
    t.render()
}

fn show(op: &Value, row: &Row, now: u64) -> String {
    let ms = |k: &str| op[k].as_u64().map(|v| when(v, now)).unwrap_or_else(|| "-".into());
    let with_id = |label: &Option<String>, k: &str| match (label, op[k].as_str()) {
        (Some(l), Some(id)) if l != id => format!("{l} ({id})"),
        (_, Some(id)) => id.to_string(),
        _ => "-".into(),
    };
    fields(&[
        ("id", text(&op["id"])),
        ("kind", text(&op["kind"])),
        ("state", text(&op["state"])),
        (
            "progress",
            match op["progress"]["percent"].as_u64() {
                Some(p) => format!("{p}% {}", op["progress"]["message"].as_str().unwrap_or(""))
                    .trim_end()
                    .to_string(),
                None => "-".into(),
            },
        ),
        ("vm", with_id(&row.vm, "vm")),
        ("host", with_id(&row.host, "host")),
        ("target", with_id(&row.target, "target")),
        ("error", text(&op["error"])),
        ("created", ms("created_ms")),
        ("updated", ms("updated_ms")),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Value {
        json!({"id": "op1", "kind": "migrate", "vm": "vm1", "host": "h1", "target": "h2",
               "state": "running", "progress": {"percent": 42, "message": "copying memory"},
               "error": null, "created_ms": 1_000, "updated_ms": 1_700_000_000_000u64})
    }

    #[test]
    fn progress_reads_as_one_line() {
        assert_eq!(status_line(&op()), "migrate running  42%  copying memory");
        let mut failed = op();
        failed["state"] = json!("failed");
        failed["error"] = json!("target host went away");
        assert!(status_line(&failed).ends_with("error: target host went away"));
    }

    #[test]
    fn operations_name_what_they_move() {
        let row = Row {
            vm: Some("web-1".into()),
            host: Some("hv-1".into()),
            target: Some("hv-2".into()),
        };
        assert_eq!(row.what(), "VM web-1 from hv-1 to hv-2");
        let out = table(&[(op(), row)], 1_700_000_002_000);
        let line = out.lines().nth(1).unwrap_or_default();
        for want in [
            "op1",
            "migrate",
            "running",
            "42%",
            "VM web-1 from hv-1 to hv-2",
            "2s ago",
            "copying memory",
        ] {
            assert!(line.contains(want), "{want} in {line}");
        }
        let drain = Row {
            vm: None,
            host: Some("hv-1".into()),
            target: None,
        };
        assert_eq!(drain.what(), "host hv-1");
    }
}
