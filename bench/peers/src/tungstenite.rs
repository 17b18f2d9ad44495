//! tokio-tungstenite echo server on a current-thread runtime. `--read-buffer BYTES` sets
//! `WebSocketConfig::read_buffer_size` (tungstenite allocates it per connection up front;
//! its default is 128 KiB); without it the configuration is tungstenite's default.
//!
//! The echo is the library's usual pattern: the read half, text and binary messages
//! only, forwarded into the write half (which batches writes while more are ready).

mod common;

use futures_util::{future, StreamExt, TryStreamExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

fn main() {
    let args = common::Args::parse();
    let config = match args.read_buffer {
        Some(bytes) => WebSocketConfig::default().read_buffer_size(bytes),
        None => WebSocketConfig::default(),
    };
    common::runtime().block_on(async move {
        let listener = common::listen(args.addr).await;
        loop {
            let stream = common::accept(&listener).await;
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
                    return;
                };
                let (write, read) = ws.split();
                let _ = read.try_filter(|m| future::ready(m.is_text() || m.is_binary())).forward(write).await;
            });
        }
    });
}
