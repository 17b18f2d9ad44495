//! The config loader: `Config::from_parts(toml, env)` with arbitrary text. The input is
//! the TOML text, then optionally a NUL and `NAME=value` lines as the environment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringpush::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (toml, env) = text.split_once('\0').unwrap_or((text, ""));
    let env: Vec<(String, String)> =
        env.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    if let Ok(config) = Config::from_parts(toml, env) {
        // What loads must pass its own checks (the server validates once more at start).
        assert!(config.validate().is_ok());
    }
});
