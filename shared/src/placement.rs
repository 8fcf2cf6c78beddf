//! Where a VM lives: on one of the fleet's hosts, in a cloud provider, or
//! nowhere yet (pending, with the reason).

use serde::{Deserialize, Serialize};

use crate::ids::HostId;

/// Where a VM is placed. In JSON: `{"host": "<id>"}`,
/// `{"cloud": {"provider": "aws", "instance": "i-…"}}` or
/// `{"pending": {"reason": "…"}}`.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// On a host of the fleet; its agent runs it.
    Host(HostId),
    /// In a cloud provider, as one instance there.
    Cloud {
        /// The provider's name in the server's config (e.g. `aws`).
        provider: String,
        /// The provider's instance id.
        instance: String,
    },
    /// Not placed yet.
    Pending {
        /// Why not (the scheduler's reasons, a cap that stopped a burst).
        reason: String,
    },
}

impl Placement {
    /// The host it is on, when it is on one.
    pub fn host(&self) -> Option<HostId> {
        match self {
            Self::Host(h) => Some(*h),
            Self::Cloud { .. } | Self::Pending { .. } => None,
        }
    }
}

/// A VM's cloud-burst rule: it may run in the cloud when no host fits.
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurstRule {
    /// Wait this long (ms) for a host before bursting; the server's
    /// `[burst] burst_after` when absent (0: burst as soon as no host fits).
    #[serde(default)]
    pub after_ms: Option<u64>,
    /// Bring it home (start it on a host, then terminate the instance) when
    /// a host fits again. Its disks are not copied back: a VM made from
    /// templates is recreated from them.
    #[serde(default = "yes")]
    pub repatriate: bool,
    /// The instance types it may run as (any type in the table when empty).
    #[serde(default)]
    pub instance_types: Vec<String>,
    /// The key of the image map (`[burst.aws.images]`) to launch it from;
    /// the template of its first disk when absent.
    #[serde(default)]
    pub image: Option<String>,
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_each_kind_in_snake_case() {
        let h = Placement::Host(HostId(7));
        let j = serde_json::to_value(&h).unwrap();
        assert_eq!(j, serde_json::json!({"host": HostId(7).to_string()}));
        let c = Placement::Cloud {
            provider: "aws".into(),
            instance: "i-1".into(),
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"cloud": {"provider": "aws", "instance": "i-1"}})
        );
        let p = Placement::Pending {
            reason: "full".into(),
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"pending": {"reason": "full"}})
        );
        for v in [h, c, p] {
            let back: Placement = serde_json::from_value(serde_json::to_value(&v).unwrap()).unwrap();
            assert_eq!(back, v);
            let bytes = crate::codec::encode(&v).unwrap();
            assert_eq!(crate::codec::decode::<Placement>(&bytes).unwrap(), v);
        }
    }

    #[test]
    fn host_is_only_for_hosts() {
        assert_eq!(Placement::Host(HostId(3)).host(), Some(HostId(3)));
        assert_eq!(
            Placement::Pending {
                reason: String::new()
            }
            .host(),
            None
        );
    }
}
