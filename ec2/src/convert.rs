//! Conversions between EC2's shapes and `novacron-cloud`'s: instances,
//! states and tags out of DescribeInstances/RunInstances answers, tags and
//! base64 user data into requests.
//!
//! Answers come from the network: a field EC2 left out becomes an empty
//! string or `None`, never a panic, and an instance without an id is left
//! out (the broker cannot name it).

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{self as ec2, InstanceStateName};
use novacron_cloud::{Instance, InstanceState};

/// One EC2 instance as the provider interface's [`Instance`]; `None` when
/// the answer gave no instance id.
pub fn instance(i: &ec2::Instance) -> Option<Instance> {
    let id = i.instance_id().filter(|s| !s.is_empty())?;
    Some(Instance {
        id: id.to_owned(),
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        image: i.image_id().unwrap_or_default().to_owned(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map_or_else(|| InstanceState::Other("unknown".into()), state),
        private_ip: i.private_ip_address().map(str::to_owned),
        public_ip: i.public_ip_address().map(str::to_owned),
        launched_ms: i
            .launch_time()
            .and_then(|t| t.to_millis().ok())
            .and_then(|ms| u64::try_from(ms).ok()),
        tags: tags(i.tags()),
    })
}

/// EC2's instance state name as an [`InstanceState`].
pub fn state(s: &InstanceStateName) -> InstanceState {
    match s {
        InstanceStateName::Pending => InstanceState::Pending,
        InstanceStateName::Running => InstanceState::Running,
        InstanceStateName::Stopping => InstanceState::Stopping,
        InstanceStateName::Stopped => InstanceState::Stopped,
        InstanceStateName::ShuttingDown => InstanceState::ShuttingDown,
        InstanceStateName::Terminated => InstanceState::Terminated,
        other => InstanceState::Other(other.as_str().to_owned()),
    }
}

/// EC2 tags as a map (a tag without a key is dropped; one without a value
/// has the empty value).
pub fn tags(t: &[ec2::Tag]) -> BTreeMap<String, String> {
    t.iter()
        .filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or_default().to_owned())))
        .collect()
}

/// A map as EC2 tags.
pub fn to_tags(t: &BTreeMap<String, String>) -> Vec<ec2::Tag> {
    t.iter()
        .map(|(k, v)| ec2::Tag::builder().key(k).value(v).build())
        .collect()
}

/// Standard base64 (RFC 4648, with padding): how EC2 takes user data.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded, "{plain:?}");
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xfe]), "+//+");
    }

    #[test]
    fn an_instance_without_an_id_is_left_out_and_missing_fields_do_not_panic() {
        assert_eq!(instance(&ec2::Instance::builder().build()), None);
        let i = instance(&ec2::Instance::builder().instance_id("i-1").build()).unwrap();
        assert_eq!(i.id, "i-1");
        assert_eq!(i.state, InstanceState::Other("unknown".into()));
        assert!(i.tags.is_empty() && i.instance_type.is_empty() && i.launched_ms.is_none());
    }

    #[test]
    fn fields_states_and_tags_are_carried_over() {
        let sdk = ec2::Instance::builder()
            .instance_id("i-2")
            .instance_type(ec2::InstanceType::T3Micro)
            .image_id("ami-1")
            .state(
                ec2::InstanceState::builder()
                    .name(InstanceStateName::Stopped)
                    .build(),
            )
            .private_ip_address("10.0.0.5")
            .launch_time(aws_sdk_ec2::primitives::DateTime::from_millis(1_700_000_000_123))
            .tags(ec2::Tag::builder().key("novacron:vm-id").value("vm-7").build())
            .tags(ec2::Tag::builder().value("no key").build())
            .build();
        let i = instance(&sdk).unwrap();
        assert_eq!(
            (i.instance_type.as_str(), i.image.as_str(), &i.state),
            ("t3.micro", "ami-1", &InstanceState::Stopped)
        );
        assert_eq!(i.private_ip.as_deref(), Some("10.0.0.5"));
        assert_eq!(i.launched_ms, Some(1_700_000_000_123));
        assert_eq!(i.tags, BTreeMap::from([("novacron:vm-id".into(), "vm-7".into())]));
        assert_eq!(tags(&to_tags(&i.tags)), i.tags);
        assert_eq!(
            state(&InstanceStateName::from("hibernating")),
            InstanceState::Other("hibernating".into())
        );
    }
}
