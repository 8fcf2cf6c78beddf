//! The cloud-init NoCloud seed: an ISO 9660 image labelled `cidata` holding
//! `meta-data` and `user-data`, made with `genisoimage` (or `xorriso`'s
//! compatible mode), as virt-install and cloud-localds do.

use std::path::{Path, PathBuf};
use std::process::Command;

use novacron_shared::ids::VmId;
use novacron_shared::spec::CloudInit;

/// The `meta-data` document. JSON is valid YAML, and serde_json escapes
/// every value, so no key can inject a field.
pub fn meta_data(name: &str, id: VmId, ci: &CloudInit) -> String {
    let doc = serde_json::json!({
        "instance-id": id.to_string(),
        "local-hostname": name,
        "public-keys": ci.ssh_authorized_keys,
    });
    format!("{doc}\n")
}

/// The `user-data` document: the user's, or an empty cloud-config.
pub fn user_data(ci: &CloudInit) -> String {
    ci.user_data
        .clone()
        .unwrap_or_else(|| "#cloud-config\n{}\n".into())
}

fn tool() -> Result<(PathBuf, Vec<&'static str>), String> {
    for (bin, args) in [
        ("genisoimage", vec![]),
        ("mkisofs", vec![]),
        ("xorriso", vec!["-as", "genisoimage"]),
    ] {
        for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
            let p = Path::new(dir).join(bin);
            if p.exists() {
                return Ok((p, args));
            }
        }
    }
    Err("making a cloud-init seed needs genisoimage (or xorriso); install the genisoimage package".into())
}

/// Builds the seed image in memory.
pub fn build_iso(name: &str, id: VmId, ci: &CloudInit) -> Result<Vec<u8>, String> {
    let (bin, pre) = tool()?;
    let dir = std::env::temp_dir().join(format!("novacron-seed-{}-{}", std::process::id(), VmId::random()));
    let result = (|| {
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::write(dir.join("meta-data"), meta_data(name, id, ci)).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("user-data"), user_data(ci)).map_err(|e| e.to_string())?;
        let out = dir.join("seed.iso");
        let o = Command::new(&bin)
            .args(&pre)
            .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(&out)
            .arg(dir.join("user-data"))
            .arg(dir.join("meta-data"))
            .output()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        if !o.status.success() {
            return Err(format!(
                "{} failed: {}",
                bin.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        std::fs::read(&out).map_err(|e| e.to_string())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_data_escapes_everything() {
        let ci = CloudInit {
            user_data: None,
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA \"x\"\ninstance-id: evil".into()],
        };
        let m = meta_data("web-1", VmId(1), &ci);
        let v: serde_json::Value = serde_json::from_str(&m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["local-hostname"], "web-1");
        assert_eq!(v["instance-id"], "00000000-0000-0000-0000-000000000001");
        assert_eq!(m.lines().count(), 1, "{m}");
    }

    #[test]
    fn the_seed_is_an_iso_labelled_cidata_with_both_files() {
        let ci = CloudInit {
            user_data: Some("#cloud-config\nruncmd: [\"echo <hi> & 'bye'\"]\n".into()),
            ssh_authorized_keys: vec![],
        };
        let iso = build_iso("web-1", VmId(2), &ci).unwrap_or_else(|e| panic!("{e}"));
        // ISO 9660: the primary volume descriptor at 32 KiB, volume id at +40.
        assert_eq!(&iso[0x8001..0x8006], b"CD001");
        assert_eq!(&iso[0x8028..0x802e], b"cidata");
        let hay = String::from_utf8_lossy(&iso);
        assert!(
            hay.contains("runcmd: [\"echo <hi> & 'bye'\"]"),
            "user data stored verbatim"
        );
        assert!(hay.contains("\"local-hostname\":\"web-1\""));
    }
}
