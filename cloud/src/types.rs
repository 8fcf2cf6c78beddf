//! The instance-type table: type, vCPUs, memory and the on-demand price per
//! region. The table ships as `instance-types.toml` (compiled in); an
//! operator may point the server at an edited copy.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::money::MicroUsd;

/// The shipped table.
pub const SHIPPED: &str = include_str!("../instance-types.toml");

/// One instance type in one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceType {
    /// The type's name (e.g. `t3.micro`).
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// On-demand price per hour in this region.
    pub per_hour: MicroUsd,
}

/// The whole table, every region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTypes {
    rows: Vec<Row>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    name: String,
    vcpus: u32,
    memory_mib: u64,
    prices: BTreeMap<String, MicroUsd>,
}

/// The table is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypesError {
    /// Not TOML of the expected shape.
    #[error("instance-type table: {0}")]
    Parse(String),
    /// A row is wrong.
    #[error("instance-type table, type {name:?}: {what}")]
    Row {
        /// The type.
        name: String,
        /// What is wrong.
        what: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(rename = "type")]
    types: Vec<FileRow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRow {
    name: String,
    vcpus: u32,
    memory_mib: u64,
    price: BTreeMap<String, f64>,
}

impl InstanceTypes {
    /// The table shipped with this build.
    pub fn shipped() -> Self {
        match Self::parse(SHIPPED) {
            Ok(t) => t,
            // A test proves the shipped table parses.
            Err(e) => unreachable!("the shipped instance-type table is valid: {e}"),
        }
    }

    /// Parses a table (`[[type]] name, vcpus, memory_mib, price = { region = $/h }`).
    pub fn parse(text: &str) -> Result<Self, TypesError> {
        let f: File = toml::from_str(text).map_err(|e| TypesError::Parse(e.to_string()))?;
        let mut rows: Vec<Row> = Vec::with_capacity(f.types.len());
        for r in f.types {
            let bad = |what: String| TypesError::Row {
                name: r.name.clone(),
                what,
            };
            if r.name.is_empty()
                || !r
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            {
                return Err(bad("the name must be letters, digits, '.' and '-'".into()));
            }
            if rows.iter().any(|o| o.name == r.name) {
                return Err(bad("listed twice".into()));
            }
            if r.vcpus == 0 || r.memory_mib == 0 {
                return Err(bad("vcpus and memory_mib must be at least 1".into()));
            }
            if r.price.is_empty() {
                return Err(bad("no price for any region".into()));
            }
            let mut prices = BTreeMap::new();
            for (region, p) in r.price {
                let Some(m) = MicroUsd::from_dollars(p) else {
                    return Err(bad(format!("price in {region}: {p} is not a dollar amount >= 0")));
                };
                prices.insert(region, m);
            }
            rows.push(Row {
                name: r.name,
                vcpus: r.vcpus,
                memory_mib: r.memory_mib,
                prices,
            });
        }
        Ok(Self { rows })
    }

    /// Every region some type has a price for.
    pub fn regions(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .rows
            .iter()
            .flat_map(|r| r.prices.keys().map(String::as_str))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The types priced in `region`.
    pub fn in_region(&self, region: &str) -> Vec<InstanceType> {
        self.rows
            .iter()
            .filter_map(|r| {
                r.prices.get(region).map(|p| InstanceType {
                    name: r.name.clone(),
                    vcpus: r.vcpus,
                    memory_mib: r.memory_mib,
                    per_hour: *p,
                })
            })
            .collect()
    }
}

/// The cheapest type with at least `vcpus` and `memory_mib` (ties: fewer
/// vCPUs, then less memory, then the name), among `allowed` when it is not
/// empty.
pub fn smallest_fit<'a>(
    types: &'a [InstanceType],
    vcpus: u32,
    memory_mib: u64,
    allowed: &[String],
) -> Option<&'a InstanceType> {
    types
        .iter()
        .filter(|t| t.vcpus >= vcpus && t.memory_mib >= memory_mib)
        .filter(|t| allowed.is_empty() || allowed.contains(&t.name))
        .min_by(|a, b| {
            (a.per_hour, a.vcpus, a.memory_mib, &a.name).cmp(&(b.per_hour, b.vcpus, b.memory_mib, &b.name))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_parses_and_prices_the_common_regions() {
        let t = InstanceTypes::parse(SHIPPED).unwrap();
        let regions = t.regions();
        for r in ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1"] {
            assert!(regions.contains(&r), "{r} is priced");
            assert!(t.in_region(r).len() >= 10);
        }
        assert_eq!(InstanceTypes::shipped(), t);
    }

    #[test]
    fn the_smallest_fit_is_the_cheapest_that_holds_the_vm() {
        let t = InstanceTypes::shipped().in_region("us-east-1");
        let pick = |c, m| smallest_fit(&t, c, m, &[]).map(|t| t.name.as_str());
        assert_eq!(pick(1, 256), Some("t3.nano"));
        assert_eq!(pick(1, 1024), Some("t3.micro"));
        assert_eq!(pick(2, 3000), Some("t3.medium"));
        assert_eq!(pick(4, 8192), Some("t3.xlarge"));
        assert_eq!(pick(256, 1), None);
        let only = ["m5.large".to_string()];
        assert_eq!(
            smallest_fit(&t, 1, 256, &only).map(|t| t.name.as_str()),
            Some("m5.large")
        );
        assert_eq!(
            smallest_fit(&t, 4, 256, &only),
            None,
            "the limit excludes bigger types"
        );
    }

    #[test]
    fn a_bad_table_names_the_row_and_what_is_wrong() {
        let e = InstanceTypes::parse(
            "[[type]]\nname = \"x\"\nvcpus = 1\nmemory_mib = 1\nprice = { us-east-1 = -1.0 }\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("\"x\"") && e.to_string().contains("us-east-1"),
            "{e}"
        );
        let e =
            InstanceTypes::parse("[[type]]\nname = \"x\"\nvcpus = 0\nmemory_mib = 1\nprice = { a = 1.0 }\n")
                .unwrap_err();
        assert!(e.to_string().contains("vcpus"), "{e}");
        assert!(InstanceTypes::parse("nonsense = [").is_err());
        let twice = "[[type]]\nname = \"x\"\nvcpus = 1\nmemory_mib = 1\nprice = { a = 1.0 }\n";
        let e = InstanceTypes::parse(&format!("{twice}{twice}")).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
