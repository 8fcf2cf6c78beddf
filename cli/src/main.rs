//! `novacron`: the operator CLI. It talks to the server's HTTP JSON API
//! only (through `novacron_api::client`, replies read into the API's
//! types), prints tables for people and
//! the API's JSON for scripts (`-o json`).
//!
//! Exit codes: 0 done, 1 the API refused or an operation failed, 2 usage
//! errors (bad arguments, no token), 3 the server could not be reached.

#![forbid(unsafe_code)]

mod args;
mod burst;
mod ctx;
mod events;
mod ha;
mod hosts;
mod local;
mod metrics;
mod ops;
mod table;
mod tokens;
mod units;
mod vms;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use local::LocalServer;
use novacron_api::client::{ApiClient, ApiUrl, CaError, ClientError, TrustedCa};

use args::{Cli, Command, HostsCommand};
use ctx::Ctx;

/// Everything that can end a command early.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API call failed (unreachable, refused, odd reply).
    #[error(transparent)]
    Api(#[from] ClientError),
    /// No VM has this id or name.
    #[error("no VM with id or name {0:?}")]
    NoVm(String),
    /// No host has this id or name.
    #[error("no host with id or name {0:?}")]
    NoHost(String),
    /// More than one host carries this name.
    #[error("{} hosts are named {name:?} ({}); give the id instead", ids.len(), ids.join(", "))]
    AmbiguousHost {
        /// The name.
        name: String,
        /// The hosts that carry it.
        ids: Vec<String>,
    },
    /// The token file could not be read.
    #[error("cannot read the token file {path}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No token was given and the default one is not readable.
    #[error(
        "no API token: pass --token, --token-file or NOVACRON_TOKEN (the default, {path}, is not readable)"
    )]
    NoToken {
        /// The default token file.
        path: String,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The CA to verify the API with is unusable.
    #[error(transparent)]
    Ca(#[from] novacron_api::client::CaError),
    /// The VM spec file could not be read.
    #[error("cannot read {path}")]
    SpecFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM spec file is not JSON.
    #[error("{path} is not valid JSON")]
    SpecJson {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A long-running operation ended in failure.
    #[error("operation {id} failed: {error}")]
    OperationFailed {
        /// The operation.
        id: String,
        /// The server's account of why.
        error: String,
    },
    /// A command on a host's agent (reboot, snapshot) failed.
    #[error("{what} failed: {message}")]
    CommandFailed {
        /// What was asked.
        what: String,
        /// The agent's message.
        message: String,
    },
    /// A reply lacked a field the API promises.
    #[error("unexpected reply from the API: no {0}")]
    Unexpected(&'static str),
    /// Writing the output failed.
    #[error("cannot write the output")]
    Stdout(#[source] std::io::Error),
    /// The arguments do not make sense together.
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// The process exit code for this error.
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Api(e) if e.is_unreachable() => 3,
            CliError::Api(ClientError::Body(_)) => 3,
            CliError::Api(ClientError::InvalidUrl { .. }) => 2,
            CliError::Api(ClientError::NoCa { .. }) => 2,
            CliError::TokenFile { .. }
            | CliError::NoToken { .. }
            | CliError::Ca(_)
            | CliError::SpecFile { .. }
            | CliError::SpecJson { .. }
            | CliError::Usage(_) => 2,
            _ => 1,
        }
    }

    /// The error on one line: the message, then the innermost cause.
    fn one_line(&self) -> String {
        let mut root: Option<&dyn std::error::Error> = None;
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            root = Some(e);
            cur = e.source();
        }
        match root {
            Some(r) => format!("{self}: {r}"),
            None => self.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("novacron: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`novacron events | head`) is not an error.
        Err(CliError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("novacron: error: {}", e.one_line());
            ExitCode::from(e.exit_code())
        }
    }
}

fn client(cli: &Cli) -> Result<ApiClient, CliError> {
    let needs_local =
        cli.api.is_none() || (cli.token.is_none() && cli.token_file.is_none()) || cli.ca_file.is_none();
    let local = if needs_local {
        LocalServer::find()
    } else {
        LocalServer::default()
    };
    let base: ApiUrl = match &cli.api {
        Some(url) => url.parse()?,
        None if local.api.plaintext => ApiUrl::plain(local.api_addr()),
        None => local.api_addr().into(),
    };
    let read = |path: &PathBuf| std::fs::read_to_string(path).map(|t| t.trim().to_string());
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => read(path).map_err(|source| CliError::TokenFile {
            path: path.display().to_string(),
            source,
        })?,
        (None, None) => {
            let path = local.admin_token();
            read(&path).map_err(|source| CliError::NoToken {
                path: path.display().to_string(),
                source,
            })?
        }
    };
    let ca = match (&cli.ca_file, base.is_https()) {
        (_, false) => None,
        (Some(path), true) => Some(TrustedCa::from_file(path)?),
        (None, true) => {
            // The local server's fleet CA (plus the operator's API chain).
            let extra: Vec<&std::path::Path> = local.api.cert_file.iter().map(|p| p.as_path()).collect();
            Some(
                TrustedCa::from_files(&local.ca_file(), &extra).map_err(|e| CaError {
                    reason: format!(
                        "{}; pass --ca-file (or NOVACRON_CA_FILE) with the CA of the API's certificate",
                        e.reason
                    ),
                    ..e
                })?,
            )
        }
    };
    let api = ApiClient::new(base, Some(token));
    Ok(match &ca {
        Some(ca) => api.with_ca(ca),
        None => api,
    })
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let mut ctx = Ctx::new(client(&cli)?, cli.output);
    match cli.command {
        Command::Hosts { command } => hosts::run(&mut ctx, command).await,
        Command::Drain(a) => hosts::run(&mut ctx, HostsCommand::Drain(a)).await,
        Command::Vms { command } => vms::run(&mut ctx, command).await,
        Command::Migrate(a) => ops::migrate(&mut ctx, a).await,
        Command::Operations { command } => ops::run(&mut ctx, command).await,
        Command::Tokens { command } => tokens::run(&mut ctx, command).await,
        Command::Audit(a) => tokens::audit(&mut ctx, a).await,
        Command::Events(a) => events::run(&mut ctx, a).await,
        Command::Top(a) => metrics::top(&mut ctx, a).await,
        Command::Metrics(a) => metrics::metrics(&mut ctx, a).await,
        Command::Ha { command } => ha::run(&mut ctx, command.unwrap_or(args::HaCommand::Status)).await,
        Command::Burst => burst::run(&mut ctx).await,
    }
}
