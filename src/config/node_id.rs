//! What is generated when the file leaves it out: this node's name (`<hostname>-<port>`)
//! and the rule every `node_id` must pass, and the random `api_key` and `auth.secret`.

use std::io::Read;

use super::error::{io_message, ConfigError};

/// Longest accepted `node_id`.
pub const MAX_NODE_ID_LEN: usize = 64;

/// Whether `id` is 1-[`MAX_NODE_ID_LEN`] bytes of `[A-Za-z0-9._:-]`.
pub(super) fn valid_node_id(id: &str) -> bool {
    (1..=MAX_NODE_ID_LEN).contains(&id.len()) && id.bytes().all(node_id_byte)
}

fn node_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

/// `<hostname>-<port>`, with characters outside the node_id set replaced and the host name
/// shortened so the result always passes `Config::validate`.
pub fn default_node_id(port: u16) -> String {
    let suffix = format!("-{port}");
    let host: String = hostname()
        .bytes()
        .map(|b| if node_id_byte(b) { b as char } else { '-' })
        .take(MAX_NODE_ID_LEN - suffix.len())
        .collect();
    format!("{host}{suffix}")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ringpush".to_owned())
}

/// 16 bytes of `/dev/urandom`, hex-encoded (32 chars). `key` names what it is for, in the
/// error.
pub(super) fn random_hex(key: &str) -> Result<String, ConfigError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("not set and cannot generate one: /dev/urandom: {}", io_message(&e)),
        )
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_node_id_is_always_valid() {
        assert!(valid_node_id(&default_node_id(65535)));
    }
}
