//! Client tokens: `auth::Verifier::verify`, what every `/ws` upgrade runs on the token of
//! its query or `Authorization` header. The first byte picks the leeway and the mode:
//! the rest as a whole token (any bytes), or as the claims of a token signed inside the
//! target with the verifier's secret, so the fuzzer gets past the HMAC to the claim checks.
#![no_main]

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use ringpush::auth::{valid_id, AuthError, Verifier, MAX_DEVICE_LEN, MAX_USER_LEN};

const SECRET: &str = "fuzz-secret-0123456789";

/// Token headers to sign over: HS256 as the backend writes it, and what the verifier must
/// refuse however well signed (another algorithm, none, not JSON).
const HEADERS: [&str; 6] = [
    r#"{"alg":"HS256","typ":"JWT"}"#,
    r#"{"alg":"HS256"}"#,
    r#"{"typ":"JWT","alg":"HS256","kid":"k1"}"#,
    r#"{"alg":"HS512","typ":"JWT"}"#,
    r#"{"alg":"none"}"#,
    "not json",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let verifier = Verifier::new(SECRET, u64::from(pick >> 4) * 30);
    let signed = pick & 1 == 1;
    let header = HEADERS[usize::from(pick >> 1) % HEADERS.len()];
    let token = if signed {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let input = format!("{}.{}", b64(header.as_bytes()), b64(rest));
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let Ok(signature) = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256) else {
            return;
        };
        format!("{input}.{signature}")
    } else {
        match std::str::from_utf8(rest) {
            Ok(text) => text.to_owned(),
            Err(_) => return,
        }
    };
    match verifier.verify(&token) {
        Ok(claims) => {
            assert!(valid_id(&claims.sub, MAX_USER_LEN), "{claims:?}");
            assert!(valid_id(&claims.dev, MAX_DEVICE_LEN), "{claims:?}");
            if signed {
                assert!(header.contains("HS256"), "accepted under {header}");
            }
        }
        Err(AuthError::Invalid(why)) if signed && header.contains("HS256") => {
            // Signed right: only the claims part can be wrong, never the signature.
            assert_ne!(why, "bad signature");
        }
        Err(_) => {}
    }
});
