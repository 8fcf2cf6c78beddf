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
