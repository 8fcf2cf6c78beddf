//! Hosts: list, show, revoke, cordon, drain, maintenance, the hardware
//! fence on demand, desired VMs and commands.

use hyper::StatusCode;
use novacron_api::hosts::{CommandReply, HostCommand, HostList, PutHostVms};
use novacron_api::operations::OperationAccepted;
use novacron_api::{Empty, ErrorCode};
use novacron_shared::ids::HostId;
use novacron_shared::protocol::CommandKind;

use super::http::{parse_id, read_json, reply, Resp};
use super::{convert, vm_error, Api, ApiError, Call};
use crate::api::routes::Op;
use crate::fleet::{CommandError, DesiredError, RevokeError};

/// Longest a command request waits for the agent's answer.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(50);

/// 404 for a host.
pub(super) fn no_host(id: HostId) -> ApiError {
    ApiError::not_found(format!("no host with id {id}"))
}

/// Handles the host routes.
pub(super) async fn handle(api: &Api, call: Call) -> Result<Resp, ApiError> {
    if call.op == Op::ListHosts {
        let hosts = api.fleet.hosts().map_err(|e| ApiError::internal(&e))?;
        let status = api.fleet.ha_status();
        return reply(
            StatusCode::OK,
            &HostList {
                hosts: hosts.into_iter().map(|h| host_out(api, &status, h)).collect(),
            },
        );
    }
    let id: HostId = parse_id(call.param(0))?;
    match call.op {
        Op::RevokeHost => match api.fleet.revoke(id) {
            Ok(_) => show(api, id),
            Err(RevokeError::UnknownHost(_)) => Err(no_host(id)),
            Err(e) => Err(ApiError::internal(&e)),
        },
        Op::CordonHost | Op::UncordonHost => {
            if !api
                .fleet
                .set_cordon(id, call.op == Op::CordonHost)
                .map_err(|e| ApiError::internal(&e))?
            {
                return Err(no_host(id));
            }
            show(api, id)
        }
        Op::DrainHost => {
            let _: Empty = read_json(call.req).await?;
            if api.fleet.host(id).map_err(|e| ApiError::internal(&e))?.is_none() {
                return Err(no_host(id));
            }
            let op = api.fleet.drain(id, &call.actor).map_err(vm_error)?;
            reply(
                StatusCode::ACCEPTED,
                &OperationAccepted {
                    operation: convert::operation(op),
                },
            )
        }
        Op::SetMaintenance => {
            let body: novacron_api::ha::SetMaintenance = read_json(call.req).await?;
            match api.fleet.set_maintenance(id, body.maintenance) {
                Ok(()) => show(api, id),
                Err(crate::fleet::HaError::UnknownHost(_)) => Err(no_host(id)),
                Err(e) => Err(ApiError::internal(&e)),
            }
        }
        Op::FenceHost => {
            let body: novacron_api::ha::FenceRequest = read_json(call.req).await?;
            fence(api, id, body).await
        }
        Op::GetHostVms => match api.fleet.host_vms(id).map_err(|e| ApiError::internal(&e))? {
            Some(v) => reply(StatusCode::OK, &convert::host_vms(v)),
            None => Err(no_host(id)),
        },
        Op::PutHostVms => {
            let body: PutHostVms = read_json(call.req).await?;
            let vms = body.vms.into_iter().map(convert::vm_request).collect();
            match api.fleet.set_desired(id, vms) {
                Ok(rec) => reply(StatusCode::OK, &convert::desired(rec)),
                Err(DesiredError::UnknownHost(_)) => Err(no_host(id)),
                Err(DesiredError::Invalid(m)) => Err(ApiError::bad_request(ErrorCode::InvalidSpec, m)),
                Err(e) => Err(ApiError::internal(&e)),
            }
        }
        Op::HostCommand => {
            let body: HostCommand = read_json(call.req).await?;
            command(api, id, command_kind(body)?).await
        }
        _ => show(api, id),
    }
}

/// The agent's command for an API command, checked as the schema states.
fn command_kind(c: HostCommand) -> Result<CommandKind, ApiError> {
    use novacron_shared::spec::{check_name, MAX_DISK_MIB, MAX_NAME_LEN};
    let name = |what: &str, s: String, max: usize| {
        check_name(&s, max)
            .map(|()| s)
            .map_err(|m| ApiError::bad_request(ErrorCode::InvalidName, format!("{what} {m}")))
    };
    Ok(match c {
        HostCommand::RefreshInventory => CommandKind::RefreshInventory,
        HostCommand::Reboot { vm } => CommandKind::Reboot { vm },
        HostCommand::SnapshotCreate { vm, name: n } => CommandKind::SnapshotCreate {
            vm,
            name: name("snapshot name", n, MAX_NAME_LEN)?,
        },
        HostCommand::SnapshotRevert { vm, name: n } => CommandKind::SnapshotRevert {
            vm,
            name: name("snapshot name", n, MAX_NAME_LEN)?,
        },
        HostCommand::SnapshotDelete { vm, name: n } => CommandKind::SnapshotDelete {
            vm,
            name: name("snapshot name", n, MAX_NAME_LEN)?,
        },
        HostCommand::ResizeDisk { vm, disk, size_mib } => {
            if size_mib == 0 || size_mib > MAX_DISK_MIB {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidBody,
                    format!("size_mib {size_mib} is outside 1..={MAX_DISK_MIB}"),
                ));
            }
            CommandKind::ResizeDisk {
                vm,
                disk: name("disk name", disk, 32)?,
                size_mib,
            }
        }
    })
}

fn show(api: &Api, id: HostId) -> Result<Resp, ApiError> {
    match api.fleet.host(id).map_err(|e| ApiError::internal(&e))? {
        Some(h) => reply(StatusCode::OK, &host_out(api, &api.fleet.ha_status(), h)),
        None => Err(no_host(id)),
    }
}

/// A host for the API, with its hardware fence and the isolation response.
fn host_out(
    api: &Api,
    status: &crate::fleet::HaStatus,
    h: crate::fleet::HostView,
) -> novacron_api::hosts::Host {
    let id = h.record.id;
    let mut out = convert::host(h);
    out.fence = convert::host_fence(status.fences.get(&id));
    out.isolation = api.fleet.ha_config().isolation;
    out
}

/// Runs the host's hardware fence command (`status` or `off`) now.
async fn fence(api: &Api, id: HostId, body: novacron_api::ha::FenceRequest) -> Result<Resp, ApiError> {
    use crate::ha::fence::{Exit, FenceAction as F, Power};
    use novacron_api::ha::{FenceAction, FenceReply, PowerState};
    let Some(host) = api.fleet.host(id).map_err(|e| ApiError::internal(&e))? else {
        return Err(no_host(id));
    };
    let Some(hw) = api.fleet.ha_config().hardware_fence() else {
        return Err(ApiError::conflict(
            ErrorCode::Conflict,
            "no hardware fence is configured ([ha.fence] command in the server's config)",
        ));
    };
    let action = match body.action {
        FenceAction::Status => F::Status,
        FenceAction::Off => F::Off,
    };
    let cmd = hw.command();
    let name = host.record.name.clone();
    tracing::warn!(host = %id, name = %name, action = action.as_str(), "hardware fence run on demand");
    let ran = crate::ha::fence::run(&cmd.argv_for(&name, action), cmd.timeout).await;
    api.fleet.bus.ha(
        Some(id),
        None,
        format!(
            "hardware fence of host {name} run on demand: {} → {}",
            action.as_str(),
            ran.describe()
        ),
    );
    let exit_code = match ran.exit {
        Exit::Code(c) => Some(c),
        _ => None,
    };
    reply(
        StatusCode::OK,
        &FenceReply {
            action: body.action,
            exit_code,
            timed_out: ran.exit == Exit::TimedOut,
            power: (action == F::Status).then(|| match Power::of(&ran) {
                Power::On => PowerState::On,
                Power::Off => PowerState::Off,
                Power::Unknown => PowerState::Unknown,
            }),
            done: (action == F::Off).then_some(exit_code == Some(0)),
            output: match &ran.exit {
                Exit::Error(e) if ran.output.is_empty() => e.clone(),
                _ => ran.output,
            },
        },
    )
}

/// Runs a command on a host's agent and answers with its outcome.
pub(super) async fn command(api: &Api, host: HostId, kind: CommandKind) -> Result<Resp, ApiError> {
    match api.fleet.command(host, kind, COMMAND_TIMEOUT).await {
        Ok((op_id, outcome)) => reply(StatusCode::OK, &CommandReply { op_id, outcome }),
        Err(e @ CommandError::NotConnected(_)) => {
            Err(ApiError::conflict(ErrorCode::NotConnected, e.to_string()))
        }
        Err(e @ CommandError::NoLease(_)) => Err(ApiError::conflict(ErrorCode::Conflict, e.to_string())),
        Err(e @ CommandError::Timeout { .. }) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Timeout,
            e.to_string(),
        )),
    }
}
