//! `novacron migrate` and `novacron operations ...`: long-running
//! operations, and waiting for them with a one-line progress status.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use novacron_api::operations::{Operation, OperationAccepted, OperationList, OperationState};
use novacron_api::vms::MigrateVm;

use crate::args::{MigrateArgs, OperationsCommand};
use crate::ctx::{opt, word, Ctx};
use crate::table::{fields, Table};
use crate::units::{ago, enc, now_ms, when};
use crate::CliError;

/// How often `wait` asks for the operation.
const POLL: Duration = Duration::from_millis(500);

/// Runs an `operations` subcommand.
pub async fn run(ctx: &mut Ctx, command: OperationsCommand) -> Result<(), CliError> {
    match command {
        OperationsCommand::List(p) => {
            let v: OperationList = ctx.list(&[], p.limit, p.all).await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            let mut rows = Vec::new();
            for op in v.operations {
                let row = Row::of(ctx, &op).await;
                rows.push((op, row));
            }
            ctx.emit(&table(&rows, now_ms()))
        }
        OperationsCommand::Show { op } => {
            let v: Operation = ctx.get(&format!("/v1/operations/{}", enc(&op))).await?;
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
    let body = MigrateVm {
        host: match &args.to {
            Some(h) => Some(ctx.host_id(h).await?),
            None => None,
        },
    };
    let v: OperationAccepted = ctx.post(&format!("/v1/vms/{id}/migrate"), &body).await?;
    let op_id = v.operation.id.to_string();
    let to = match v.operation.target {
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
    let failed = op.state == OperationState::Failed;
    if ctx.json() {
        ctx.print_json(&op)?;
    } else if !failed {
        let row = Row::of(ctx, &op).await;
        ctx.emit(&format!("operation {op_id} ({}) succeeded\n", row.what()))?;
    }
    if failed {
        return Err(CliError::OperationFailed {
            id: op_id.to_string(),
            error: op.error.unwrap_or_else(|| "no reason given".into()),
        });
    }
    Ok(())
}

/// Polls an operation until it succeeds or fails, showing its progress on
/// stderr: one line rewritten in place on a terminal, a line per change
/// otherwise.
async fn wait(ctx: &Ctx, op_id: &str) -> Result<Operation, CliError> {
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let path = format!("/v1/operations/{}", enc(op_id));
    loop {
        let op: Operation = ctx.get(&path).await?;
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
        if op.state.is_final() {
            if tty {
                eprintln!();
            }
            return Ok(op);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `running  42%  copying memory`.
fn status_line(op: &Operation) -> String {
    let mut s = format!(
        "{} {} {:>3}%",
        word(&op.kind),
        word(&op.state),
        op.progress.percent
    );
    if !op.progress.message.is_empty() {
        s.push_str(&format!("  {}", op.progress.message));
    }
    if let Some(e) = &op.error {
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
    async fn of(ctx: &mut Ctx, op: &Operation) -> Row {
        let vm = match op.vm {
            Some(id) => Some(ctx.vm_label(id).await),
            None => None,
        };
        let host = match op.host {
            Some(id) => Some(ctx.host_label(id).await),
            None => None,
        };
        let target = match op.target {
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

fn table(rows: &[(Operation, Row)], now: u64) -> String {
    let mut t = Table::new(&["ID", "KIND", "STATE", ">PROGRESS", "WHAT", "UPDATED", "MESSAGE"]);
    for (op, row) in rows {
        t.row(vec![
            op.id.to_string(),
            word(&op.kind),
            word(&op.state),
            format!("{}%", op.progress.percent),
            row.what(),
            ago(op.updated_ms, now),
            op.error.clone().unwrap_or_else(|| op.progress.message.clone()),
        ]);
    }
    t.render()
}

fn show(op: &Operation, row: &Row, now: u64) -> String {
    let with_id = |label: &Option<String>, id: Option<String>| match (label, id) {
        (Some(l), Some(id)) if *l != id => format!("{l} ({id})"),
        (_, Some(id)) => id,
        _ => "-".into(),
    };
    fields(&[
        ("id", op.id.to_string()),
        ("kind", word(&op.kind)),
        ("state", word(&op.state)),
        (
            "progress",
            format!("{}% {}", op.progress.percent, op.progress.message)
                .trim_end()
                .to_string(),
        ),
        ("vm", with_id(&row.vm, op.vm.map(|i| i.to_string()))),
        ("host", with_id(&row.host, op.host.map(|i| i.to_string()))),
        ("target", with_id(&row.target, op.target.map(|i| i.to_string()))),
        ("error", opt(op.error.as_deref())),
        ("created", when(op.created_ms, now)),
        ("updated", when(op.updated_ms, now)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: &str = "00000000-0000-0000-0000-0000000000a1";

    fn op() -> Operation {
        serde_json::from_value(serde_json::json!({
            "id": OP, "kind": "migrate",
            "vm": "00000000-0000-0000-0000-0000000000b1",
            "host": "00000000-0000-0000-0000-000000000001",
            "target": "00000000-0000-0000-0000-000000000002",
            "state": "running", "progress": {"percent": 42, "message": "copying memory"},
            "error": null, "actor": "admin", "created_ms": 1_000, "updated_ms": 1_700_000_000_000u64}))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn progress_reads_as_one_line() {
        assert_eq!(status_line(&op()), "migrate running  42%  copying memory");
        let mut failed = op();
        failed.state = OperationState::Failed;
        failed.error = Some("target host went away".into());
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
            OP,
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
