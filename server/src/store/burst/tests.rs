use novacron_cloud::MicroUsd;
use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::placement::Placement;
use novacron_shared::spec::{DesiredVm, Power, VmSpec};

use super::*;
use crate::store::PlacementRules;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("db.redb")).unwrap();
    (dir, s)
}

fn vm(id: u128, placement: Placement) -> VmRecord {
    VmRecord {
        vm: DesiredVm {
            id: VmId(id),
            op_id: OpId(id),
            spec: VmSpec::minimal(&format!("v{id}"), 1, 512),
            power: Power::Running,
            epoch: 0,
        },
        placement,
        rules: PlacementRules::default(),
        created_ms: 1,
    }
}

fn pending() -> Placement {
    Placement::Pending {
        reason: "no host fits".into(),
    }
}

fn rec(id: u128, launch: &str) -> CloudRecord {
    CloudRecord {
        vm: VmId(id),
        provider: "aws".into(),
        launch_id: launch.into(),
        state: CloudState::Launching,
        instance: None,
        instance_type: "t3.micro".into(),
        per_hour: MicroUsd(10_400),
        image: "ami-1".into(),
        decided_ms: 10,
        reasons: "no host fits".into(),
        accrued: MicroUsd(0),
        billed_until_ms: None,
        run_started_ms: None,
        attempts: 0,
        last_error: None,
        retry_at_ms: None,
        step_started_ms: 10,
        repatriation: None,
        deleted: false,
    }
}

#[test]
fn a_claim_needs_a_pending_vm_without_a_launch_and_is_stored_before_the_launch() {
    let (_d, s) = store();
    assert_eq!(
        s.cloud_claim(&rec(1, "L1"), "x".into()).unwrap(),
        Err(CloudRefusal::NoVm)
    );
    s.put_vm(&vm(1, Placement::Host(HostId(3)))).unwrap().unwrap();
    assert!(matches!(
        s.cloud_claim(&rec(1, "L1"), "x".into()).unwrap(),
        Err(CloudRefusal::NotPending(_))
    ));
    s.put_vm(&vm(2, pending())).unwrap().unwrap();
    s.cloud_claim(&rec(2, "L2"), "launching".into()).unwrap().unwrap();
    assert_eq!(
        s.cloud_claim(&rec(2, "L3"), "again".into()).unwrap(),
        Err(CloudRefusal::AlreadyBursting("L2".into())),
        "one launch per VM"
    );
    assert_eq!(s.cloud_record(VmId(2)).unwrap().unwrap().launch_id, "L2");
    assert_eq!(
        s.vm(VmId(2)).unwrap().unwrap().placement,
        Placement::Pending {
            reason: "launching".into()
        }
    );
}

#[test]
fn a_launch_answered_places_the_vm_in_the_cloud_and_spend_adds_up_by_month() {
    let (_d, s) = store();
    s.put_vm(&vm(1, pending())).unwrap().unwrap();
    let claimed = rec(1, "L1");
    s.cloud_claim(&claimed, "launching".into()).unwrap().unwrap();
    let mut r = claimed.clone();
    r.state = CloudState::Running;
    let cloud = Placement::Cloud {
        provider: "aws".into(),
        instance: "i-1".into(),
    };
    let spend = Spend {
        month: 202612,
        amount: MicroUsd(500),
    };
    assert_eq!(
        s.cloud_update(&claimed, &r, Some(spend), Some(cloud.clone()))
            .unwrap(),
        Ok(None)
    );
    assert_eq!(
        s.cloud_update(&claimed, &r, Some(spend), None).unwrap(),
        Err(CloudRefusal::Changed),
        "a stale copy cannot overwrite the record"
    );
    s.cloud_update(&r, &r, Some(spend), None).unwrap().unwrap();
    assert_eq!(s.vm(VmId(1)).unwrap().unwrap().placement, cloud);
    assert_eq!(s.burst_spend(202612).unwrap(), MicroUsd(1000));
    assert_eq!(s.burst_spend(202611).unwrap(), MicroUsd(0));
    assert_eq!(
        s.cloud_update(&rec(2, "L9"), &rec(2, "L9"), None, None).unwrap(),
        Err(CloudRefusal::NoRecord)
    );
}

#[test]
fn a_move_home_puts_the_vm_on_its_host_and_a_forget_can_send_it_back_to_pending() {
    let (_d, s) = store();
    s.put_vm(&vm(1, pending())).unwrap().unwrap();
    let r = rec(1, "L1");
    s.cloud_claim(&r, "launching".into()).unwrap().unwrap();
    let (h, d) = s
        .cloud_update(&r, &r, None, Some(Placement::Host(HostId(4))))
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(h, HostId(4));
    assert_eq!(d.vms.len(), 1, "the host's desired state lists it");
    let left = s
        .cloud_forget(&r, None, Some("instance vanished".into()))
        .unwrap()
        .unwrap();
    assert_eq!(left, Some(HostId(4)));
    assert!(s.desired(HostId(4)).unwrap().unwrap().vms.is_empty());
    assert!(s.cloud_record(VmId(1)).unwrap().is_none());
}

#[test]
fn deleting_a_burst_vm_keeps_its_record_to_terminate_the_instance() {
    let (_d, s) = store();
    s.put_vm(&vm(1, pending())).unwrap().unwrap();
    let claimed = rec(1, "L1");
    s.cloud_claim(&claimed, "launching".into()).unwrap().unwrap();
    s.delete_vm(VmId(1)).unwrap().unwrap();
    let r = s.cloud_record(VmId(1)).unwrap().unwrap();
    assert!(r.deleted);
    assert_eq!(r.state, CloudState::Terminating);
    assert_eq!(
        s.cloud_update(&claimed, &claimed, None, None).unwrap(),
        Err(CloudRefusal::Changed),
        "the broker's copy from before the delete cannot undo it"
    );
    s.cloud_forget(&r, None, None).unwrap().unwrap();
    assert!(s.cloud_records().unwrap().is_empty());
}

#[test]
fn a_waiting_vm_is_placed_only_while_it_is_pending_without_a_launch() {
    let (_d, s) = store();
    s.put_vm(&vm(1, pending())).unwrap().unwrap();
    let (v, d) = s.place_pending(VmId(1), HostId(2), OpId(9)).unwrap().unwrap();
    assert_eq!(v.placement, Placement::Host(HostId(2)));
    assert_eq!(d.vms[0].op_id, OpId(9));
    assert!(matches!(
        s.place_pending(VmId(1), HostId(3), OpId(10)).unwrap(),
        Err(CloudRefusal::NotPending(_))
    ));
    s.put_vm(&vm(2, pending())).unwrap().unwrap();
    s.cloud_claim(&rec(2, "L2"), "launching".into()).unwrap().unwrap();
    assert!(matches!(
        s.place_pending(VmId(2), HostId(3), OpId(11)).unwrap(),
        Err(CloudRefusal::NotPending(_)) | Err(CloudRefusal::AlreadyBursting(_))
    ));
    s.delete_vm(VmId(1)).unwrap();
    assert_eq!(
        s.place_pending(VmId(1), HostId(2), OpId(12)).unwrap(),
        Err(CloudRefusal::NoVm)
    );
}

#[test]
fn a_power_change_keeps_a_placement_made_since_the_vm_was_read() {
    let (_d, s) = store();
    s.put_vm(&vm(1, pending())).unwrap().unwrap();
    // Read as pending, then placed by someone else, then powered off.
    let (_, before) = s.place_pending(VmId(1), HostId(2), OpId(9)).unwrap().unwrap();
    let (v, desired) = s
        .set_vm_power(VmId(1), Power::Stopped, OpId(10))
        .unwrap()
        .unwrap();
    assert_eq!(v.placement, Placement::Host(HostId(2)));
    assert_eq!(v.vm.power, Power::Stopped);
    let d = desired.unwrap();
    assert!(
        d.generation > before.generation,
        "the host's desired state changed"
    );
    assert_eq!(d.vms[0].power, Power::Stopped);
    assert!(s
        .set_vm_power(VmId(7), Power::Stopped, OpId(11))
        .unwrap()
        .is_none());
}
