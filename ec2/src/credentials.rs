//! AWS credentials: where they come from, and keeping them out of every log,
//! error message and `Debug`.
//!
//! This module owns [`Credentials`] (static keys, `Debug` redacted by hand),
//! [`CredentialSource`] (static, or the standard AWS environment variables
//! and shared files) and [`resolve`], a pure function over an environment
//! lookup and a file reader, so the standard chain is unit-tested without
//! touching the process environment or the disk. It does not talk to AWS:
//! no instance metadata, SSO, `credential_process` or role assumption (a
//! profile that only uses those is refused with a message saying so).
//!
//! The standard chain, in order:
//! 1. `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (with
//!    `AWS_SESSION_TOKEN` when set);
//! 2. the profile (the one given, else `AWS_PROFILE`, else `default`) from
//!    the credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
//!    `~/.aws/credentials`, section `[name]`), then from the config file
//!    (`AWS_CONFIG_FILE`, else `~/.aws/config`, section `[profile name]`, or
//!    `[default]`), key by key, the credentials file first.
//!
//! No error message here contains a key's value: only the names of
//! variables, files, sections and keys.

use std::path::{Path, PathBuf};

/// Static AWS keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id (`AKIA…`, `ASIA…`); not a secret, shown in `Debug`.
    pub access_key_id: String,
    /// The secret access key; never shown.
    pub secret_access_key: String,
    /// The session token of temporary credentials; never shown.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Where the driver takes its credentials from.
#[derive(Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// Keys given in the server's config.
    Static(Credentials),
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, then
    /// the shared files (AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials
    /// `[name]`; AWS_CONFIG_FILE or ~/.aws/config `[profile name]`) for
    /// the given profile, else AWS_PROFILE, else `default`.
    Standard {
        /// The profile to read (else `AWS_PROFILE`, else `default`).
        profile: Option<String>,
    },
}

impl std::fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static(c) => f.debug_tuple("Static").field(c).finish(),
            Self::Standard { profile } => f.debug_struct("Standard").field("profile", profile).finish(),
        }
    }
}

/// The credentials could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// One of the two key variables is set without the other.
    #[error("{set} is set but {missing} is not: set both, or neither to use the shared files")]
    EnvIncomplete {
        /// The variable that is set.
        set: &'static str,
        /// The one that is missing.
        missing: &'static str,
    },
    /// A shared file exists but could not be read.
    #[error("cannot read the AWS {what} file {}", path.display())]
    ReadFile {
        /// `credentials` or `config`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The profile has one key without the other.
    #[error("AWS profile {profile:?} has {set} but no {missing} (in {files})")]
    ProfileIncomplete {
        /// The profile.
        profile: String,
        /// The key that is there.
        set: &'static str,
        /// The key that is missing.
        missing: &'static str,
        /// The files that were read.
        files: String,
    },
    /// The profile exists but gets its credentials some other way.
    #[error(
        "AWS profile {profile:?} uses {how}, which NovaCron does not support: give it \
         aws_access_key_id and aws_secret_access_key, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )]
    Unsupported {
        /// The profile.
        profile: String,
        /// The key that names the other way (`role_arn`, `sso_session`, …).
        how: String,
    },
    /// Nothing was found anywhere.
    #[error(
        "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or put \
         aws_access_key_id and aws_secret_access_key under [{profile}] in {credentials_file} \
         or under [{config_section}] in {config_file} (the profile is the config's, else \
         AWS_PROFILE, else default), or give static credentials in the server's config"
    )]
    NotFound {
        /// The profile looked for.
        profile: String,
        /// The credentials file looked in.
        credentials_file: String,
        /// The config file looked in.
        config_file: String,
        /// The config file's section for the profile.
        config_section: String,
    },
}

/// Resolves `source` to keys. `env` looks a variable up (`None` when unset
/// or empty); `read` reads a file (`Ok(None)` when it does not exist).
pub fn resolve(
    source: &CredentialSource,
    env: &dyn Fn(&str) -> Option<String>,
    read: &dyn Fn(&Path) -> std::io::Result<Option<String>>,
) -> Result<Credentials, CredentialsError> {
    let profile = match source {
        CredentialSource::Static(c) => return Ok(c.clone()),
        CredentialSource::Standard { profile } => profile.clone(),
    };
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(access_key_id), Some(secret_access_key)) => {
            return Ok(Credentials {
                access_key_id,
                secret_access_key,
                session_token: env("AWS_SESSION_TOKEN"),
            })
        }
        (Some(_), None) => {
            return Err(CredentialsError::EnvIncomplete {
                set: "AWS_ACCESS_KEY_ID",
                missing: "AWS_SECRET_ACCESS_KEY",
            })
        }
        (None, Some(_)) => {
            return Err(CredentialsError::EnvIncomplete {
                set: "AWS_SECRET_ACCESS_KEY",
                missing: "AWS_ACCESS_KEY_ID",
            })
        }
        (None, None) => {}
    }
    let profile = profile
        .filter(|p| !p.is_empty())
        .or_else(|| env("AWS_PROFILE"))
        .unwrap_or_else(|| "default".to_owned());
    let home = env("HOME").unwrap_or_default();
    let file = |var: &str, name: &str| {
        env(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&home).join(".aws").join(name))
    };
    let cred_path = file("AWS_SHARED_CREDENTIALS_FILE", "credentials");
    let config_path = file("AWS_CONFIG_FILE", "config");
    let config_section = if profile == "default" {
        "default".to_owned()
    } else {
        format!("profile {profile}")
    };
    let load = |what: &'static str, path: &Path, section: &str| {
        read(path)
            .map(|text| text.map(|t| section_keys(&t, section)).unwrap_or_default())
            .map_err(|source| CredentialsError::ReadFile {
                what,
                path: path.to_owned(),
                source,
            })
    };
    let from_cred = load("credentials", &cred_path, &profile)?;
    let from_config = load("config", &config_path, &config_section)?;
    let get = |key: &str| {
        [&from_cred, &from_config]
            .into_iter()
            .find_map(|keys| keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()))
            .filter(|v| !v.is_empty())
    };
    let files = || format!("{} and {}", cred_path.display(), config_path.display());
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            session_token: get("aws_session_token"),
        }),
        (Some(_), None) => Err(CredentialsError::ProfileIncomplete {
            profile,
            set: "aws_access_key_id",
            missing: "aws_secret_access_key",
            files: files(),
        }),
        (None, Some(_)) => Err(CredentialsError::ProfileIncomplete {
            profile,
            set: "aws_secret_access_key",
            missing: "aws_access_key_id",
            files: files(),
        }),
        (None, None) => {
            const OTHER_WAYS: [&str; 6] = [
                "role_arn",
                "sso_session",
                "sso_start_url",
                "credential_process",
                "credential_source",
                "web_identity_token_file",
            ];
            if let Some(how) = OTHER_WAYS.iter().find(|k| get(k).is_some()) {
                return Err(CredentialsError::Unsupported {
                    profile,
                    how: (*how).to_owned(),
                });
            }
            Err(CredentialsError::NotFound {
                profile,
                credentials_file: cred_path.display().to_string(),
                config_file: config_path.display().to_string(),
                config_section,
            })
        }
    }
}

/// The `key = value` pairs of `[section]` in an INI-style AWS file (keys
/// lower-cased; `#` and `;` start comments; a later section of the same
/// name adds to it).
fn section_keys(text: &str, section: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.split_whitespace().collect::<Vec<_>>().join(" ") == section;
            continue;
        }
        if !inside {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    const TOKEN: &str = "FwoGZXIvYXdzEXAMPLETOKEN";

    fn run(
        profile: Option<&str>,
        env: &[(&str, &str)],
        files: &[(&str, &str)],
    ) -> Result<Credentials, CredentialsError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let files: BTreeMap<PathBuf, String> = files
            .iter()
            .map(|(k, v)| (PathBuf::from(k), (*v).to_owned()))
            .collect();
        resolve(
            &CredentialSource::Standard {
                profile: profile.map(str::to_owned),
            },
            &|k| env.get(k).cloned(),
            &|p| Ok(files.get(p).cloned()),
        )
    }

    fn keys(id: &str, secret: &str, token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: id.into(),
            secret_access_key: secret.into(),
            session_token: token.map(Into::into),
        }
    }

    #[test]
    fn the_environment_wins_over_the_files() {
        let got = run(
            Some("prod"),
            &[
                ("HOME", "/home/op"),
                ("AWS_ACCESS_KEY_ID", "AKIAENV"),
                ("AWS_SECRET_ACCESS_KEY", SECRET),
                ("AWS_SESSION_TOKEN", TOKEN),
            ],
            &[(
                "/home/op/.aws/credentials",
                "[prod]\naws_access_key_id=AKIAFILE\naws_secret_access_key=x\n",
            )],
        );
        assert_eq!(got.unwrap(), keys("AKIAENV", SECRET, Some(TOKEN)));
    }

    #[test]
    fn one_key_variable_alone_is_an_error_naming_the_other() {
        let err = run(None, &[("AWS_ACCESS_KEY_ID", "AKIAENV")], &[]).unwrap_err();
        assert!(err.to_string().contains("AWS_SECRET_ACCESS_KEY is not"), "{err}");
    }

    #[test]
    fn the_profile_comes_from_the_credentials_file() {
        let text = "# keys\n[default]\naws_access_key_id = AKIADEF\naws_secret_access_key = d\n\n\
                    [ prod ]\n AWS_ACCESS_KEY_ID = AKIAPROD \naws_secret_access_key = s3cr3t\naws_session_token = tok\n";
        let files = [("/home/op/.aws/credentials", text)];
        let home = [("HOME", "/home/op")];
        assert_eq!(run(None, &home, &files).unwrap(), keys("AKIADEF", "d", None));
        assert_eq!(
            run(Some("prod"), &home, &files).unwrap(),
            keys("AKIAPROD", "s3cr3t", Some("tok"))
        );
        let by_env = [("HOME", "/home/op"), ("AWS_PROFILE", "prod")];
        assert_eq!(
            run(None, &by_env, &files).unwrap(),
            keys("AKIAPROD", "s3cr3t", Some("tok"))
        );
    }

    #[test]
    fn the_file_variables_move_the_files() {
        let env = [
            ("HOME", "/home/op"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/etc/novacron/aws-credentials"),
        ];
        let files = [
            (
                "/etc/novacron/aws-credentials",
                "[default]\naws_access_key_id=A\naws_secret_access_key=B\n",
            ),
            (
                "/home/op/.aws/credentials",
                "[default]\naws_access_key_id=WRONG\naws_secret_access_key=WRONG\n",
            ),
        ];
        assert_eq!(run(None, &env, &files).unwrap(), keys("A", "B", None));
    }

    #[test]
    fn the_config_file_uses_profile_sections_and_the_credentials_file_wins_key_by_key() {
        let config = "[default]\nregion = us-east-1\n[profile burst]\naws_access_key_id = AKIACFG\n\
                      aws_secret_access_key = fromconfig\n[burst]\naws_access_key_id = NOT-THIS-ONE\n";
        let env = [("HOME", "/h"), ("AWS_CONFIG_FILE", "/cfg")];
        assert_eq!(
            run(Some("burst"), &env, &[("/cfg", config)]).unwrap(),
            keys("AKIACFG", "fromconfig", None)
        );
        let cred = "[burst]\naws_secret_access_key = fromcredentials\n";
        let got = run(
            Some("burst"),
            &env,
            &[("/cfg", config), ("/h/.aws/credentials", cred)],
        );
        assert_eq!(got.unwrap(), keys("AKIACFG", "fromcredentials", None));
    }

    #[test]
    fn missing_everything_says_what_to_set() {
        let err = run(Some("burst"), &[("HOME", "/h")], &[]).unwrap_err();
        let msg = err.to_string();
        for want in [
            "AWS_ACCESS_KEY_ID",
            "[burst] in /h/.aws/credentials",
            "[profile burst] in /h/.aws/config",
        ] {
            assert!(msg.contains(want), "{want:?} not in {msg}");
        }
    }

    #[test]
    fn half_a_profile_and_other_ways_are_refused_without_the_values() {
        let files = [(
            "/h/.aws/credentials",
            "[default]\naws_secret_access_key = hidden-value\n",
        )];
        let err = run(None, &[("HOME", "/h")], &files).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no aws_access_key_id") && !msg.contains("hidden-value"),
            "{msg}"
        );
        let files = [("/h/.aws/config", "[profile sso]\nsso_session = corp\n")];
        let err = run(Some("sso"), &[("HOME", "/h")], &files).unwrap_err();
        assert!(err.to_string().contains("uses sso_session"), "{err}");
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_it() {
        let err = resolve(
            &CredentialSource::Standard { profile: None },
            &|k| (k == "HOME").then(|| "/h".to_owned()),
            &|_| Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/h/.aws/credentials"), "{err}");
    }

    #[test]
    fn debug_never_shows_the_secret_or_the_token() {
        let c = keys("AKIAVISIBLE", SECRET, Some(TOKEN));
        for shown in [
            format!("{c:?}"),
            format!("{:?}", CredentialSource::Static(c.clone())),
        ] {
            assert!(
                shown.contains("AKIAVISIBLE") && shown.contains("<redacted>"),
                "{shown}"
            );
            assert!(!shown.contains(SECRET) && !shown.contains(TOKEN), "{shown}");
        }
    }
}
