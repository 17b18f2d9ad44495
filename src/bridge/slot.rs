//! Redis Cluster's hash slots: which of the 16384 slots a key is in, and which argument of
//! a command is its key. No I/O.

use redis::{Arg, Cmd};

/// Slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), as Redis Cluster hashes keys;
/// one table entry per byte value.
const CRC16: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0, |crc, &b| (crc << 8) ^ CRC16[usize::from((crc >> 8) as u8 ^ b)])
}

/// The hash slot of `key`: the CRC16 of its hash tag (what is between its first `{` and
/// the next `}`, when that is not empty), else of the whole key, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|&b| b == b'}').map(|len| &rest[..len])
        })
        .filter(|tag| !tag.is_empty());
    crc16(tag.unwrap_or(key)) % SLOTS as u16
}

/// The key a command is routed by: for `EVAL`/`EVALSHA` (and their `_RO` forms, and
/// `FCALL`) the first key when it names any, else the argument after the command's name;
/// `None` for a command without a key (`PING`, a script call with no key, ...), which
/// any master can run.
pub fn cmd_key(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        Arg::Simple(bytes) => Some(bytes),
        Arg::Cursor => None,
    });
    let name = args.next()??;
    let upper = name.to_ascii_uppercase();
    match upper.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let _script = args.next()?;
            let numkeys: u64 = std::str::from_utf8(args.next()??).ok()?.parse().ok()?;
            if numkeys == 0 {
                return None;
            }
            args.next()?
        }
        b"PING" | b"ECHO" | b"TIME" | b"INFO" | b"SCRIPT" | b"FUNCTION" | b"CLUSTER" | b"DBSIZE"
        | b"FLUSHALL" | b"FLUSHDB" | b"ASKING" | b"READONLY" | b"READWRITE" | b"CONFIG" | b"CLIENT"
        | b"AUTH" | b"HELLO" | b"SELECT" | b"WAIT" | b"MULTI" | b"EXEC" | b"DISCARD" => None,
        _ => args.next()?,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_xmodem() {
        // The check value of CRC-16/XMODEM, and the examples of the Redis Cluster spec.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"123456789"), 0x31c3, "below 16384 already");
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
    }

    #[test]
    fn hash_tags() {
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"), "empty first tag: whole key");
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"{"), crc16(b"{") % 16384);
        assert_eq!(key_slot(b"}{"), crc16(b"}{") % 16384);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn keys_of_commands() {
        let mut get = redis::cmd("get");
        get.arg("k");
        assert_eq!(cmd_key(&get), Some(&b"k"[..]));
        let mut eval = redis::cmd("EVALSHA");
        eval.arg("abc").arg(2).arg("k1").arg("k2").arg("x");
        assert_eq!(cmd_key(&eval), Some(&b"k1"[..]));
        let mut keyless = redis::cmd("EVALSHA");
        keyless.arg("abc").arg(0).arg("x");
        assert_eq!(cmd_key(&keyless), None);
        assert_eq!(cmd_key(&redis::cmd("PING")), None);
        let mut ping = redis::cmd("PING");
        ping.arg("hello");
        assert_eq!(cmd_key(&ping), None);
        assert_eq!(cmd_key(&redis::cmd("DBSIZE")), None);
    }
}
