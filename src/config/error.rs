//! [`ConfigError`], why a configuration was refused, and how a refusal is pinned on one
//! line of the file (TOML syntax) or one key (unknown key, wrong type) and worded as one line.
//!
//! The schema the keys are checked against (`Config`) is a type parameter here, so this file
//! needs nothing from the module that defines it.

use serde::de::DeserializeOwned;

/// Why a configuration was refused. `Display` is one line naming the key (or the file, line
/// or variable); the operator fixes that and starts again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("file {path}: {message}")]
    File {
        /// The path as given.
        path: String,
        /// The OS's reason ("No such file or directory").
        message: String,
    },
    /// The file is not valid TOML.
    #[error("{}invalid TOML: {message}", line_prefix(*.line))]
    Syntax {
        /// 1-based line of the error, when the parser knows it.
        line: Option<usize>,
        /// The parser's reason.
        message: String,
    },
    /// A key in the file that ringpush does not know (typo, or wrong section).
    #[error("unknown key {key:?}")]
    UnknownKey {
        /// Dotted path: `"limits.foo"`.
        key: String,
    },
    /// A `RINGPUSH_*` variable that maps to no key.
    #[error("{var}: unknown key {key:?}")]
    UnknownEnv {
        /// The variable's name.
        var: String,
        /// The dotted path it maps to.
        key: String,
    },
    /// A `RINGPUSH_*` variable that cannot be applied.
    #[error("{var}: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// Why it cannot be applied.
        message: String,
    },
    /// A key with a wrong type or a value breaking its rule.
    #[error("{key}: {message}{}", var_suffix(.var))]
    Invalid {
        /// Dotted path: `"heartbeat.ping_interval_ms"`.
        key: String,
        /// What is wrong; never contains a secret's value.
        message: String,
        /// The environment variable that set the key, if one did.
        var: Option<String>,
    },
}

fn line_prefix(line: Option<usize>) -> String {
    line.map(|l| format!("line {l}: ")).unwrap_or_default()
}

fn var_suffix(var: &Option<String>) -> String {
    var.as_ref().map(|v| format!(" (set by {v})")).unwrap_or_default()
}

impl ConfigError {
    pub(super) fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { key: key.to_owned(), message: message.into(), var: None }
    }

    /// The error for `key`, whose value was rejected as `rejection`.
    fn rejected(key: String, rejection: Rejection) -> ConfigError {
        match rejection {
            Rejection::Unknown { .. } => ConfigError::UnknownKey { key },
            Rejection::Invalid(e) => ConfigError::Invalid { key, message: one_line(e.message()), var: None },
        }
    }

    /// The dotted key the error is about (`"limits.max_connections"`), when it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key }
            | ConfigError::UnknownEnv { key, .. }
            | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::File { .. } | ConfigError::Syntax { .. } | ConfigError::Env { .. } => None,
        }
    }
}

/// Why a table did not deserialize into the schema.
#[derive(Debug)]
pub(super) enum Rejection {
    /// The schema has no such key: a typo, a key in the wrong section, or a field that is not
    /// a TOML key (`api_key_generated`).
    Unknown {
        /// Dotted path of the first such key: `"limits.foo"`.
        key: String,
    },
    /// A key of the schema with a value of the wrong type or shape.
    Invalid(toml::de::Error),
}

/// Deserializes `table` as `T`, refusing keys `T` does not have. The section structs do not
/// deny unknown fields: serde would report them only as message text. `serde_ignored`
/// names every key the derive skipped instead, so an unknown key is known by its type. The
/// first problem in key order wins, as with `deny_unknown_fields`: a key skipped before an
/// error is reported, and nothing after an error is read.
pub(super) fn deserialize<T: DeserializeOwned>(table: toml::Table) -> Result<T, Rejection> {
    let mut unknown = None;
    let result = serde_ignored::deserialize(table, |path| {
        unknown.get_or_insert_with(|| dotted(&path));
    });
    match (unknown, result) {
        (Some(key), _) => Err(Rejection::Unknown { key }),
        (None, Ok(value)) => Ok(value),
        (None, Err(e)) => Err(Rejection::Invalid(e)),
    }
}

/// `limits.foo` for a path of `serde_ignored`, whose `Option` and newtype layers are no keys.
fn dotted(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    let (parent, name) = match path {
        Path::Root => return String::new(),
        Path::Seq { parent, index } => (parent, index.to_string()),
        Path::Map { parent, key } => (parent, key.clone()),
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            return dotted(parent);
        }
    };
    match dotted(parent) {
        prefix if prefix.is_empty() => name,
        prefix => format!("{prefix}.{name}"),
    }
}

/// An `io::Error` as the OS says it, without Rust's " (os error N)" suffix.
pub(super) fn io_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn one_line(text: &str) -> String {
    text.trim().lines().map(str::trim).collect::<Vec<_>>().join("; ")
}

pub(super) fn parse_document(text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| {
        // Bytes, not `str` slicing: the offset need not fall on a char boundary.
        let line = e.span().map(|span| {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            before.iter().filter(|&&b| b == b'\n').count() + 1
        });
        ConfigError::Syntax { line, message: one_line(e.message()) }
    })
}

/// Deserializes a table holding only `key` (or only `key.sub`) into a `T` (the `Config`), so
/// an error can be pinned on one key: every field has a default, so nothing else can fail.
pub(super) fn probe<T: DeserializeOwned>(
    key: &str,
    sub: Option<&str>,
    value: &toml::Value,
) -> Result<(), Rejection> {
    let value = match sub {
        None => value.clone(),
        Some(sub) => toml::Value::Table(toml::Table::from_iter([(sub.to_owned(), value.clone())])),
    };
    deserialize::<T>(toml::Table::from_iter([(key.to_owned(), value)])).map(drop)
}

/// Finds the key a deserialization error is about by probing key by key; serde errors on a
/// whole table do not carry the path.
pub(super) fn locate<T: DeserializeOwned>(table: &toml::Table, whole: Rejection) -> ConfigError {
    let empty = toml::Value::Table(toml::Table::new());
    for (key, value) in table {
        let Err(err) = probe::<T>(key, None, value) else {
            continue;
        };
        let is_section = matches!(value, toml::Value::Table(_)) && probe::<T>(key, None, &empty).is_ok();
        if let (true, toml::Value::Table(section)) = (is_section, value) {
            for (sub, sub_value) in section {
                if let Err(e) = probe::<T>(key, Some(sub), sub_value) {
                    return ConfigError::rejected(format!("{key}.{sub}"), e);
                }
            }
        }
        return ConfigError::rejected(key.clone(), err);
    }
    match whole {
        Rejection::Unknown { key } => ConfigError::UnknownKey { key },
        Rejection::Invalid(e) => ConfigError::invalid("config", one_line(e.message())),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// The error `parse_document` gives for `text`, checked to be one line about no key.
    fn syntax_error(text: &str) -> String {
        let e = parse_document(text).expect_err("expected an error");
        assert_eq!(e.key(), None, "{e}");
        let text = e.to_string();
        assert!(!text.contains('\n'), "not one line: {text}");
        text
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let text = syntax_error("a = 1\nb = 2\nlisten = = 3\n");
        assert!(text.starts_with("line 3: invalid TOML"), "{text}");
        let text = syntax_error("# héllo wörld\nnode_id = \"é\"\nx = ü\n");
        assert!(text.starts_with("line 3: invalid TOML"), "{text}");
        let text = syntax_error("[limits\n");
        assert!(text.starts_with("line 1: invalid TOML"), "{text}");
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Schema {
        a: u32,
        section: Option<Section>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Section {
        b: u32,
    }

    fn deserialized(text: &str) -> Result<Schema, Rejection> {
        deserialize(parse_document(text).expect("valid TOML"))
    }

    #[test]
    fn unknown_keys_are_told_apart_by_type_first_problem_first() {
        let schema = deserialized("a = 1\n[section]\nb = 2\n").unwrap();
        assert_eq!((schema.a, schema.section.map(|s| s.b)), (1, Some(2)));
        let unknown = |text| match deserialized(text) {
            Err(Rejection::Unknown { key }) => key,
            other => panic!("{text:?}: {other:?}"),
        };
        assert_eq!(unknown("[section]\ntypo = 2\n"), "section.typo");
        assert_eq!(unknown("_typo = 1\na = \"x\"\n"), "_typo");
        assert!(matches!(deserialized("a = \"x\"\nb = 1\n"), Err(Rejection::Invalid(_))));
    }
}
