//! The command line (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::units;

/// NovaCron operator CLI: hosts, VMs, migrations, operations, tokens, HA,
/// cloud burst and the live event stream, through the server's API.
#[derive(Parser, Debug)]
#[command(name = "novacron", version)]
pub struct Cli {
    /// The API's URL, https://HOST:PORT (http:// only for a server
    /// configured with [api] plaintext) [default: the api.listen of the
    /// local server config (NOVACRON_SERVER_CONFIG or
    /// /etc/novacron/server.toml), else https://127.0.0.1:7080].
    #[arg(long, env = "NOVACRON_API", global = true, value_name = "URL")]
    pub api: Option<String>,

    /// The CA (PEM) that the API's certificate must chain to; nothing else
    /// is trusted [default: the fleet CA, ca.pem in the local server's data
    /// directory].
    #[arg(long, env = "NOVACRON_CA_FILE", global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// The API token [default: admin.token in the local server's data
    /// directory, if readable].
    #[arg(long, env = "NOVACRON_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,

    /// Read the API token from this file (--token wins when both are given).
    #[arg(long, env = "NOVACRON_TOKEN_FILE", global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Output format: aligned tables for people, or the API's JSON.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns, human sizes and times.
    Table,
    /// The API's JSON, pretty-printed.
    Json,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Hypervisor hosts.
    #[command(visible_alias = "host")]
    Hosts {
        #[command(subcommand)]
        command: HostsCommand,
    },
    /// Drain a host: move its VMs elsewhere (same as `hosts drain`).
    Drain(DrainArgs),
    /// Virtual machines.
    #[command(visible_alias = "vm")]
    Vms {
        #[command(subcommand)]
        command: VmsCommand,
    },
    /// Move a VM to another host.
    Migrate(MigrateArgs),
    /// Long-running operations (migrations, drains).
    #[command(visible_alias = "ops")]
    Operations {
        #[command(subcommand)]
        command: OperationsCommand,
    },
    /// API tokens.
    #[command(visible_alias = "token")]
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Follow the live event stream (VMs, hosts, operations) until Ctrl-C.
    Events(EventsArgs),
    /// The audit log of API calls (newest first).
    Audit(PageArgs),
    /// Live host and VM metrics, busiest first, refreshed until Ctrl-C.
    Top(TopArgs),
    /// One host's or VM's metric series over a time range.
    Metrics(MetricsArgs),
    /// High availability: host leases, VMs of fenced hosts, the
    /// mass-failure guard.
    Ha {
        #[command(subcommand)]
        command: Option<HaCommand>,
    },
    /// Cloud burst: the caps and what is used of them, VMs running in the
    /// cloud with their cost, VMs waiting with the reason, and orphans.
    Burst,
}

/// `ha ...`
#[derive(Subcommand, Debug)]
pub enum HaCommand {
    /// Host leases, VMs restarting, waiting or lost, and whether restarts are held (the default).
    Status,
    /// Leave *held* now: restart the HA VMs of every fenced host. Only when
    /// those hosts are known to be down (or their HA VMs known to be stopped).
    Release,
}

/// `top`
#[derive(Args, Debug)]
pub struct TopArgs {
    /// Time between refreshes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: std::time::Duration,
    /// Print one frame and exit.
    #[arg(long)]
    pub once: bool,
    /// Hosts only.
    #[arg(long)]
    pub no_vms: bool,
    /// Show at most this many VMs (busiest first).
    #[arg(long, default_value_t = 30)]
    pub limit: usize,
}

/// `metrics`
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("owner").required(true).args(["host", "vm"])))]
pub struct MetricsArgs {
    /// A host (id or name).
    #[arg(long)]
    pub host: Option<String>,
    /// A VM (id or name).
    #[arg(long)]
    pub vm: Option<String>,
    /// Comma-separated series (host.cpu,host.memory, vm.cpu, ...); all when absent.
    #[arg(long)]
    pub series: Option<String>,
    /// How far back: a duration (15m, 2h, 7d) or ms since the epoch.
    #[arg(long, default_value = "15m")]
    pub since: String,
    /// auto (raw within the raw window, else 1-minute rollups), raw or 1m.
    #[arg(long, default_value = "auto", value_parser = ["auto", "raw", "1m"])]
    pub resolution: String,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = novacron_shared::duration::parse(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_millis(200) {
        return Err("must be at least 200ms".into());
    }
    Ok(d)
}

/// `hosts ...`
#[derive(Subcommand, Debug)]
pub enum HostsCommand {
    /// List hosts with state, capacity and VM count.
    #[command(visible_alias = "ls")]
    List,
    /// Show one host.
    Show {
        /// Host id or name.
        host: String,
    },
    /// Place no new VMs on a host.
    Cordon {
        /// Host id or name.
        host: String,
    },
    /// Place new VMs on a host again.
    Uncordon {
        /// Host id or name.
        host: String,
    },
    /// Move a host's VMs elsewhere.
    Drain(DrainArgs),
    /// Put a host into maintenance (`on`: never fenced, its VMs never
    /// restarted elsewhere) or take it out (`off`).
    Maintenance {
        /// Host id or name.
        host: String,
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Run the host's hardware fence command now (`[ha.hardware_fence]` in the
    /// server's config; admin): `status` reports its power state, `off`
    /// powers it off.
    Fence {
        /// Host id or name.
        host: String,
        /// status or off.
        #[arg(value_parser = ["status", "off"])]
        action: String,
    },
}

/// `drain H [--wait]`
#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Host id or name.
    pub host: String,
    /// Wait until the drain has finished, showing progress.
    #[arg(long)]
    pub wait: bool,
}

/// `migrate VM [--to H] [--wait]`
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// VM id or name.
    pub vm: String,
    /// The host to move it to (id or name); by default the scheduler picks.
    #[arg(long, value_name = "HOST")]
    pub to: Option<String>,
    /// Wait until the migration has finished, showing progress.
    #[arg(long)]
    pub wait: bool,
}

/// `vms ...`
#[derive(Subcommand, Debug)]
pub enum VmsCommand {
    /// List VMs with their desired and observed state.
    #[command(visible_alias = "ls")]
    List(VmListArgs),
    /// Show one VM.
    Show {
        /// VM id or name.
        vm: String,
    },
    /// Create a VM (placed by the scheduler unless --host is given).
    Create(Box<CreateArgs>),
    /// Delete a VM (its host removes it with its volumes).
    #[command(visible_alias = "rm")]
    Delete {
        /// VM id or name.
        vm: String,
    },
    /// Power a VM on.
    Start {
        /// VM id or name.
        vm: String,
    },
    /// Shut a VM down (ACPI, then power-off after a timeout).
    Stop {
        /// VM id or name.
        vm: String,
    },
    /// Pause a VM in memory.
    Suspend {
        /// VM id or name.
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM id or name.
        vm: String,
    },
    /// Reboot a running VM (ACPI).
    Reboot {
        /// VM id or name.
        vm: String,
    },
    /// A VM's snapshots.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
}

/// `vms list ...`
#[derive(Args, Debug)]
pub struct VmListArgs {
    /// Only VMs on this host (id or name).
    #[arg(long)]
    pub host: Option<String>,
    /// Only VMs whose name starts with this.
    #[arg(long, value_name = "PREFIX")]
    pub name_prefix: Option<String>,
    /// At most this many VMs (per page with --all).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Follow the pages to the end.
    #[arg(long)]
    pub all: bool,
}

/// `vms create ...`
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The request body as the API takes it (`{"spec": {...}, "power",
    /// "placement"}`), from a JSON file (`-` for stdin).
    #[arg(long, short, value_name = "FILE", conflicts_with_all = [
        "name", "vcpus", "memory", "disks", "host", "anti_affinity", "affinity",
        "labels", "require_labels", "stopped", "wait", "burst",
    ])]
    pub file: Option<PathBuf>,
    /// The VM's name (a-z, 0-9, -).
    #[arg(long, required_unless_present = "file")]
    pub name: Option<String>,
    /// Virtual CPUs.
    #[arg(long, required_unless_present = "file")]
    pub vcpus: Option<u32>,
    /// Memory, e.g. 512MiB, 2GiB (binary units; a bare number is MiB).
    #[arg(long, required_unless_present = "file", value_parser = units::parse_mib)]
    pub memory: Option<u64>,
    /// A disk, `SIZE` or `NAME=SIZE` (e.g. 20GiB, data=100G); repeat for
    /// more. Unnamed disks are called root, disk1, disk2, ...
    #[arg(long = "disk", value_name = "[NAME=]SIZE", value_parser = units::parse_disk)]
    pub disks: Vec<units::DiskArg>,
    /// Put it on this host (id or name); the scheduler's filters still apply.
    #[arg(long)]
    pub host: Option<String>,
    /// Never share a host with another VM of this group.
    #[arg(long, value_name = "GROUP")]
    pub anti_affinity: Option<String>,
    /// Prefer hosts running VMs of this group.
    #[arg(long, value_name = "GROUP")]
    pub affinity: Option<String>,
    /// A label on the VM, `key=value`; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = units::parse_label)]
    pub labels: Vec<(String, String)>,
    /// Only hosts carrying this label, `key=value`; repeat for more.
    #[arg(long = "require-label", value_name = "KEY=VALUE", value_parser = units::parse_label)]
    pub require_labels: Vec<(String, String)>,
    /// Define it but leave it shut off.
    #[arg(long)]
    pub stopped: bool,
    /// When no host fits, keep it pending (placed as soon as one fits)
    /// instead of refusing it.
    #[arg(long)]
    pub wait: bool,
    /// It may run in the cloud (the server's `[burst]`) when no host fits;
    /// it waits (pending) until then.
    #[arg(long)]
    pub burst: bool,
    /// The instance types it may run as, comma-separated (e.g.
    /// t3.micro,m5.large) [default: any type in the server's table].
    #[arg(long, value_name = "TYPES", value_delimiter = ',', requires = "burst")]
    pub burst_types: Vec<String>,
    /// The image key (`[burst.aws.images]` in the server's config) to
    /// launch it from [default: its first disk's template].
    #[arg(long, value_name = "KEY", requires = "burst")]
    pub burst_image: Option<String>,
    /// Wait this long for a host before bursting (e.g. 5m; 0s: at once)
    /// [default: the server's `[burst] burst_after`].
    #[arg(long, value_name = "DURATION", value_parser = parse_wait, requires = "burst")]
    pub burst_after: Option<std::time::Duration>,
    /// Keep it in the cloud when a host fits again (by default it is
    /// brought home: started on the host, then the instance terminated).
    #[arg(long, requires = "burst")]
    pub no_repatriate: bool,
}

/// A wait: a duration with its unit (`0s` and up).
fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    novacron_shared::duration::parse(s).map_err(|e| e.to_string())
}

/// `vms snapshot ...`
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot.
    Create {
        /// VM id or name.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
    /// Revert a VM to a snapshot.
    Revert {
        /// VM id or name.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
    /// Delete a snapshot.
    Delete {
        /// VM id or name.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
}

/// `operations ...`
#[derive(Subcommand, Debug)]
pub enum OperationsCommand {
    /// List long-running operations (newest first).
    #[command(visible_alias = "ls")]
    List(PageArgs),
    /// Show one operation.
    Show {
        /// The operation id.
        op: String,
    },
    /// Wait for an operation to finish, showing progress; exits 1 if it failed.
    Wait {
        /// The operation id.
        op: String,
    },
}

/// Paging for lists.
#[derive(Args, Debug)]
pub struct PageArgs {
    /// At most this many entries (per page with --all).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Follow the pages to the end.
    #[arg(long)]
    pub all: bool,
}

/// `tokens ...`
#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Create an API token and print its secret (shown only this once).
    Create {
        /// A name for people (who or what uses it).
        #[arg(long)]
        name: String,
        /// What it may do.
        #[arg(long, value_enum)]
        role: Role,
    },
    /// List API tokens (never their secrets).
    #[command(visible_alias = "ls")]
    List,
    /// Delete an API token; it is refused from then on.
    #[command(visible_alias = "rm")]
    Delete {
        /// The token's id (from `tokens list`).
        id: String,
    },
}

/// An API token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Read only.
    Viewer,
    /// Read, and operate VMs.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// The API's role (as `POST /v1/api-tokens` takes it).
    pub fn as_api(self) -> novacron_api::tokens::Role {
        match self {
            Role::Viewer => novacron_api::tokens::Role::Viewer,
            Role::Operator => novacron_api::tokens::Role::Operator,
            Role::Admin => novacron_api::tokens::Role::Admin,
        }
    }
}

/// `events ...`
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only events about this host (id or name).
    #[arg(long)]
    pub host: Option<String>,
    /// Only events about this VM (id or name).
    #[arg(long)]
    pub vm: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_needs_a_spec_or_a_file_not_both() {
        assert!(Cli::try_parse_from(["novacron", "vms", "create", "--name", "a"]).is_err());
        assert!(Cli::try_parse_from(["novacron", "vms", "create", "-f", "x.json", "--vcpus", "2"]).is_err());
        let ok = Cli::try_parse_from([
            "novacron", "vms", "create", "--name", "a", "--vcpus", "2", "--memory", "1GiB", "--disk", "10G",
            "--disk", "data=1T", "--label", "tier=web",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        assert!(Cli::try_parse_from(["novacron", "vms", "create", "-f", "-"]).is_ok());
    }

    fn create(extra: &[&str]) -> Result<CreateArgs, clap::Error> {
        let mut argv = vec![
            "novacron", "vms", "create", "--name", "a", "--vcpus", "2", "--memory", "1GiB",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Vms {
                command: VmsCommand::Create(a),
            } => Ok(*a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn burst_flags_parse_and_need_burst() {
        let a = create(&[
            "--burst",
            "--burst-types",
            "t3.micro,m5.large",
            "--burst-image",
            "debian-12",
            "--burst-after",
            "5m",
            "--no-repatriate",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(a.burst && a.no_repatriate && !a.wait);
        assert_eq!(a.burst_types, ["t3.micro", "m5.large"]);
        assert_eq!(a.burst_image.as_deref(), Some("debian-12"));
        assert_eq!(a.burst_after, Some(std::time::Duration::from_secs(300)));
        let a = create(&["--burst", "--burst-after", "0s"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.burst_after, Some(std::time::Duration::ZERO));
        assert!(create(&["--wait"]).is_ok_and(|a| a.wait && !a.burst));
        for alone in [
            &["--burst-types", "t3.micro"][..],
            &["--burst-image", "k"],
            &["--burst-after", "5m"],
            &["--no-repatriate"],
        ] {
            assert!(create(alone).is_err(), "{alone:?} without --burst");
        }
        assert!(create(&["--burst", "--burst-after", "5 minutes"]).is_err());
        assert!(
            create(&["--burst", "--burst-after", "5"]).is_err(),
            "a unit is needed"
        );
        assert!(Cli::try_parse_from(["novacron", "vms", "create", "-f", "x.json", "--burst"]).is_err());
        assert!(Cli::try_parse_from(["novacron", "burst"]).is_ok());
    }
}
