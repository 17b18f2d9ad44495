//! Client tokens: HS256 JWTs signed by the backend with `auth.secret` (PROTOCOL.md,
//! "Connecting"). Only HS256 is accepted, whatever the token's header says.
//!
//! Time checks are done here rather than by `jsonwebtoken`, so that `auth.leeway_secs`
//! applies the same way to `exp` and `nbf` and a huge leeway cannot overflow.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Longest user id (`sub`).
pub const MAX_USER_LEN: usize = 128;
/// Longest device id (`dev`).
pub const MAX_DEVICE_LEN: usize = 64;

/// The claims of a verified client token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id: 1-128 chars of `[A-Za-z0-9._:@-]`.
    pub sub: String,
    /// Device id: 1-64 chars of the same set.
    pub dev: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Not before, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// The payload as it arrives, before each claim is checked, so a missing or mistyped claim
/// is reported by name instead of as a JSON error.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    dev: Option<serde_json::Value>,
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    nbf: Option<serde_json::Value>,
}

/// Checks client tokens against one secret. Cheap to clone; build one per shard.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    /// Signature and algorithm only: time and claim checks are ours.
    validation: Validation,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    leeway_secs: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("leeway_secs", &self.leeway_secs).finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for tokens signed with `secret`, allowing `leeway_secs` of clock skew.
    pub fn new(secret: &str, leeway_secs: u64) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        Verifier { key: DecodingKey::from_secret(secret.as_bytes()), validation, leeway_secs }
    }

    /// The allowed clock skew, in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// The unix second from which a connection authenticated by `claims` must be closed
    /// (`exp` plus the leeway).
    pub fn deadline(&self, claims: &Claims) -> u64 {
        claims.exp.saturating_add(self.leeway_secs)
    }

    /// Err for: bad signature, wrong alg (only HS256), malformed, missing sub/dev/exp,
    /// expired, not yet valid (nbf), sub not 1-128 chars of [A-Za-z0-9._:@-], dev not 1-64
    /// chars of the same set.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_at(token, now_secs())
    }

    /// [`Verifier::verify`] at a given unix second.
    fn verify_at(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let raw = jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation)
            .map_err(|e| decode_error(e.kind()))?
            .claims;
        let sub = string_claim(raw.sub, "sub")?;
        let dev = string_claim(raw.dev, "dev")?;
        let exp = time_claim(raw.exp, "exp")?.ok_or(AuthError::BadClaim("exp"))?;
        let nbf = time_claim(raw.nbf, "nbf")?;
        if !valid_id(&sub, MAX_USER_LEN) {
            return Err(AuthError::BadClaim("sub"));
        }
        if !valid_id(&dev, MAX_DEVICE_LEN) {
            return Err(AuthError::BadClaim("dev"));
        }
        // RFC 7519: valid while now < exp and now >= nbf, each widened by the leeway.
        if now >= exp.saturating_add(self.leeway_secs) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = nbf {
            if now.saturating_add(self.leeway_secs) < nbf {
                return Err(AuthError::NotYetValid);
            }
        }
        Ok(Claims { sub, dev, exp, nbf })
    }
}

fn decode_error(kind: &ErrorKind) -> AuthError {
    let reason = match kind {
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
            "algorithm must be HS256"
        }
        _ => "malformed token",
    };
    AuthError::Invalid(reason.to_owned())
}

fn string_claim(value: Option<serde_json::Value>, name: &'static str) -> Result<String, AuthError> {
    match value {
        Some(serde_json::Value::String(s)) => Ok(s),
        _ => Err(AuthError::BadClaim(name)),
    }
}

/// A NumericDate: a non-negative number of seconds; fractions are dropped.
fn time_claim(value: Option<serde_json::Value>, name: &'static str) -> Result<Option<u64>, AuthError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let serde_json::Value::Number(n) = value else {
        return Err(AuthError::BadClaim(name));
    };
    if let Some(secs) = n.as_u64() {
        return Ok(Some(secs));
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
        _ => Err(AuthError::BadClaim(name)),
    }
}

/// A token for `user` on `device`, signed with `secret`, valid for `ttl_secs` from now
/// (`exp = now + ttl`). Refuses ids the server would refuse.
pub fn mint(secret: &str, user: &str, device: &str, ttl_secs: u64) -> Result<String, AuthError> {
    mint_at(secret, user, device, now_secs().saturating_add(ttl_secs), None)
}

fn mint_at(secret: &str, user: &str, device: &str, exp: u64, nbf: Option<u64>) -> Result<String, AuthError> {
    if !valid_id(user, MAX_USER_LEN) {
        return Err(AuthError::BadClaim("sub"));
    }
    if !valid_id(device, MAX_DEVICE_LEN) {
        return Err(AuthError::BadClaim("dev"));
    }
    let claims = Claims { sub: user.to_owned(), dev: device.to_owned(), exp, nbf };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| AuthError::Invalid(format!("cannot sign: {e}")))
}

/// 1..=`max_len` chars of `[A-Za-z0-9._:@-]`.
pub fn valid_id(s: &str, max_len: usize) -> bool {
    (1..=max_len).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Why a token was refused. Every variant means `401` before the upgrade (or close 1008 for
/// an established connection); the text is safe to send to the client.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the query or the `Authorization` header.
    #[error("missing token")]
    Missing,
    /// Not a JWT, bad signature, or not HS256.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `exp` (plus leeway) has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` (minus leeway) is still in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// A required claim is missing, mistyped, or outside its character set or length.
    #[error("missing or invalid claim {0:?}")]
    BadClaim(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret-0123456789";

    fn sign<T: Serialize>(header: &Header, claims: &T, secret: &str) -> String {
        jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn round_trip() {
        let token = mint(SECRET, "alice@example.com", "phone-1", 3600).unwrap();
        let claims = Verifier::new(SECRET, 0).verify(&token).unwrap();
        assert_eq!(claims.sub, "alice@example.com");
        assert_eq!(claims.dev, "phone-1");
        assert_eq!(claims.nbf, None);
        let now = now_secs();
        assert!(claims.exp >= now + 3599 && claims.exp <= now + 3601, "{}", claims.exp);
        assert_eq!(Verifier::new(SECRET, 5).deadline(&claims), claims.exp + 5);
    }

    #[test]
    fn expired() {
        let v = Verifier::new(SECRET, 0);
        let token = mint_at(SECRET, "u", "d", 1000, None).unwrap();
        assert_eq!(v.verify_at(&token, 999).map(|c| c.exp), Ok(1000));
        assert_eq!(v.verify_at(&token, 1000), Err(AuthError::Expired));
        assert_eq!(v.verify_at(&token, 5000), Err(AuthError::Expired));
        let old = mint_at(SECRET, "u", "d", now_secs() - 10, None).unwrap();
        assert_eq!(v.verify(&old), Err(AuthError::Expired));
    }

    #[test]
    fn not_before_in_the_future() {
        let v = Verifier::new(SECRET, 0);
        let token = mint_at(SECRET, "u", "d", 2000, Some(1500)).unwrap();
        assert_eq!(v.verify_at(&token, 1499), Err(AuthError::NotYetValid));
        assert_eq!(v.verify_at(&token, 1500).unwrap().nbf, Some(1500));
        let now = now_secs();
        let later = mint_at(SECRET, "u", "d", now + 3600, Some(now + 600)).unwrap();
        assert_eq!(v.verify(&later), Err(AuthError::NotYetValid));
    }

    #[test]
    fn leeway_applies_to_exp_and_nbf() {
        let strict = Verifier::new(SECRET, 0);
        let lenient = Verifier::new(SECRET, 30);
        let token = mint_at(SECRET, "u", "d", 1000, Some(900)).unwrap();
        assert_eq!(strict.verify_at(&token, 1010), Err(AuthError::Expired));
        assert!(lenient.verify_at(&token, 1010).is_ok());
        assert_eq!(lenient.verify_at(&token, 1030), Err(AuthError::Expired));
        assert_eq!(strict.verify_at(&token, 880), Err(AuthError::NotYetValid));
        assert!(lenient.verify_at(&token, 880).is_ok());
        assert_eq!(lenient.verify_at(&token, 869), Err(AuthError::NotYetValid));
        // No overflow with an absurd leeway.
        assert!(Verifier::new(SECRET, u64::MAX).verify_at(&token, u64::MAX - 1).is_ok());
    }

    #[test]
    fn wrong_secret_and_tampering() {
        let token = mint(SECRET, "u", "d", 60).unwrap();
        assert_eq!(
            Verifier::new("another-secret", 0).verify(&token),
            Err(AuthError::Invalid("bad signature".to_owned()))
        );
        // Swap in a payload naming another user, keep the signature.
        let parts: Vec<&str> = token.split('.').collect();
        let forged = mint("attacker-secret", "mallory", "d", 60).unwrap();
        let forged_payload = forged.split('.').nth(1).unwrap();
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert!(matches!(Verifier::new(SECRET, 0).verify(&tampered), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn only_hs256() {
        let v = Verifier::new(SECRET, 0);
        let claims = Claims { sub: "u".into(), dev: "d".into(), exp: now_secs() + 60, nbf: None };
        let hs512 = sign(&Header::new(Algorithm::HS512), &claims, SECRET);
        assert_eq!(v.verify(&hs512), Err(AuthError::Invalid("algorithm must be HS256".to_owned())));
        // alg "none", unsigned.
        let b64 = |s: &str| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
        };
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&serde_json::to_string(&claims).unwrap())
        );
        assert!(matches!(v.verify(&none), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn malformed_and_missing() {
        let v = Verifier::new(SECRET, 0);
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        for bad in ["x", "a.b", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30"] {
            assert!(matches!(v.verify(bad), Err(AuthError::Invalid(_))), "{bad}");
        }
        let exp = now_secs() + 60;
        let header = Header::new(Algorithm::HS256);
        let cases = [
            (serde_json::json!({"dev": "d", "exp": exp}), "sub"),
            (serde_json::json!({"sub": "u", "exp": exp}), "dev"),
            (serde_json::json!({"sub": "u", "dev": "d"}), "exp"),
            (serde_json::json!({"sub": 7, "dev": "d", "exp": exp}), "sub"),
            (serde_json::json!({"sub": "u", "dev": "d", "exp": "soon"}), "exp"),
            (serde_json::json!({"sub": "u", "dev": "d", "exp": -5}), "exp"),
            (serde_json::json!({"sub": "u", "dev": "d", "exp": exp, "nbf": "x"}), "nbf"),
        ];
        for (claims, name) in cases {
            let token = sign(&header, &claims, SECRET);
            assert_eq!(v.verify(&token), Err(AuthError::BadClaim(name)), "{claims}");
        }
        // Extra claims are ignored; a fractional exp is accepted.
        let token = sign(
            &header,
            &serde_json::json!({"sub": "u", "dev": "d", "exp": exp as f64 + 0.5, "iat": 1, "aud": "x"}),
            SECRET,
        );
        assert_eq!(v.verify(&token).unwrap().exp, exp);
    }

    #[test]
    fn bad_ids() {
        let v = Verifier::new(SECRET, 0);
        let exp = now_secs() + 60;
        let header = Header::new(Algorithm::HS256);
        let long_user = "u".repeat(129);
        let long_dev = "d".repeat(65);
        let cases = [
            ("", "d", "sub"),
            ("has space", "d", "sub"),
            ("ü", "d", "sub"),
            (long_user.as_str(), "d", "sub"),
            ("u", "", "dev"),
            ("u", "a/b", "dev"),
            ("u", long_dev.as_str(), "dev"),
        ];
        for (sub, dev, name) in cases {
            let token = sign(&header, &serde_json::json!({"sub": sub, "dev": dev, "exp": exp}), SECRET);
            assert_eq!(v.verify(&token), Err(AuthError::BadClaim(name)), "{sub:?} {dev:?}");
            assert!(mint(SECRET, sub, dev, 60).is_err(), "{sub:?} {dev:?}");
        }
        let max_user = "u".repeat(128);
        let max_dev = "d".repeat(64);
        let token = mint(SECRET, &max_user, &max_dev, 60).unwrap();
        assert_eq!(v.verify(&token).unwrap().sub, max_user);
    }

    #[test]
    fn valid_id_charset() {
        assert!(valid_id("A-z_0.9:x@y", 64));
        assert!(!valid_id("", 64));
        assert!(!valid_id("abc", 2));
        assert!(valid_id("ab", 2));
        for c in [" ", "/", "#", "+", "é", "\n", "\0"] {
            assert!(!valid_id(c, 64), "{c:?}");
        }
    }
}
