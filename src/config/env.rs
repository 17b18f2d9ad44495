//! The `RINGPUSH_<SECTION>__<KEY>` environment variables: read from the process, merged into
//! the file's table before it is deserialized (so they win over the file), and remembered so
//! an error about a key they set names the variable.
//!
//! The schema the keys are checked against (`Config`) is a type parameter here, so this file
//! needs nothing from the module that defines it.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use super::error::{probe, ConfigError, Rejection};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "RINGPUSH_";

/// Every `RINGPUSH_*` variable of the process; the others are ignored. A `RINGPUSH_*` one
/// whose value is not UTF-8 is an error naming it.
pub(super) fn vars() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
            continue;
        };
        let value = value.into_string().map_err(|_| ConfigError::Env {
            var: name.to_owned(),
            message: "value is not valid UTF-8".to_owned(),
        })?;
        env.push((name.to_owned(), value));
    }
    Ok(env)
}

/// The environment variables applied to a table, remembered so errors about their keys can
/// say where the value came from.
pub(super) struct Overrides {
    /// key path ("limits.max_connections") -> variable name.
    vars: BTreeMap<String, String>,
}

impl Overrides {
    /// Inserts every `RINGPUSH_<SECTION>__<KEY>` (or `RINGPUSH_<KEY>`) into `table`. A value
    /// that parses as a TOML value is used as one (`5`, `true`, `["a","b"]`), unless the key
    /// only accepts a string (`RINGPUSH_AUTH__SECRET=12345678`); anything else is a string.
    /// `T` is the schema (`Config`) that decides which keys exist and what a value must be.
    pub(super) fn apply<T: DeserializeOwned>(
        table: &mut toml::Table,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Overrides, ConfigError> {
        let mut env: Vec<(String, String)> =
            env.into_iter().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect();
        env.sort();
        let mut vars = BTreeMap::new();
        for (var, raw) in env {
            let path: Vec<String> =
                var[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
            let key = path.join(".");
            let unknown = || ConfigError::UnknownEnv { var: var.clone(), key: key.clone() };
            let (section, name) = match path.as_slice() {
                [name] if !name.is_empty() => (None, name.as_str()),
                [section, name] if !section.is_empty() && !name.is_empty() => {
                    (Some(section.as_str()), name.as_str())
                }
                _ => return Err(unknown()),
            };
            let (outer, inner) = match section {
                None => (name, None),
                Some(section) => (section, Some(name)),
            };
            let value = match raw.parse::<toml::Value>() {
                Ok(parsed) => match probe::<T>(outer, inner, &parsed) {
                    Err(Rejection::Invalid(_))
                        if probe::<T>(outer, inner, &toml::Value::String(raw.clone())).is_ok() =>
                    {
                        toml::Value::String(raw)
                    }
                    _ => parsed,
                },
                Err(_) => toml::Value::String(raw),
            };
            if let Err(Rejection::Unknown { .. }) = probe::<T>(outer, inner, &value) {
                return Err(unknown());
            }
            match section {
                None => {
                    table.insert(name.to_owned(), value);
                }
                Some(section) => {
                    let slot = table
                        .entry(section.to_owned())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    let toml::Value::Table(section_table) = slot else {
                        return Err(ConfigError::Env {
                            var,
                            message: format!("{section} in the file is not a table"),
                        });
                    };
                    section_table.insert(name.to_owned(), value);
                }
            }
            vars.insert(key, var);
        }
        Ok(Overrides { vars })
    }

    /// Adds the variable's name to an error about a key it set.
    pub(super) fn attribute(&self, error: ConfigError) -> ConfigError {
        match error {
            ConfigError::Invalid { key, message, var: None } => {
                let var = self.vars.get(&key).cloned();
                ConfigError::Invalid { key, message, var }
            }
            other => other,
        }
    }
}
