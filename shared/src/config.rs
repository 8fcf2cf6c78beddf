//! Loading TOML config files into validated, typed values (agent and server).

use std::path::Path;

use serde::de::DeserializeOwned;

/// A config that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or has unknown keys.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("config key {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// A TOML config file with defaults and a validation step.
pub trait ConfigFile: DeserializeOwned + Default {
    /// Checks ranges and relations between values.
    fn validate(&self) -> Result<(), ConfigError>;

    /// Loads and validates a file. With `explicit == false` a missing file
    /// means "use the defaults".
    fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                let c = Self::default();
                c.validate()?;
                Ok(c)
            }
            Err(source) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let c: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }
}
