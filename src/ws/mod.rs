//! WebSocket transport: the HTTP upgrade and RFC 6455 framing on glommio sockets.
//!
//! Nothing here knows about instant messaging: `handshake` turns request bytes into an
//! accepted upgrade or a refusal, `codec` turns socket bytes into WebSocket messages
//! (through tungstenite) and messages into frame bytes.

pub mod codec;
pub mod handshake;
