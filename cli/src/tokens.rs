//! `novacron tokens ...` and `novacron audit`.

use novacron_api::audit::AuditList;
use novacron_api::tokens::{ApiTokenList, CreateApiToken, CreatedApiToken, DeletedApiToken};

use crate::args::{PageArgs, TokensCommand};
use crate::ctx::{opt, Ctx};
use crate::table::Table;
use crate::units::{ago, enc, iso, now_ms};
use crate::CliError;

/// Runs a `tokens` subcommand.
pub async fn run(ctx: &mut Ctx, command: TokensCommand) -> Result<(), CliError> {
    match command {
        TokensCommand::Create { name, role } => {
            let body = CreateApiToken {
                name,
                role: role.as_api(),
            };
            let v: CreatedApiToken = ctx.post("/v1/api-tokens", &body).await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            // The secret alone on stdout, so `T=$(novacron tokens create ...)` works.
            eprintln!(
                "created {} token {:?} (id {}); its secret is shown only this once:",
                v.role.as_str(),
                v.name,
                v.id,
            );
            ctx.emit(&format!("{}\n", v.token))
        }
        TokensCommand::List => {
            let v: ApiTokenList = ctx.get("/v1/api-tokens").await?;
            if ctx.json() {
                return ctx.print_json(&v);
            }
            let now = now_ms();
            let mut t = Table::new(&["ID", "NAME", "ROLE", "CREATED"]);
            for tok in &v.tokens {
                t.row(vec![
                    tok.id.clone(),
                    tok.name.clone(),
                    tok.role.as_str().to_string(),
                    ago(tok.created_ms, now),
                ]);
            }
            ctx.emit(&t.render())
        }
        TokensCommand::Delete { id } => {
            let v: DeletedApiToken = ctx.delete(&format!("/v1/api-tokens/{}", enc(&id))).await?;
            ctx.report(&v, || {
                format!(
                    "deleted {} token {:?} ({id}); it is refused from now on",
                    v.deleted.role.as_str(),
                    v.deleted.name
                )
            })
        }
    }
}

/// `novacron audit`: who called what, and how it went.
pub async fn audit(ctx: &mut Ctx, p: PageArgs) -> Result<(), CliError> {
    let v: AuditList = ctx.list(&[], p.limit, p.all).await?;
    if ctx.json() {
        return ctx.print_json(&v);
    }
    let mut t = Table::new(&["AT", "ACTOR", "ROLE", "METHOD", "PATH", ">STATUS"]);
    for e in &v.entries {
        t.row(vec![
            iso(e.at_ms),
            e.actor.clone(),
            e.role.as_str().to_string(),
            e.method.clone(),
            e.path.clone(),
            opt(e.status),
        ]);
    }
    ctx.emit(&t.render())
}
