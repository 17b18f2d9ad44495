//! Cheap reads of the server's JSON frames, for the hot path of a client process that
//! takes in hundreds of thousands of `msg` frames a second on a core it shares.
//!
//! The server writes its frames in one fixed shape (PROTOCOL.md; `protocol::msg_json`
//! and friends): `op` first, then flat fields, then a `body` that is the sender's JSON
//! as sent. So instead of parsing, the client looks for `"name":` and reads the number
//! or string after it. The body of the bench's own messages (`{"t":<ns>,"p":"..."}`) is
//! read the same way after `"body":`. Not a JSON parser: a field name inside a string
//! value could fool it, and the bench never sends such strings.

/// The frames a client of the IM protocol tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Hello,
    Msg,
    Ack,
    Synced,
    Gap,
    Error,
    Push,
    Read,
    Signal,
    Other,
}

/// The `op` of a server frame, read from its first bytes.
pub fn op(frame: &[u8]) -> Op {
    let Some(rest) = frame.strip_prefix(b"{\"op\":\"") else { return Op::Other };
    let end = rest.iter().take(8).position(|b| *b == b'"').unwrap_or(0);
    match &rest[..end] {
        b"msg" => Op::Msg,
        b"ack" => Op::Ack,
        b"hello" => Op::Hello,
        b"synced" => Op::Synced,
        b"gap" => Op::Gap,
        b"error" => Op::Error,
        b"push" => Op::Push,
        b"read" => Op::Read,
        b"signal" => Op::Signal,
        _ => Op::Other,
    }
}

/// Index of the first occurrence of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while from + needle.len() <= hay.len() {
        let at = from + hay[from..hay.len() - rest.len()].iter().position(|b| *b == first)?;
        if hay[at + 1..].starts_with(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The unsigned integer right after `key` (e.g. `"seq":`), if there is one.
pub fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(hay, key)? + key.len();
    number(&hay[at..])
}

/// The unsigned integer at the start of `bytes`.
pub fn number(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    Some(bytes[..digits].iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The contents of the JSON string right after `key` (e.g. `"conv":`), without escapes
/// resolved (ids are plain ASCII).
pub fn string_after<'a>(hay: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = find(hay, key)? + key.len();
    let rest = hay[at..].strip_prefix(b"\"")?;
    let end = rest.iter().position(|b| *b == b'"')?;
    Some(&rest[..end])
}

/// Appends `n` in decimal.
pub fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = br#"{"op":"msg","conv":"r1c7","seq":42,"from":"u3","dev":"d","cid":"99","ts":1764201600123,"body":{"t":123456789,"p":"xx"}}"#;

    #[test]
    fn ops() {
        assert_eq!(op(MSG), Op::Msg);
        assert_eq!(op(br#"{"op":"ack","conv":"c","cid":"1","seq":1,"ts":2}"#), Op::Ack);
        assert_eq!(op(br#"{"op":"synced","conv":"c","last":0,"complete":true}"#), Op::Synced);
        assert_eq!(op(br#"{"op":"gap","conv":"c","from":1,"to":2}"#), Op::Gap);
        assert_eq!(op(br#"{"op":"hello","user":"u1"}"#), Op::Hello);
        assert_eq!(op(br#"{"op":"error","code":"x"}"#), Op::Error);
        assert_eq!(op(br#"{"op":"push","body":1}"#), Op::Push);
        assert_eq!(op(br#"{"op":"msgx"}"#), Op::Other);
        assert_eq!(op(b"[]"), Op::Other);
        assert_eq!(op(b""), Op::Other);
    }

    #[test]
    fn fields() {
        assert_eq!(number_after(MSG, b"\"seq\":"), Some(42));
        assert_eq!(number_after(MSG, b"\"body\":{\"t\":"), Some(123456789));
        assert_eq!(number_after(MSG, b"\"absent\":"), None);
        assert_eq!(number_after(br#"{"seq":x}"#, b"\"seq\":"), None);
        assert_eq!(string_after(MSG, b"\"conv\":"), Some(&b"r1c7"[..]));
        assert_eq!(string_after(MSG, b"\"cid\":"), Some(&b"99"[..]));
        assert_eq!(string_after(br#"{"cid":null}"#, b"\"cid\":"), None);
        assert_eq!(find(b"aab", b"ab"), Some(1));
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"", b"a"), None);
        assert_eq!(find(b"xyz", b"z"), Some(2));
        assert_eq!(number(b"18446744073709551615"), None, "20 digits are refused");
    }

    #[test]
    fn decimal() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut out = Vec::new();
            put_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}
