//! Bearer secrets (join and API tokens): made random, stored only as hashes.

/// A fresh token: a prefix naming its kind and 32 random bytes in hex.
pub fn new_token(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}_{hex}")
}

/// The hash under which a token is stored and looked up.
pub fn hash(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_and_hash_stably() {
        let a = new_token("ncj");
        let b = new_token("ncj");
        assert_ne!(a, b);
        assert!(a.starts_with("ncj_") && a.len() == 68);
        assert_eq!(hash(&a), hash(&format!(" {a}\n")));
        assert_ne!(hash(&a), hash(&b));
    }
}
