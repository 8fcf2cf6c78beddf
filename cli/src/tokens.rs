//! `novacron tokens ...` and `novacron audit`.

use serde_json::{json, Value};

use crate::args::{PageArgs, TokensCommand};
use crate::ctx::{text, Ctx};
use crate::table::Table;
use crate::units::{ago, enc, iso, now_ms};
use crate::CliError;

/// Runs a `tokens` subcommand.
pub async fn run(ctx: &mut Ctx, command: TokensCommand) -> Result<(), CliError> {
    match command {
        TokensCommand::Create { name, role } => {
            let v = ctx
                .post("/v1/api-tokens", json!({"name": name, "role": role.as_api()}))
                .await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            let secret = v["token"].as_str().ok_or(CliError::Unexpected("token secret"))?;
            // The secret alone on stdout, so `T=$(novacron tokens create ...)` works.
            eprintln!(
                "created {} token {:?} (id {}); its secret is shown only this once:",
                text(&v["role"]).to_lowercase(),
                text(&v["name"]),
                text(&v["id"]),
            );
            ctx.emit(&format!("{secret}\n"))
        }
        TokensCommand::List => {
            let v = ctx.get("/v1/api-tokens").await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            let tokens = v["tokens"].as_array().ok_or(CliError::Unexpected("token list"))?;
            let now = now_ms();
            let mut t = Table::new(&["ID", "NAME", "ROLE", "CREATED"]);
            for tok in tokens {
                t.row(vec![
                    text(&tok["id"]),
                    text(&tok["name"]),
                    text(&tok["role"]).to_lowercase(),
                    tok["created_ms"]
                        .as_u64()
                        .map(|ms| ago(ms, now))
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            ctx.emit(&t.render())
        }
        TokensCommand::Delete { id } => {
            let v = ctx.delete(&format!("/v1/api-tokens/{}", enc(&id))).await?;
            ctx.report(&v, || {
                let d = &v["deleted"];
                format!(
                    "deleted {} token {:?} ({id}); it is refused from now on",
                    text(&d["role"]).to_lowercase(),
                    text(&d["name"])
                )
            })
        }
    }
}

/// `novacron audit`: who called what, and how it went.
pub async fn audit(ctx: &mut Ctx, p: PageArgs) -> Result<(), CliError> {
    let v = ctx.list(&crate::ctx::AUDIT, &[], p.limit, p.all).await?;
    if ctx.json() {
        return ctx.print_json(&v);
    }
    let entries = v["entries"]
        .as_array()
        .ok_or(CliError::Unexpected("audit entries"))?;
    let mut t = Table::new(&["AT", "ACTOR", "ROLE", "METHOD", "PATH", ">STATUS"]);
    for e in entries {
        t.row(vec![
            e["at_ms"].as_u64().map(iso).unwrap_or_else(|| text(&e["at"])),
            actor(&e["actor"]),
            text(&e["role"]).to_lowercase(),
            text(&e["method"]),
            text(&e["path"]),
            text(&e["status"]),
        ]);
    }
    ctx.emit(&t.render())
}

/// An audit actor: a token's name (and role) when the entry carries an
/// object, else the value as is.
fn actor(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let name = o
                .get("name")
                .or_else(|| o.get("id"))
                .map(text)
                .unwrap_or_else(|| "-".into());
            match o.get("role").and_then(Value::as_str) {
                Some(r) => format!("{name} ({})", r.to_lowercase()),
                None => name,
            }
        }
        other => text(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actors_read_as_names() {
        assert_eq!(actor(&json!("ops-bot")), "ops-bot");
        assert_eq!(
            actor(&json!({"id": "ab", "name": "ci", "role": "viewer"})),
            "ci (viewer)"
        );
        assert_eq!(actor(&json!(null)), "-");
    }
}
