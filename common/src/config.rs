//! TOML config loading shared by the binaries: a missing key takes its default, an unknown key
//! is an error (every config struct uses `deny_unknown_fields`), and errors name the file.

use serde::de::DeserializeOwned;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("bad config {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
}

/// Reads and parses a TOML config file.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: shown,
        source,
    })
}

/// Serde helpers for durations written as whole milliseconds (`idle_timeout_ms = 60000`).
pub mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }

    /// Whole milliseconds, saturating (a config never holds 584 million years).
    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(v.as_millis()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        listen: String,
        #[serde(default, with = "millis")]
        idle: std::time::Duration,
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("ferry-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "listen = \"127.0.0.1:1\"\nidle = 1500\n").unwrap();
        let s: Sample = load(&good).unwrap();
        assert_eq!(s.listen, "127.0.0.1:1");
        assert_eq!(s.idle.as_millis(), 1500);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "listen = \"x\"\nlisten_typo = 1\n").unwrap();
        let err = load::<Sample>(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.toml") && err.contains("listen_typo"),
            "{err}"
        );
        assert!(load::<Sample>(&dir.join("missing.toml")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
